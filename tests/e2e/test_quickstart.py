"""The README's main command, `bash scripts/quickstart.sh`, end to end on a small budget: shapes data, tokenizer,
training, held-out captions with the exact-match rate, HF export, and the export captioning identically."""

import os
import re
import subprocess

from tests.distributed.launch import REPO


def test_quickstart_script_runs_through_and_the_hf_export_captions_identically(tmp_path):
    env = dict(os.environ, GENLIP_QUICKSTART_DATA=str(tmp_path / "data"), GENLIP_QUICKSTART_RUN=str(tmp_path / "run"),
               GENLIP_QUICKSTART_SAMPLES="400")
    proc = subprocess.run(["bash", "scripts/quickstart.sh", "training.train_iters=6", "training.log_interval=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    console = proc.stdout + proc.stderr
    for chatter in ("Params for bucket", "are not installed", "is not installed", "DeprecationWarning",
                    "FutureWarning", "Loading weights"):
        assert chatter not in console, chatter             # third-party chatter stays in the log file
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    # one record: "Number of buckets ...", then the "Params for bucket" listing on the lines after it
    assert "DEBUG megatron.core.distributed.param_and_grad_buffer: Number of buckets" in log
    assert "\nParams for bucket 1 (" in log
    assert len(re.findall(r"iteration +\d+/ *6 \|", proc.stdout)) == 3
    m = re.search(r"exact match: ([\d.]+)% of (\d+) held-out images", proc.stdout)
    assert m and int(m.group(2)) == 20                      # 5% of 400
    assert re.search(r"captions from the HF export are identical to the checkpoint's \(20 images\)", proc.stdout)
    hf = tmp_path / "run" / "hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.model").is_file()
