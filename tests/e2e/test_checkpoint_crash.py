"""A SIGKILL in the middle of a checkpoint save: the previous checkpoint and `latest` survive, and resuming from
them reproduces the uninterrupted run exactly (single process, real shards, loader state included)."""

import json
import re
import signal
import subprocess
import sys

from genlip_mcore import ckpt
from tests.distributed.launch import REPO


def _train(run_dir, *extra, env=None):
    cmd = [sys.executable, "-m", "genlip_mcore.train", "--config", "examples/configs/tiny_cpu.yaml",
           "training.train_iters=6", "training.save_interval=2", "data.max_seq_len=256", "data.image_size=64",
           f"training.run_dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _losses(stdout):
    return [float(x) for x in re.findall(r"lm loss: ([-\d.E+e]+)", stdout)]


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, shapes_data):
    import os

    data = shapes_data
    straight = _train(tmp_path / "straight", *data)
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = _train(tmp_path / "run", *data, env=dict(os.environ, GENLIP_FAULT="kill_during_save@4"))
    assert crashed.returncode == -signal.SIGKILL
    save_dir = tmp_path / "run" / "checkpoints"
    assert (save_dir / "latest").read_text().strip() == "iter_0000002"
    assert (save_dir / ".tmp_iter_0000004").is_dir()                 # the half-finished save, never renamed
    assert ckpt.read_meta(save_dir / "iter_0000002")["iteration"] == 2
    resumed = _train(tmp_path / "run", *data, f"training.load_dir={save_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(resumed.stdout) == _losses(straight.stdout)[2:]   # iterations 3..6, exactly
    assert not (save_dir / ".tmp_iter_0000004").exists()             # cleaned by the next save
    assert [p.name for p in ckpt.checkpoints(save_dir)] == ["iter_0000002", "iter_0000004", "iter_0000006"]
    meta = json.loads((save_dir / "iter_0000006" / "genlip.json").read_text())
    assert meta["tokenizer"] and (save_dir / "iter_0000006" / meta["tokenizer"]).is_file()
