"""FP8 quantizers of the emulate backend against torchao (tensorwise, rowwise, MXFP8 RCEIL: bit-exact), against TE's
blockwise formula written out here, and TE's delayed-scaling history rules."""

import math
from types import SimpleNamespace

import pytest
import torch

from genlip_mcore.model.fp8.quant import FP8_DTYPES, DelayedScales, Recipe, e8m0_scale, pow2_floor, quantize

FMTS = {"e4m3": ("e4m3", "activation"), "e5m2": ("hybrid", "gradient")}   # recipe fmt and role giving that dtype


def tensors():
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(256, 384, generator=g)
    # six decades of magnitude, shuffled, with both signs: exercises underflow of per-tensor scaling
    mags = torch.logspace(-5, 1, 256 * 384)[torch.randperm(256 * 384, generator=g)].reshape(256, 384)
    sign = torch.where(torch.rand(256, 384, generator=g) < 0.5, -1.0, 1.0)
    return {"randn": rnd * 3.0, "logspaced": mags * sign}


def recipe_for(name, dtype_name, **kw):
    fmt, role = FMTS[dtype_name]
    return Recipe(name, fmt=fmt, **kw), role


@pytest.mark.parametrize("dtype_name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("power_2", [False, True])
def test_tensorwise_bit_exact_vs_torchao(dtype_name, power_2):
    fu = pytest.importorskip("torchao.float8.float8_utils")
    recipe, role = recipe_for("tensorwise", dtype_name, power_2_scales=power_2)
    dt = FP8_DTYPES[dtype_name]
    for name, x in tensors().items():
        s = fu.tensor_to_scale(x, dt, round_scales_to_power_of_2=power_2)
        ref = fu.to_fp8_saturated(x * s, dt).float() / s
        q = quantize(x, recipe, role)
        assert q.dtype == dt and q.scale.shape == ()
        assert torch.equal(q.scale, s), name
        assert torch.equal(q.dq, ref), f"{name}: max diff {(q.dq - ref).abs().max()}"


@pytest.mark.parametrize("dtype_name", ["e4m3", "e5m2"])
def test_mxfp8_bit_exact_vs_torchao_rceil(dtype_name):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    recipe, role = recipe_for("mxfp8", dtype_name)
    dt = FP8_DTYPES[dtype_name]
    for name, x in tensors().items():
        for usage, src in (("rowwise", x), ("columnwise", x.t().contiguous())):
            ref = mx.MXTensor.to_mx(src, dt, 32, scaling_mode=mx.ScaleCalculationMode.RCEIL).dequantize(torch.float32)
            if usage == "columnwise":
                ref = ref.t()
            q = quantize(x, recipe, role, usage)
            assert q.scale.shape == ((256, 12) if usage == "rowwise" else (8, 384))
            assert torch.equal(q.dq, ref), f"{name} {usage}: max diff {(q.dq - ref).abs().max()}"


@pytest.mark.parametrize("dtype_name", ["e4m3", "e5m2"])
def test_rowwise_bit_exact_vs_torchao_axiswise(dtype_name):
    fu = pytest.importorskip("torchao.float8.float8_utils")
    from torchao.float8.config import ScalingGranularity
    recipe, role = recipe_for("rowwise", dtype_name)
    dt = FP8_DTYPES[dtype_name]
    for name, x in tensors().items():
        for usage, dim in (("rowwise", -1), ("columnwise", 0)):
            s = fu.tensor_to_scale(x, dt, scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=dim,
                                   round_scales_to_power_of_2=True)
            ref = fu.to_fp8_saturated(x * s, dt).float() / s
            q = quantize(x, recipe, role, usage)
            assert torch.equal(q.scale, s), f"{name} {usage}"
            assert torch.equal(q.dq, ref), f"{name} {usage}"


def blockwise_reference(x, dt, br, bc):
    """TE Float8BlockScaling written out: s = 2**floor(log2(FP8_MAX / amax_block)) in float64, zero block -> 1."""
    fmax = torch.finfo(dt).max
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], br):
        for j in range(0, x.shape[1], bc):
            blk = x[i:i + br, j:j + bc]
            amax = blk.abs().max().item()
            s = 2.0 ** math.floor(math.log2(fmax / amax)) if amax > 0 else 1.0
            out[i:i + br, j:j + bc] = (blk * s).clamp(-fmax, fmax).to(dt).float() / s
    return out


