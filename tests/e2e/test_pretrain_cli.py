"""The main job, end to end: `python -m genlip_mcore.train` on the tiny config, as the quickstart runs it."""

import re
import subprocess
import sys

from tests.distributed.launch import REPO


def _run(*overrides, timeout=600):
    cmd = [sys.executable, "-m", "genlip_mcore.train", "--config", "examples/configs/tiny_cpu.yaml", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_tiny_run_learns_to_look_at_the_image():
    proc = _run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"done: loss ([\d.]+) -> ([\d.]+); a model blind to the image cannot go below ~([\d.]+)",
                  proc.stdout)
    assert m, proc.stdout[-2000:]
    first, last, floor = map(float, m.groups())
    assert last < floor - 0.2, f"final loss {last} is not clearly below the blind floor {floor}"
    assert len(re.findall(r"iteration +\d+/200", proc.stdout)) == 200


def test_wrong_config_fails_before_any_work_naming_the_field():
    proc = _run("parallel.tensor_model_parallel_size=3", timeout=120)
    assert proc.returncode == 2
    assert "parallel.tensor_model_parallel_size" in proc.stderr
    assert "iteration" not in proc.stdout
