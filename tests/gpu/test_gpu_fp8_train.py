"""FP8 training on a GPU: a few bf16 steps of the tiny model (hidden 256) with torchao's real FP8 GEMMs (tensorwise,
rowwise; SM89+) and with the emulator on CUDA, against the same run in plain bf16. Runs on a lent device only."""

import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TINY = "examples/configs/tiny_cpu.yaml"
BASE = ["precision.bf16=true", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
        "model.mrope_section=[8,8,8]", "training.train_iters=6", "training.global_batch_size=4",
        "data.max_seq_len=512"]


def _sm89() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _train(*overrides):
    run_dir = Path(tempfile.mkdtemp(prefix="genlip-gpu-fp8-"))
    cmd = [sys.executable, "-m", "genlip_mcore.train", "--config", TINY, f"training.run_dir={run_dir}", *BASE,
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, [float(x) for x in re.findall(r"lm loss: ([-\d.E+e]+)", proc.stdout)]


@pytest.fixture(scope="module")
def bf16_losses():
    return _train()[1]


@pytest.mark.parametrize("backend,recipe,fmt", [("torchao", "tensorwise", "hybrid"), ("torchao", "rowwise", "e4m3"),
                                                ("emulate", "tensorwise", "hybrid"), ("emulate", "mxfp8", "e4m3")])
def test_fp8_tracks_bf16(bf16_losses, backend, recipe, fmt):
    if backend == "torchao" and not _sm89():
        pytest.skip("torchao's FP8 GEMMs need compute capability 8.9 or newer")
    run_dir, losses = _train(f"precision.fp8={fmt}", f"precision.fp8_recipe={recipe}",
                             f"precision.fp8_backend={backend}", "logging.fp8_stats_interval=3")
    assert len(losses) == len(bf16_losses) == 6 and all(math.isfinite(x) for x in losses)
    for a, b in zip(losses, bf16_losses, strict=True):
        assert abs(a - b) <= 0.02 * abs(b), (losses, bf16_losses)
    rows = [json.loads(line) for line in (run_dir / "fp8_stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 4 * 3 and all(r["fp8"] and r["recipe"] == recipe for r in rows)
