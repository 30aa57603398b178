"""The README's main command, `bash scripts/quickstart.sh`, end to end on a small budget: shapes data, tokenizer,
training with a held-out loss, held-out captions with the exact-match rate, HF export, the export captioning
identically, and the closing summary (held-out loss beside exact match, training loss against the blind floor)."""

import json
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
    assert len(re.findall(r" validation loss at iteration 6 \| lm loss value: ", proc.stdout)) == 1   # at the end
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if "valid_loss" in r]
    assert [r["iteration"] for r in valid] == [6]
    held = re.search(r"\[quickstart\] held-out loss ([\d.]+) \(iteration 6, \d+ caption tokens\), exact match "
                     rf"{re.escape(m.group(1))}% of 20 held-out images\n", proc.stdout)
    assert held and float(held.group(1)) == round(valid[0]["valid_loss"], 4)
    assert re.search(r"\[quickstart\] training loss [\d.]+ \(iteration 2\) -> [\d.]+ \(iteration 6\); a model "
                     r"blind to the image cannot go below ~[\d.]+ on this data", proc.stdout)
    hf = tmp_path / "run" / "hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.model").is_file()
