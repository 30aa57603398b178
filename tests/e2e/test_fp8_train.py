"""FP8 training on CPU, end to end through `python -m genlip_mcore.train`: every emulated recipe and torchao's real
FP8 GEMMs train the tiny model (hidden 128 so that 128-blocks fit), write fp8_stats.jsonl with the documented
schema for every layer x GEMM x tensor, keep the first and last layer in high precision when asked, save
checkpoints that a plain model loads, and record delayed amaxes once per micro-batch under full recompute."""

import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.distributed.launch import REPO

TINY = "examples/configs/tiny_cpu.yaml"
SMALL = ["model.hidden_size=128", "model.ffn_hidden_size=256", "model.num_attention_heads=4",
         "training.train_iters=4", "training.global_batch_size=2", "data.max_seq_len=256"]
KEYS = ["iteration", "layer", "gemm", "tensor", "fp8", "recipe", "dtype", "amax", "scale", "scale_min", "scale_max",
        "underflow_pct", "overflow_pct", "mse", "kurtosis", "numel"]
GEMMS = {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}


def _train(*overrides, timeout=600):
    run_dir = Path(tempfile.mkdtemp(prefix="genlip-fp8-"))
    cmd = [sys.executable, "-m", "genlip_mcore.train", "--config", TINY, f"training.run_dir={run_dir}", *SMALL,
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([-\d.E+e]+)", proc.stdout)]
    return run_dir, losses


CASES = {   # name: (backend, recipe, format)
    "emulate_delayed": ("emulate", "delayed", "hybrid"),
    "emulate_tensorwise": ("emulate", "tensorwise", "hybrid"),
    "emulate_blockwise": ("emulate", "blockwise", "e4m3"),
    "emulate_blockwise_tpinv": ("emulate", "blockwise", "e4m3"),     # + precision.fp8_tp_invariant (float64 sums)
    "emulate_mxfp8": ("emulate", "mxfp8", "e4m3"),
    "emulate_rowwise": ("emulate", "rowwise", "e4m3"),
    "torchao_tensorwise": ("torchao", "tensorwise", "hybrid"),
    "torchao_rowwise": ("torchao", "rowwise", "e4m3"),
}


# torchao's real FP8 GEMMs run on CPU through torch's CPU _scaled_mm, a slow reference kernel (~30 s per step at
# the SMALL sizes): its cases run narrower and shorter rows.
TORCHAO_SMALLER = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.mrope_section=[2,2,2]",
                   "data.max_seq_len=128"]


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, (backend, recipe, fmt) in CASES.items():
        smaller = TORCHAO_SMALLER if backend == "torchao" else []
        if name.endswith("_tpinv"):
            smaller = ["precision.fp8_tp_invariant=true"]
        out[name] = _train(*smaller, f"precision.fp8={fmt}", f"precision.fp8_recipe={recipe}",
                           f"precision.fp8_backend={backend}", "logging.fp8_stats_interval=2",
                           "precision.first_last_layers_bf16=true")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_trains_and_writes_stats(runs, name):
    backend, recipe, fmt = CASES[name]
    run_dir, losses = runs[name]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    rows = [json.loads(line) for line in (run_dir / "fp8_stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 4 * 3                               # iterations 2 and 4 x layers x GEMMs x tensors
    seen = {(r["iteration"], r["layer"], r["gemm"], r["tensor"]) for r in rows}
    assert seen == {(i, n, g, t) for i in (2, 4) for n in (1, 2, 3, 4) for g in GEMMS
                    for t in ("activation", "weight", "gradient")}
    for r in rows:
        assert list(r) == KEYS
        assert r["fp8"] is (r["layer"] in (2, 3)), r                  # first and last layer in high precision
        assert r["amax"] > 0 and r["numel"] > 0 and isinstance(r["kurtosis"], float)
        if r["fp8"]:
            dtype = "e5m2" if fmt == "hybrid" and r["tensor"] == "gradient" else "e4m3"
            assert (r["recipe"], r["dtype"]) == (recipe, dtype), r
            assert 0 <= r["underflow_pct"] <= 100 and 0 <= r["overflow_pct"] <= 100 and r["mse"] >= 0
            assert 0 < r["scale_min"] <= r["scale"] <= r["scale_max"] or recipe == "delayed"
        else:
            assert all(r[k] is None for k in ("recipe", "dtype", "scale", "scale_min", "scale_max",
                                              "underflow_pct", "overflow_pct", "mse")), r


@pytest.mark.parametrize("name", ["emulate_blockwise", "emulate_blockwise_tpinv"])
def test_emulate_checkpoint_loads_into_a_plain_model(runs, name):
    """Same parameter names on every backend: a plain (no FP8) run starts from the emulate checkpoint, strictly."""
    run_dir, _ = runs[name]
    ckpt = sorted((run_dir / "checkpoints").glob("iter_*"))[-1]
    _, losses = _train(f"training.init_from={ckpt}", "training.train_iters=1")
    assert len(losses) == 1 and math.isfinite(losses[0])


COUNT_RECORDS = r"""
import collections, sys
from genlip_mcore.model.fp8 import quant
counts = collections.Counter()
record = quant.DelayedScales.record
def counted(self, role, amax):
    counts[role] += 1
    record(self, role, amax)
quant.DelayedScales.record = counted
from genlip_mcore.train.__main__ import main
rc = main(sys.argv[1:])
print("RECORDS", dict(counts))
sys.exit(rc)
"""


def test_delayed_records_once_per_micro_batch_under_full_recompute():
    run_dir = tempfile.mkdtemp(prefix="genlip-fp8-")
    cmd = [sys.executable, "-c", COUNT_RECORDS, "--config", TINY, f"training.run_dir={run_dir}", *SMALL,
           "training.train_iters=2", "precision.fp8=hybrid", "precision.fp8_recipe=delayed",
           "precision.fp8_backend=emulate", "model.recompute_granularity=full", "model.recompute_method=uniform",
           "model.recompute_num_layers=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = eval(proc.stdout.split("RECORDS", 1)[1].strip())         # {role: records}
    per_role = 2 * 2 * 4 * 4               # steps x micro-batches x layers x GEMMs: one record each, no replay
    assert counts == {"activation": per_role, "weight": per_role, "gradient": per_role}


PLAIN_SPEC = r"""
import sys
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from genlip_mcore import config as C
from genlip_mcore.model.spec import layer_spec, transformer_config
for overrides, linears in (([], None), (["precision.fp8=hybrid", "precision.fp8_backend=emulate"], "emulate")):
    t = transformer_config(C.load(sys.argv[1], overrides), use_cpu_initialization=True)
    assert t.fp8 is None and t.genlip_fp8_linears == linears        # megatron never sees fp8 on our backends
    sub = layer_spec(t.transformer_impl, t.ffn_hidden_size, t.genlip_fp8_linears).submodules
    types = (sub.self_attention.submodules.linear_qkv, sub.self_attention.submodules.linear_proj,
             sub.mlp.submodules.linear_fc1, sub.mlp.submodules.linear_fc2)
    plain = (ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear)
    assert (types == plain) is (linears is None), types
print("OK")
"""


def test_plain_spec_is_megatrons_own():
    """Without precision.fp8 the local spec builds megatron's own linears; with emulate, megatron's fp8 stays off."""
    proc = subprocess.run([sys.executable, "-c", PLAIN_SPEC, TINY], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
