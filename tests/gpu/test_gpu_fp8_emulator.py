"""The FP8 emulator's GEMM (fp32 matmul of dequantized operands) against the hardware FP8 GEMM, torch._scaled_mm, on
GenLIP's linear shapes: this bounds the accumulation gap that the CPU emulator does not model.

Both are compared with the exact product of the same FP8 operands (fp64 matmul of the dequantized values; FP8
products are exact and K <= 4096 terms fit fp64 without rounding worth counting). Expected error, relative to the
largest |output|: fp32 accumulation ~ sqrt(K) * 2**-24 per output (< 1e-6 at K = 4096), plus, for _scaled_mm with
per-tensor scales, one rounding of 1/scale (2**-24); hence the 1e-5 bound for the emulator and for
use_fast_accum=False. Measured on CPU (M=256, outlier channels as below): emulator vs exact 1.1e-6 (tensorwise,
K=1152..4096) and 2.4e-7 (rowwise); CPU _scaled_mm 2.7e-6 (tensorwise). Hopper's fast accumulation keeps partial sums in ~14-bit-mantissa precision (DeepSeek-V3
report), so use_fast_accum=True is bounded at 5e-3.
"""

import math

import pytest
import torch

from genlip_mcore.model.fp8.quant import Recipe, quantize

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

M = 4096                                               # tokens of one micro-batch
SHAPES = {"l16.qkv": (1152, 4608), "l16.proj": (1152, 1152), "l16.fc1": (1152, 5504), "l16.fc2": (2752, 1152),
          "g16.qkv": (1536, 6144), "g16.fc2": (4096, 1536)}     # (K, N)
BOUND = {False: 1e-5, True: 5e-3}                      # by use_fast_accum
BF16_OUT_BOUND = 8e-3                                  # one bf16 rounding of the output (2**-8 relative)


@pytest.fixture(autouse=True)
def no_tf32():
    """The emulator's fp32 matmul must be IEEE fp32, not TF32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def needs_fp8_gemm():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need SM89 or newer")


def operands(k, n):
    g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    x = torch.randn(M, k, device="cuda", generator=g)
    x[:, :8] *= 20.0                                   # a few outlier channels, as activations have
    w = torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)
    return x, w


def rel_err(got, exact):
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


def scaled_mm(qx, qw, scale_a, scale_b, fast, out_dtype=torch.float32):
    # mat2 must be column-major: the transpose of the row-major [N, K] payload is
    return torch._scaled_mm(qx.data, qw.data.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                            use_fast_accum=fast)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tensorwise_emulator_vs_scaled_mm(shape):
    needs_fp8_gemm()
    k, n = SHAPES[shape]
    x, w = operands(k, n)
    recipe = Recipe("tensorwise", fmt="e4m3")
    qx, qw = quantize(x, recipe, "activation"), quantize(w, recipe, "weight")
    exact = qx.dq.double() @ qw.dq.double().t()
    assert rel_err(qx.dq @ qw.dq.t(), exact) <= BOUND[False]
    for fast in (False, True):
        # _scaled_mm's scales dequantize: the reciprocal of ours
        out = scaled_mm(qx, qw, qx.scale.reciprocal(), qw.scale.reciprocal(), fast)
        assert rel_err(out, exact) <= BOUND[fast], (shape, fast)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_rowwise_emulator_vs_scaled_mm(shape):
    needs_fp8_gemm()
    k, n = SHAPES[shape]
    x, w = operands(k, n)
    recipe = Recipe("rowwise", fmt="e4m3")
    qx, qw = quantize(x, recipe, "activation"), quantize(w, recipe, "weight")      # scales [M, 1] and [N, 1]
    exact = qx.dq.double() @ qw.dq.double().t()
    assert rel_err(qx.dq @ qw.dq.t(), exact) <= BOUND[False]
    scale_a, scale_b = qx.scale.reciprocal(), qw.scale.reciprocal().t().contiguous()   # [M, 1], [1, N]
    for fast in (False, True):
        try:
            out, bound = scaled_mm(qx, qw, scale_a, scale_b, fast), BOUND[fast]
        except RuntimeError as e:                        # some builds allow only bf16 output with row-wise scales
            if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
                raise
            out = scaled_mm(qx, qw, scale_a, scale_b, fast, torch.bfloat16)
            bound = max(BOUND[fast], BF16_OUT_BOUND)
        assert rel_err(out, exact) <= bound, (shape, fast)
