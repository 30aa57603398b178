"""The emulated FP8 linear: its three GEMMs against a hand-written reference of the usage table (gemm.py), against
torchao's emulated Float8Linear (tensorwise, rowwise) and MXFP8Linear, and its delayed-scaling and stats plumbing."""

import dataclasses
import math

import pytest
import torch

from genlip_mcore.model.fp8.gemm import GemmState, fp8_linear
from genlip_mcore.model.fp8.quant import RECIPES, Recipe, quantize
from genlip_mcore.model.fp8.stats import StatsAccumulator

M, K, N = 256, 384, 256          # multiples of 128: every recipe's blocks tile the operands


def operands(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, M // 2, K, generator=g) * 2.0
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    dy = torch.randn(2, M // 2, N, generator=g) * 1e-3
    return x.to(dtype), w.to(dtype), dy.to(dtype)


def run(x, w, dy, state):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = fp8_linear(x, w, state)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def reference(x, w, dy, recipe, scales=None):
    """The usage table written out with `quantize` and fp32 matmuls; `scales` = delayed (sx, sw, sdy)."""
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    sx, sw, sdy = scales or (None, None, None)
    if recipe.per_tensor:
        qx, qw, qdy = (quantize(t, recipe, r, scale=s).dq for t, r, s in
                       ((x2, "activation", sx), (w, "weight", sw), (dy2, "gradient", sdy)))
        y, dx, dw = qx @ qw.t(), qdy @ qw, qdy.t() @ qx
    else:
        y = quantize(x2, recipe, "activation", "rowwise").dq @ quantize(w, recipe, "weight", "rowwise").dq.t()
        dx = quantize(dy2, recipe, "gradient", "rowwise").dq @ quantize(w, recipe, "weight", "columnwise").dq
        dw = quantize(dy2, recipe, "gradient", "columnwise").dq.t() @ \
            quantize(x2, recipe, "activation", "columnwise").dq
    return y.reshape(2, M // 2, N), dx.reshape(x.shape), dw


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("name", RECIPES)
def test_three_gemms_match_usage_table(name, fmt):
    recipe = Recipe(name, fmt=fmt)
    x, w, dy = operands()
    state = GemmState(recipe)
    y, dx, dw = run(x, w, dy, state)
    ones = (torch.tensor(1.0),) * 3 if name == "delayed" else None       # delayed: scale 1 before any update
    ry, rdx, rdw = reference(x, w, dy, recipe, ones)
    close(y, ry), close(dx, rdx), close(dw, rdw)
    assert y.dtype == dx.dtype == dw.dtype == torch.float32
    hp = x @ w.t()
    assert 1e-3 < (y - hp).norm() / hp.norm() < 0.1                    # it really is FP8


def test_delayed_uses_updated_scales_and_records_once():
    recipe = Recipe("delayed", fmt="hybrid")
    x, w, dy = operands()
    state = GemmState(recipe)
    run(x, w, dy, state)
    amax = torch.tensor([x.abs().max(), w.abs().max(), dy.abs().max()])
    assert torch.equal(state.delayed.pending(), amax)
    state.delayed.update(state.delayed.pending())
    x2, w2, dy2 = operands(seed=1)
    y, dx, dw = run(x2, w2, dy2, state)
    scales = tuple(state.delayed.scale(r) for r in ("activation", "weight", "gradient"))
    assert scales[0].item() == pytest.approx(448.0 / amax[0].item())
    ry, rdx, rdw = reference(x2, w2, dy2, recipe, scales)
    close(y, ry), close(dx, rdx), close(dw, rdw)

    # activation recompute: the re-forward records nothing (the backward still records dY, once)
    state.delayed.update(state.delayed.pending())
    state.record_amax = False
    fp8_linear(x, w, state)
    assert torch.equal(state.delayed.pending(), torch.zeros(3))


def test_usages_per_tensor_and_block_recipes():
    x, w, _ = operands()
    x2 = x.reshape(-1, K)
    for name in ("delayed", "tensorwise"):
        r, c = (quantize(x2, Recipe(name), "activation", u) for u in ("rowwise", "columnwise"))
        assert torch.equal(r.scale, c.scale) and torch.equal(r.dq, c.dq)
    for name in ("blockwise", "mxfp8", "rowwise"):
        r, c = (quantize(x2, Recipe(name), "activation", u) for u in ("rowwise", "columnwise"))
        assert not torch.equal(r.dq, c.dq), name
    r, c = (quantize(w, Recipe("blockwise"), "weight", u) for u in ("rowwise", "columnwise"))
    assert torch.equal(r.dq, c.dq) and torch.equal(r.scale, c.scale)


@pytest.mark.parametrize("name", RECIPES)
def test_fp8_wgrad_false_gives_high_precision_dw(name):
    x, w, dy = operands()
    _, _, dw = run(x, w, dy, GemmState(Recipe(name, fp8_wgrad=False)))
    assert torch.equal(dw, dy.reshape(-1, N).t() @ x.reshape(-1, K))


def test_disabled_is_plain_matmul_and_keeps_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        x, w, dy = operands(dtype=dtype)
        stats = StatsAccumulator()
        y, dx, dw = run(x, w, dy, GemmState(Recipe("tensorwise"), enabled=False, stats=stats))
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        yr = xr.reshape(-1, K) @ wr.t()
        yr.backward(dy.reshape(-1, N))
        assert torch.equal(y.reshape(-1, N), yr) and torch.equal(dx, xr.grad.reshape(x.shape))
        assert torch.equal(dw, wr.grad) and dw.dtype == dtype
        s = stats.summary()
        assert set(s) == {"activation", "weight", "gradient"} and not s["gradient"]["fp8"]
        assert s["weight"]["mse"] is None and s["weight"]["numel"] == N * K


def test_bf16_inputs_give_bf16_outputs():
    x, w, dy = operands(dtype=torch.bfloat16)
    y, dx, dw = run(x, w, dy, GemmState(Recipe("mxfp8")))
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    ry, rdx, rdw = reference(x, w, dy, Recipe("mxfp8"))
    for got, want in ((y, ry), (dx, rdx), (dw, rdw)):                  # fp32 GEMMs, one rounding to bf16
        assert (got.float() - want).abs().max() <= want.abs().max() * 2 ** -8


def torchao_float8_linear(recipe_name):
    pytest.importorskip("torchao")
    from torchao.float8.config import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe_name), emulate=True)

    def make(w):
        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        return Float8Linear.from_float(lin, config=config)
    return make


@pytest.mark.parametrize("name,fmt", [("tensorwise", "hybrid"), ("rowwise", "e4m3")])
def test_vs_torchao_float8_linear(name, fmt):
    x, w, dy = operands()
    y, dx, dw = run(x, w, dy, GemmState(Recipe(name, fmt=fmt, power_2_scales=False)))
    lin = torchao_float8_linear(name)(w)
    xr = x.clone().requires_grad_(True)
    yr = lin(xr)
    yr.backward(dy)
    close(y, yr.detach()), close(dx, xr.grad), close(dw, lin.weight.grad)


def test_mxfp8_vs_torchao_mxfp8_linear_bit_exact():
    pytest.importorskip("torchao")
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
    x, w, dy = operands()
    y, dx, dw = run(x, w, dy, GemmState(Recipe("mxfp8", fmt="e4m3")))     # torchao: E4M3 for dY too
    lin = MXFP8Linear(K, N, bias=False, kernel_preference=KernelPreference.EMULATED)
    lin.weight.data.copy_(w)
    xr = x.clone().requires_grad_(True)
    yr = lin(xr)
    yr.backward(dy)
    assert torch.equal(y, yr.detach()) and torch.equal(dx, xr.grad) and torch.equal(dw, lin.weight.grad)


def test_stats_counts_on_constructed_tensor():
    acc = StatsAccumulator()
    tiny = 2.0 ** -9
    x = torch.tensor([[tiny * 0.4, 0.0, 1.0, 500.0, -449.0, 448.0, 2.0, -2.0]])
    q = quantize(x, Recipe("delayed", fmt="e4m3"), "activation", scale=torch.tensor(1.0))
    acc.add("activation", x, q)
    s = acc.summary()["activation"]
    assert s["fp8"] and s["recipe"] == "delayed" and s["dtype"] == "e4m3" and s["numel"] == 8
    assert s["underflow_pct"] == 100 * 1 / 8 and s["overflow_pct"] == 100 * 2 / 8
    assert s["amax"] == 500.0 and s["scale"] == s["scale_min"] == s["scale_max"] == 1.0
    assert s["mse"] == pytest.approx(((q.dq.double() - x.double()) ** 2).mean().item(), rel=1e-12)
    xd = x.double().reshape(-1)
    c = xd - xd.mean()
    assert s["kurtosis"] == pytest.approx(((c ** 4).mean() / (c ** 2).mean() ** 2).item(), rel=1e-9)
    assert set(acc.summary()) == {"activation"}
    acc.reset()
    assert acc.summary() == {}


def test_stats_vector_round_trip_and_reduction():
    g = torch.Generator().manual_seed(3)
    a_x, b_x = torch.randn(128, 256, generator=g), torch.randn(128, 256, generator=g) ** 3
    recipe = Recipe("blockwise", fmt="hybrid")

    def acc_over(*parts):
        acc = StatsAccumulator()
        for p in parts:
            acc.add("activation", p, quantize(p, recipe, "activation"))
            acc.add("gradient", p * 1e-4, quantize(p * 1e-4, recipe, "gradient"))
        return acc
    a, b, both = acc_over(a_x), acc_over(b_x), acc_over(torch.cat([a_x, b_x]))
    t = a.to_tensor()
    assert t.dtype == torch.float64 and t.shape == StatsAccumulator().to_tensor().shape
    back = StatsAccumulator()
    back.load_tensor(t)
    assert back.summary() == a.summary()

    ops = StatsAccumulator.reduce_ops()
    assert sorted(torch.cat(list(ops.values())).tolist()) == list(range(t.numel()))
    ta, tb, red = a.to_tensor(), b.to_tensor(), a.to_tensor()
    red[ops["sum"]] = ta[ops["sum"]] + tb[ops["sum"]]
    red[ops["max"]] = torch.maximum(ta[ops["max"]], tb[ops["max"]])
    red[ops["min"]] = torch.minimum(ta[ops["min"]], tb[ops["min"]])
    merged = StatsAccumulator()
    merged.load_tensor(red)
    got, want = merged.summary(), both.summary()
    for role in ("activation", "gradient"):
        for key in ("amax", "underflow_pct", "overflow_pct", "mse", "kurtosis", "numel", "scale_min", "scale_max"):
            assert got[role][key] == pytest.approx(want[role][key], rel=1e-9), (role, key)
        assert got[role]["dtype"] == ("e4m3" if role == "activation" else "e5m2")


def _split_gemms(x, w, dy, state, k1, n1):
    """The GEMMs as TP runs them: fprop summed over two K shards (the row layer), dgrad over two N shards (the column
    layer), each shard a GEMM of its own whose partial results are added in the GEMM's output dtype."""
    def part(xs, ws, dys):
        xs, ws = xs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        fp8_linear(xs, ws, state).backward(dys)
        return xs.grad
    y = fp8_linear(x[..., :k1], w[:, :k1], state) + fp8_linear(x[..., k1:], w[:, k1:], state)
    xg = x.clone().requires_grad_(True)
    dx = None
    for sl in (slice(None, n1), slice(n1, None)):           # dX partials in the GEMM's own dX dtype
        xg.grad = None
        xd = xg.double() if state.fp64 else xg
        xd.retain_grad()
        fp8_linear(xd, w[sl], state).backward(dy[..., sl])
        dx = xd.grad if dx is None else dx + xd.grad
    return y, dx


@pytest.mark.parametrize("name", ["blockwise", "mxfp8"])
def test_fp64_sums_make_split_contractions_exact(name):
    """precision.fp8_tp_invariant: with float64 accumulation and float64 partial sums, splitting a contraction on
    block boundaries (as TP does) gives the unsplit GEMM's fp32 result bit for bit; with fp32 accumulation it does
    not. Per-tensor recipes are not split-invariant even so: each shard gets its own scale (with power-of-two scales
    only the values near the bottom of the FP8 range then round differently)."""
    recipe = Recipe(name)
    x, w, dy = operands()
    y, dx, dw = run(x, w, dy, GemmState(recipe, fp64=True))
    assert y.dtype == torch.float64 and dx.dtype == dw.dtype == torch.float32     # dX rounded by autograd to x's
    ry, rdx, rdw = reference(x, w, dy, recipe)
    close(y.float(), ry), close(dx, rdx), close(dw, rdw)
    sy, sdx = _split_gemms(x, w, dy, GemmState(recipe, fp64=True), k1=128, n1=128)
    assert torch.equal(sy.float(), y.float()) and torch.equal(sdx.float(), dx)
    fy, fdx = _split_gemms(x, w, dy, GemmState(recipe), k1=128, n1=128)         # fp32: summation order shows
    y32, dx32, _ = run(x, w, dy, GemmState(recipe))
    assert not torch.equal(fy, y32) and not torch.equal(fdx, dx32)


def test_fp64_disabled_gemm_is_float64_matmul():
    x, w, dy = operands()
    y, dx, dw = run(x, w, dy, GemmState(Recipe("blockwise"), enabled=False, fp64=True))
    x64, w64 = x.double().reshape(-1, K), w.double()
    assert torch.equal(y.reshape(-1, N), x64 @ w64.t())
    assert torch.equal(dx, (dy.double().reshape(-1, N) @ w64).float().reshape(x.shape))
    assert torch.equal(dw, (dy.double().reshape(-1, N).t() @ x64).float())
