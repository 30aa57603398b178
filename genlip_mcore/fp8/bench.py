"""`genlip-fp8 bench`: BF16 against FP8 GEMMs on the shapes of a GenLIP block, forward + backward, side by side.

The four linears of a layer, at tensor parallel size TP and M tokens per micro-batch (after the sequence-parallel
all-gather, so every TP rank sees all M):
  linear_qkv   K = D        N = 4D / TP   (q, output gate, k, v; column parallel)
  linear_proj  K = D / TP   N = D         (row parallel)
  linear_fc1   K = D        N = 2F / TP   (SwiGLU's two input projections; column parallel)
  linear_fc2   K = F / TP   N = D         (row parallel)
Each is timed as training runs it: three GEMMs, fprop Y = X W^T, dgrad dX = dY W, wgrad dW = dY^T X.

On a GPU with FP8 tensor cores (SM 8.9+) the FP8 side is torch._scaled_mm with current scaling, the quantization
included: amax, scale, saturating cast and the transposed copies the backward GEMMs need, as eager torch ops.
`tensorwise` is E4M3 activations and weights with E5M2 gradients (HYBRID); `rowwise` is E4M3 everywhere with a
scale per row of each operand (torchao's recipe), so X, W and dY are quantized once per GEMM layout. TE fuses these
casts, so "with quant" here is a pessimistic FP8 time and "GEMM only" an optimistic one: TE lands in between.

Without FP8 hardware (CPU, or a GPU below SM 8.9) the measured columns are FP32 matmuls against the emulated path
(quantize-dequantize, then FP32 matmuls) at a reduced M: they check that the shapes run, not speed. Every run also
prints a roofline estimate for an H100 SXM: 989 TFLOP/s BF16 dense, 1979 FP8, 3.35 TB/s; a GEMM takes
max(FLOPs / peak, bytes / bandwidth), and the casts are memory-bound passes over X, W and dY: 6 bytes per element
for unfused current scaling (read bf16 for the amax, read it again, write FP8 and its transpose) and 4 for a fused
cast-transpose with a known scale (delayed scaling).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from genlip_mcore.config import VARIANTS

H100 = {"bf16_tflops": 989.0, "fp8_tflops": 1979.0, "tb_per_s": 3.35}
CAST_BYTES = {"current": 6, "delayed": 4}      # per element of X, W, dY (see the module docstring)
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@dataclass(frozen=True)
class Gemm:
    name: str
    k: int
    n: int


def block_gemms(variant: str, tp: int = 1) -> list[Gemm]:
    v = VARIANTS[variant]
    d, f = v["hidden_size"], v["ffn_hidden_size"]
    for name, dim in (("hidden_size", d), ("4 x hidden_size", 4 * d), ("2 x ffn_hidden_size", 2 * f),
                      ("ffn_hidden_size", f)):
        if dim % tp:
            raise ValueError(f"--tp {tp} does not divide {variant}'s {name} ({dim})")
    return [Gemm("linear_qkv", d, 4 * d // tp), Gemm("linear_proj", d // tp, d),
            Gemm("linear_fc1", d, 2 * f // tp), Gemm("linear_fc2", f // tp, d)]


# ------------------------------------------------------------------------------------------------------------------
# Roofline (H100): pure arithmetic.
# ------------------------------------------------------------------------------------------------------------------
def _pass_ms(m: int, k: int, n: int, tflops: float, in_bytes: int, tb_per_s: float) -> float:
    """One GEMM [m, k] x [k, n] -> [m, n] (bf16 out): the slower of its FLOPs and its memory traffic."""
    flops = 2 * m * k * n
    traffic = in_bytes * (m * k + k * n) + 2 * m * n
    return 1e3 * max(flops / (tflops * 1e12), traffic / (tb_per_s * 1e12))


def roofline(g: Gemm, m: int, hw: dict = H100) -> dict:
    """fwd+bwd milliseconds of one linear in BF16 and in FP8 (GEMMs only, and with each cast model)."""
    passes = ((m, g.k, g.n), (m, g.n, g.k), (g.n, m, g.k))          # fprop, dgrad, wgrad as [m, k] x [k, n]
    bf16 = sum(_pass_ms(*p, hw["bf16_tflops"], 2, hw["tb_per_s"]) for p in passes)
    fp8 = sum(_pass_ms(*p, hw["fp8_tflops"], 1, hw["tb_per_s"]) for p in passes)
    elements = m * g.k + g.k * g.n + m * g.n                          # X, W, dY
    casts = {name: 1e3 * b * elements / (hw["tb_per_s"] * 1e12) for name, b in CAST_BYTES.items()}
    return {"bf16_ms": bf16, "fp8_gemm_ms": fp8, **{f"cast_{k}_ms": v for k, v in casts.items()},
            "gemm_only": bf16 / fp8, **{f"with_{k}_casts": bf16 / (fp8 + v) for k, v in casts.items()}}


def roofline_block(gemms: list[Gemm], m: int, hw: dict = H100) -> dict:
    rows = {g.name: roofline(g, m, hw) for g in gemms}
    bf16 = sum(r["bf16_ms"] for r in rows.values())
    fp8 = sum(r["fp8_gemm_ms"] for r in rows.values())
    block = {"bf16_ms": bf16, "fp8_gemm_ms": fp8, "gemm_only": bf16 / fp8}
    for k in CAST_BYTES:
        block[f"with_{k}_casts"] = bf16 / (fp8 + sum(r[f"cast_{k}_ms"] for r in rows.values()))
    return {"gemms": rows, "block": block}


# ------------------------------------------------------------------------------------------------------------------
# Quantization (eager torch ops) and the timed contenders.
# ------------------------------------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, dtype: torch.dtype, dim: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Current scaling: amax over the whole tensor (dim None) or along `dim` (one scale per row/column), scale
    = FP8_MAX / amax, explicit clamp (torch's cast saturates E4M3 but overflows E5M2 to inf), cast. Returns the FP8
    tensor and the dequantization factor (1 / scale) in the shape _scaled_mm expects."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = fmax / amax.float().clamp(min=1e-12)
    q = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.reciprocal()


def qdq(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q, inv = quantize(x, dtype)
    return q.float() * inv


def _col_major(q: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major, as _scaled_mm wants its second operand (a transposed copy)."""
    return q.t().contiguous().t()


