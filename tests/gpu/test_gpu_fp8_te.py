"""FP8 training through Transformer Engine (fp8_backend=te): for each TE recipe this GPU runs, a few bf16 steps of
the tiny model (hidden 256) on the TE spec with a finite loss; with nvdlfw-inspect installed, fp8_stats.jsonl in the
emulator's schema from TE's own statistics; and the attn_bf16 quant_recipe keeping attention in BF16.

TE is not on the lent GPU machine: this runs on users' clusters (`pytest -m gpu tests/gpu/test_gpu_fp8_te.py`)."""

import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from genlip_mcore.model.fp8.device import MIN_CAPABILITY
from tests.distributed.launch import REPO

HAS_TE = importlib.util.find_spec("transformer_engine") is not None
HAS_INSPECT = importlib.util.find_spec("nvdlfw_inspect") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not HAS_TE, reason="Transformer Engine not installed")]
TINY = "examples/configs/tiny_cpu.yaml"
BASE = ["precision.bf16=true", "model.transformer_impl=transformer_engine", "model.attention_backend=te",
        "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
        "model.mrope_section=[8,8,8]", "training.train_iters=6", "training.global_batch_size=4",
        "data.max_seq_len=512", "precision.fp8_backend=te"]
STEPS, INTERVAL = 6, 3
SCHEMA = ("iteration", "layer", "gemm", "tensor", "fp8", "recipe", "dtype", "amax", "scale", "scale_min", "scale_max",
          "underflow_pct", "overflow_pct", "mse", "kurtosis", "numel")
RECIPES = [("delayed", "hybrid"), ("tensorwise", "hybrid"), ("blockwise", "e4m3"), ("mxfp8", "e4m3")]


def _runs_here(recipe: str) -> bool:
    return torch.cuda.get_device_capability() >= MIN_CAPABILITY[("te", recipe)]


def _train(*overrides):
    run_dir = Path(tempfile.mkdtemp(prefix="genlip-gpu-fp8-te-"))
    cmd = [sys.executable, "-m", "genlip_mcore.train", "--config", TINY, f"training.run_dir={run_dir}", *BASE,
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([-\d.E+e]+)", proc.stdout)]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    return run_dir


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "fp8_stats.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe,fmt", RECIPES)
def test_te_recipe_trains(recipe, fmt):
    if not _runs_here(recipe):
        pytest.skip(f"{recipe} on TE needs compute capability {MIN_CAPABILITY[('te', recipe)]}")
    stats = [f"logging.fp8_stats_interval={INTERVAL}"] if HAS_INSPECT else []
    run_dir = _train(f"precision.fp8={fmt}", f"precision.fp8_recipe={recipe}", *stats)
    if not HAS_INSPECT:
        return
    rows = _rows(run_dir)
    assert rows and all(tuple(r) == SCHEMA for r in rows)
    layers = sorted({r["layer"] for r in rows})
    assert layers == list(range(1, len(layers) + 1))
    keys = {(r["iteration"], r["layer"], r["gemm"], r["tensor"]) for r in rows}
    assert keys == {(i, k, g, t) for i in range(INTERVAL, STEPS + 1, INTERVAL) for k in layers
                    for g in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
                    for t in ("activation", "weight", "gradient")}
    for r in rows:
        assert r["fp8"] and r["recipe"] == recipe
        assert r["dtype"] == ("e5m2" if fmt == "hybrid" and r["tensor"] == "gradient" else "e4m3")
        assert r["amax"] > 0 and 0 < r["scale_min"] <= r["scale_max"] and 0 <= r["underflow_pct"] <= 100
        assert r["mse"] >= 0 and (r["overflow_pct"] is not None) == (recipe == "delayed")


@pytest.mark.skipif(not HAS_INSPECT, reason="nvdlfw-inspect not installed (the statistics show the BF16 layers)")
def test_attn_bf16_recipe_runs_attention_in_high_precision():
    if not _runs_here("tensorwise"):
        pytest.skip("tensorwise on TE needs compute capability 8.9")
    run_dir = _train("precision.fp8=hybrid", "precision.fp8_recipe=tensorwise",
                     f"precision.quant_recipe_file={REPO / 'examples/fp8/attn_bf16.yaml'}",
                     f"logging.fp8_stats_interval={INTERVAL}")
    fp8 = {(r["gemm"], r["fp8"]) for r in _rows(run_dir)}
    assert fp8 == {("linear_qkv", False), ("linear_proj", False), ("linear_fc1", True), ("linear_fc2", True)}