@pytest.mark.parametrize("dtype_name", ["e4m3", "e5m2"])
def test_blockwise_vs_te_formula(dtype_name):
    recipe, role = recipe_for("blockwise", dtype_name)
    dt = FP8_DTYPES[dtype_name]
    x = tensors()["logspaced"]
    assert torch.equal(quantize(x, recipe, role, "rowwise").dq, blockwise_reference(x, dt, 1, 128))
    assert torch.equal(quantize(x, recipe, role, "columnwise").dq, blockwise_reference(x, dt, 128, 1))
    w = tensors()["randn"]
    tile = blockwise_reference(w, torch.float8_e4m3fn, 128, 128)
    for usage in ("rowwise", "columnwise"):
        qw = quantize(w, Recipe("blockwise", fmt="hybrid"), "weight", usage)
        assert qw.scale.shape == (2, 3)
        assert torch.equal(qw.dq, tile)


def test_partial_blocks_are_scaled_from_their_real_elements():
    x = tensors()["randn"][:200, :300]
    dt = torch.float8_e4m3fn
    for usage, (br, bc) in (("rowwise", (1, 128)), ("columnwise", (128, 1))):
        assert torch.equal(quantize(x, Recipe("blockwise"), "activation", usage).dq,
                           blockwise_reference(x, dt, br, bc))
    assert torch.equal(quantize(x, Recipe("blockwise"), "weight").dq, blockwise_reference(x, dt, 128, 128))


@pytest.mark.parametrize("dtype_name", ["e4m3", "e5m2"])
def test_saturation_clips_never_inf(dtype_name):
    recipe, role = recipe_for("delayed", dtype_name)
    fmax = torch.finfo(FP8_DTYPES[dtype_name]).max
    x = torch.tensor([[1e6, -1e6, 2 * fmax, fmax, 1.0, 0.0, -3e38, float("inf")]])
    q = quantize(x, recipe, role, scale=torch.tensor(1.0))      # a stale delayed scale: values beyond range
    assert torch.isfinite(q.dq).all()
    assert q.dq[0, :5].tolist() == [fmax, -fmax, fmax, fmax, 1.0]
    assert q.dq[0, 6] == -fmax and q.dq[0, 7] == fmax
    assert q.n_overflow.item() == 5                             # 1e6, -1e6, 2 max, -3e38, inf; max itself fits
    q2 = quantize(x[:, :6], recipe, role, scale=torch.tensor(0.5))   # clip level in input units: max / 0.5
    assert q2.dq[0, :3].tolist() == [2 * fmax, -2 * fmax, 2 * fmax] and q2.n_overflow.item() == 2


@pytest.mark.parametrize("name", ["tensorwise", "blockwise", "mxfp8", "rowwise"])
def test_zero_blocks_scale_one_no_nan(name):
    x = torch.zeros(256, 256)
    g = torch.Generator().manual_seed(1)
    x[128:, 128:] = (torch.rand(128, 128, generator=g) + 0.5) * torch.randn(128, 128, generator=g).sign()   # no underflow
    recipe = Recipe(name, fmt="hybrid")
    for role in ("activation", "weight", "gradient"):
        for usage in ("rowwise", "columnwise"):
            q = quantize(x, recipe, role, usage)
            assert torch.isfinite(q.dq).all() and torch.isfinite(q.scale).all()
            assert (q.dq[:128] == 0).all() and q.n_underflow.item() == 0
            if name != "tensorwise":
                assert (q.scale == 1.0).any()
    q = quantize(torch.zeros(64, 64), recipe, "activation")
    assert (q.scale == 1.0).all() and (q.dq == 0).all() and q.amax.item() == 0.0


def test_exact_power_of_two_rules():
    below = torch.nextafter(torch.tensor(1024.0), torch.tensor(0.0))
    assert pow2_floor(below).item() == 512.0 and pow2_floor(torch.tensor(1024.0)).item() == 1024.0
    # E8M0: amax / 448 exactly 2**k keeps k; the smallest step above rounds up (cuBLAS / TE: round toward +inf)
    fmax = 448.0
    amax = torch.tensor([fmax * 4, torch.nextafter(torch.tensor(fmax * 4), torch.tensor(1e9)).item(), 0.0])
    assert e8m0_scale(amax, torch.float8_e4m3fn).tolist() == [0.25, 0.125, 1.0]