def contenders(device: str, fp8_hw: bool) -> dict[str, Callable]:
    """name -> fn(x, w, dy) running fprop, dgrad and wgrad once."""
    def mm(x, w, dy):
        return x @ w.t(), dy @ w, dy.t() @ x

    def emulated(x, w, dy):
        xq, wq, gq = qdq(x, E4M3), qdq(w, E4M3), qdq(dy, E5M2)
        return xq @ wq.t(), gq @ wq, gq.t() @ xq

    def tensorwise(x, w, dy, gemm_only=None):
        (xq, xs), (wq, ws), (gq, gs) = gemm_only or (quantize(x, E4M3), quantize(w, E4M3), quantize(dy, E5M2))
        bf = torch.bfloat16
        return (torch._scaled_mm(xq, wq.t(), xs, ws, out_dtype=bf),                       # Y  = X W^T
                torch._scaled_mm(gq, _col_major(wq), gs, ws, out_dtype=bf),               # dX = dY W
                torch._scaled_mm(gq.t().contiguous(), _col_major(xq), gs, xs, out_dtype=bf))     # dW = dY^T X

    def rowwise(x, w, dy):
        # Each GEMM's operands are scaled along its contraction dimension: per row of the left operand, per
        # column of the right one; so X, W and dY are each quantized in both directions.
        xr, xs = quantize(x, E4M3, 1)
        wr, ws = quantize(w, E4M3, 1)
        gr, gs = quantize(dy, E4M3, 1)
        wc, wcs = quantize(w, E4M3, 0)
        gc, gcs = quantize(dy, E4M3, 0)
        xc, xcs = quantize(x, E4M3, 0)
        bf = torch.bfloat16
        return (torch._scaled_mm(xr, wr.t(), xs, ws.t(), out_dtype=bf),
                torch._scaled_mm(gr, _col_major(wc), gs, wcs, out_dtype=bf),
                torch._scaled_mm(gc.t().contiguous(), _col_major(xc), gcs.t(), xcs, out_dtype=bf))

    if device == "cuda" and fp8_hw:
        return {"bf16": mm, "fp8_tensorwise": tensorwise, "fp8_rowwise": rowwise,
                "fp8_tensorwise_gemm_only": tensorwise}
    # CPU torch._scaled_mm exists but is no guide either: E4M3 x E4M3 took seconds where FP32 took milliseconds here.
    return {"fp32": mm, "emulated_qdq": emulated}


