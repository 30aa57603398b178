"""The main job, end to end: `python -m genlip_mcore.train` on the tiny config, as the quickstart runs it."""

import re
import subprocess
import sys

from tests.distributed.launch import REPO


def _run(*overrides, timeout=600):
    import tempfile

    run_dir = tempfile.mkdtemp(prefix="genlip-e2e-")
    cmd = [sys.executable, "-m", "genlip_mcore.train", "--config", "examples/configs/tiny_cpu.yaml",
           f"training.run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_tiny_run_learns_to_look_at_the_image():
    proc = _run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"done: loss ([\d.]+) -> ([\d.]+); a model blind to the image cannot go below ~([\d.]+)",
                  proc.stdout)
    assert m, proc.stdout[-2000:]
    first, last, floor = map(float, m.groups())
    assert last < floor - 0.2, f"final loss {last} is not clearly below the blind floor {floor}"
    assert len(re.findall(r"iteration +\d+/ *200 \|", proc.stdout)) == 200


def test_wrong_config_fails_before_any_work_naming_the_field():
    proc = _run("parallel.tensor_model_parallel_size=3", timeout=120)
    assert proc.returncode == 2
    assert "parallel.tensor_model_parallel_size" in proc.stderr
    assert "iteration" not in proc.stdout


def test_trains_on_webdataset_shards_and_checks_the_vocabulary(tmp_path):
    from genlip_mcore.data.shapes import make_shapes

    make_shapes(tmp_path, samples=300, shards=4, seed=1, heldout=16)
    subprocess.run([sys.executable, "-m", "genlip_mcore.data", "train-tokenizer", "--shards",
                    str(tmp_path / "train" / "*.tar"), "--out", str(tmp_path / "tok"), "--vocab-size", "400"],
                   check=True, capture_output=True, cwd=REPO)
    data = [f"data.sources={tmp_path}/train/*.tar", f"data.tokenizer_path={tmp_path}/tok/tokenizer.model"]
    proc = _run(*data, "training.train_iters=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([-\d.E+e]+)", proc.stdout)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    small = _run(*data, "model.vocab_size=256", timeout=120)
    assert small.returncode == 2 and "model.vocab_size: 256 is smaller than the tokenizer's" in small.stderr