def test_underflow_overflow_counts():
    recipe = Recipe("delayed", fmt="e4m3")
    # scale 1: E4M3's smallest subnormal is 2**-9; half of it rounds to zero (ties to even), 0.75 of it does not
    tiny = 2.0 ** -9
    x = torch.tensor([[tiny * 0.4, -tiny * 0.5, tiny * 0.75, 0.0, 1.0, 500.0, -449.0, 448.0]])
    q = quantize(x, recipe, "activation", scale=torch.tensor(1.0))
    assert q.n_underflow.item() == 2 and q.n_overflow.item() == 2
    assert q.dq[0, 2].item() == tiny


def test_hybrid_and_e4m3_dtypes():
    hyb, e4 = Recipe("tensorwise"), Recipe("tensorwise", fmt="e4m3")
    assert [hyb.dtype(r) for r in ("activation", "weight", "gradient")] == \
        [torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e5m2]
    assert {e4.dtype(r) for r in ("activation", "weight", "gradient")} == {torch.float8_e4m3fn}
    assert (Recipe("blockwise").block, Recipe("mxfp8").block, Recipe("rowwise").block) == (128, 32, None)
    assert Recipe("delayed").per_tensor and not Recipe("rowwise").per_tensor
    with pytest.raises(ValueError, match="recipe"):
        Recipe("nvfp4")
    with pytest.raises(ValueError, match="per tensor"):
        quantize(torch.ones(4, 32), Recipe("mxfp8"), "activation", scale=torch.tensor(1.0))


def test_from_precision():
    pr = SimpleNamespace(fp8="e4m3", fp8_recipe="delayed", fp8_margin=2, fp8_amax_history_len=16,
                         fp8_amax_compute_algo="most_recent", fp8_power_2_scales=True, fp8_wgrad=False)
    assert Recipe.from_precision(pr) == Recipe("delayed", "e4m3", 2, 16, "most_recent", True, False)


def test_delayed_history_semantics():
    e4 = 448.0
    d = DelayedScales(Recipe("delayed", fmt="hybrid", amax_history_len=3))
    assert d.scale("activation").item() == 1.0 and d.scale("gradient").item() == 1.0   # TE: 1.0 before updates
    seq = [2.0, 8.0, 1.0, 0.5, 0.25]
    for a in seq:
        d.record("activation", torch.tensor(a / 2))
        d.record("activation", torch.tensor(a))                # pending keeps the max over calls
        assert d.pending().tolist() == [a, 0.0, 0.0]
        d.update(d.pending())
        assert d.pending().tolist() == [0.0, 0.0, 0.0]
    # window of 3: [0.25, 0.5, 1.0] after five pushes; 8.0 rolled out
    assert d.history[:, 0].tolist() == [0.25, 0.5, 1.0]
    assert d.scale("activation").item() == pytest.approx(e4 / 1.0)
    # roles never recorded keep their history and scale
    assert d.scale("weight").item() == 1.0 and (d.history[:, 1:] == 0).all()

    recent = DelayedScales(Recipe("delayed", amax_history_len=3, amax_compute_algo="most_recent", margin=1))
    for a in seq:
        recent.record("gradient", torch.tensor(a))
        recent.update(recent.pending())
    assert recent.scale("gradient").item() == 57344.0 / 0.25 / 2      # E5M2 under hybrid, margin 2**-1
    assert recent.scale("activation").item() == 1.0

    # a role recorded on another rank only (positive reduced amax) is updated too; zero amax keeps the scale
    d.update(torch.tensor([0.0, 4.0, 0.0]))
    assert d.scale("weight").item() == e4 / 4.0 and d.scale("activation").item() == pytest.approx(e4)
    d.record("activation", torch.tensor(0.0))
    d.update(d.pending())                                        # an all-zero tensor: pushed, window max still 0.5
    assert d.history[0, 0].item() == 0.0 and d.scale("activation").item() == e4 / 0.5

    sd = d.state_dict()
    d2 = DelayedScales(Recipe("delayed", fmt="hybrid", amax_history_len=3))
    d2.load_state_dict(sd)
    assert torch.equal(d2.history, d.history) and torch.equal(d2.scales, d.scales)