def fp8_hardware() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _time(fn: Callable, args: tuple, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(g: Gemm, m: int, device: str, warmup: int, repeats: int) -> dict[str, Optional[float]]:
    """Median fwd+bwd ms of each contender on one GEMM shape; None for one that cannot run here (with why)."""
    hw = fp8_hardware() and device == "cuda"
    dtype = torch.bfloat16 if hw else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=gen, device=device, dtype=dtype) for s in ((m, g.k), (g.n, g.k), (m, g.n)))
    out: dict[str, Optional[float]] = {}
    fns = contenders(device, hw)
    names = list(fns)
    for r in range(2):                      # two rounds, order reversed in the second: a warm cache helps no one
        for name in (names if r == 0 else names[::-1]):
            if f"{name}_error" in out:
                continue
            try:
                if name == "fp8_tensorwise_gemm_only":
                    pre = (quantize(x, E4M3), quantize(w, E4M3), quantize(dy, E5M2))
                    fn = fns[name]
                    t = _time(lambda a, b, c, _f=fn, _p=pre: _f(a, b, c, gemm_only=_p), (x, w, dy), device, warmup,
                              repeats)
                else:
                    t = _time(fns[name], (x, w, dy), device, warmup, repeats)
            except (RuntimeError, NotImplementedError) as e:
                out[name], out[f"{name}_error"] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            out[name] = t if out.get(name) is None else min(out[name], t)
    return out


# ------------------------------------------------------------------------------------------------------------------
# The run and its table.
# ------------------------------------------------------------------------------------------------------------------
def run_bench(variants: list[str], tp: int, tokens: int, cpu_tokens: int = 1024, warmup: int = 2,
              repeats: int = 5, device: Optional[str] = None) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hw = fp8_hardware() and device == "cuda"
    m = tokens if hw else min(tokens, cpu_tokens)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "fp8_hardware": hw, "tp": tp, "tokens": tokens, "measured_tokens": m, "repeats": repeats,
              "threads": torch.get_num_threads(), "variants": {}}
    if device == "cuda":
        result["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for v in variants:
        gemms = block_gemms(v, tp)
        result["variants"][v] = {"roofline": roofline_block(gemms, tokens),
                                 "measured": {g.name: {"k": g.k, "n": g.n, **measure(g, m, device, warmup, repeats)}
                                              for g in gemms}}
    return result


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def format_bench(r: dict) -> str:
    hw = r["fp8_hardware"]
    lines = [f"genlip-fp8 bench: {r['device']}" + (f" (SM {r['capability']})" if r.get("capability") else "")
             + f", torch {r['torch']}, {r['threads']} CPU threads; TP {r['tp']}; fwd+bwd = fprop + dgrad + wgrad"]
    if hw:
        lines.append(f"measured at M = {r['measured_tokens']} tokens, median of {r['repeats']} (best of two rounds); "
                     "FP8 = torch._scaled_mm with eager quantization (unfused casts: TE's fused kernels do better)")
        cols = ("bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_tensorwise_gemm_only")
    else:
        lines += ["NOTE: no FP8 tensor cores here (" + ("CPU" if r["device"] == "cpu" else f"SM {r.get('capability')}")
                  + f"): the measured columns are FP32 matmuls against emulated FP8 (quantize-dequantize, then FP32) "
                  f"at a reduced M = {r['measured_tokens']} tokens. They show that the "
                  "shapes run; they are NOT meaningful for speed. The speed figures are the H100 roofline estimate "
                  "below."]
        cols = ("fp32", "emulated_qdq")
    for v, data in r["variants"].items():
        ref = cols[0]
        lines += ["", f"== {v}: measured fwd+bwd, ms"]
        lines.append(f"{'gemm':12} {'K':>6} {'N':>6} " + " ".join(f"{c:>24}" for c in cols)
                     + "   " + " ".join(f"{ref + '/' + c:>28}" for c in cols[1:]))
        for name, m in data["measured"].items():
            lines.append(f"{name:12} {m['k']:6d} {m['n']:6d} " + " ".join(f"{_ms(m.get(c)):>24}" for c in cols)
                         + "   " + " ".join(f"{_ratio(m.get(ref), m.get(c)):>28}" for c in cols[1:]))
            lines += [f"  {c}: {m[c + '_error']}" for c in cols if m.get(c + "_error")]
        roof = data["roofline"]
        lines += ["", f"== {v}: H100 roofline estimate at M = {r['tokens']} tokens (989 TFLOP/s bf16, 1979 fp8, "
                      f"3.35 TB/s; an estimate, not a measurement)",
                  f"{'gemm':12} {'bf16 ms':>9} {'fp8 ms':>9} {'GEMM only':>10} {'+ current casts':>16} "
                  f"{'+ delayed casts':>16}"]
        for name, x in {**roof["gemms"], "block": roof["block"]}.items():
            lines.append(f"{name:12} {x['bf16_ms']:9.3f} {x['fp8_gemm_ms']:9.3f} {x['gemm_only']:9.2f}x "
                         f"{x['with_current_casts']:15.2f}x {x['with_delayed_casts']:15.2f}x")
        losers = [n for n, x in roof["gemms"].items() if x["with_current_casts"] < 1.0]
        if losers:
            lines.append(f"slower in FP8 with unfused current-scaling casts: {', '.join(losers)} (candidates to keep "
                         "in BF16)")
    return "\n".join(lines)
