"""Y = X·Wᵀ with TE's three FP8 GEMMs emulated: quantize-dequantize where TE feeds FP8 operands, fp32 matmul.

Dimensions: M tokens (all leading dims of x flattened), K input features, N output features; X [M, K], W [N, K],
dY [M, N]. Q_r / Q_c: quantized with blocks along the last / first dim (the "rowwise" / "columnwise" usages).

  GEMM               per-tensor (delayed, tensorwise)      blockwise                 mxfp8, rowwise
  fprop  Y  = X·Wᵀ   Q(X)·Q(W)ᵀ                           Q_r(X)·Q_tile(W)ᵀ         Q_r(X)·Q_r(W)ᵀ
  dgrad  dX = dY·W   Q(dY)·Q(W)     (same FP8 W)          Q_r(dY)·Q_tile(W)         Q_r(dY)·Q_c(W)
  wgrad  dW = dYᵀ·X  Q(dY)ᵀ·Q(X)    (same FP8 dY, X)      Q_c(dY)ᵀ·Q_c(X)           Q_c(dY)ᵀ·Q_c(X)

Per-tensor recipes quantize each tensor once and every GEMM reuses it (TE keeps the FP8 tensor and its transpose);
block recipes quantize each usage separately from high precision, so Q_c(X) != Q_r(X) in general, except the
128x128 weight tiles, which serve both usages. With power-of-two scales the dequantized operands are exact and so
are their products in fp32: the fp32 matmul is the hardware GEMM up to summation order. A non-power-of-two scale adds
one fp32 rounding per dequantized element (the hardware applies 1/scale after accumulating). Hopper's fast (~14-bit)
fprop accumulation is not modelled.

With `fp64` (precision.fp8_tp_invariant) the three GEMMs accumulate in float64 and the fprop and dgrad results stay
float64 for the caller, which rounds them once, after any TP reduction of partial sums (model/fp8/linear.py). The
operands are quantized from the same fp32 values either way. Products of FP8 values are exact in float64 and their
sums nearly so, so the result no longer depends on how the contraction is split or ordered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genlip_mcore.model.fp8.quant import DelayedScales, QTensor, Recipe, quantize
from genlip_mcore.model.fp8.stats import StatsAccumulator


@dataclass
class GemmState:
    """FP8 state of one linear module.

    record_amax gates what the forward records (delayed amaxes and stats of X and W): set it False while
    activations are recomputed so each micro-batch counts once. The backward runs once per micro-batch and always
    records dY, whatever the flag says at that time.
    """
    recipe: Recipe
    name: str = ""
    enabled: bool = True                       # False: high precision (first/last layers, overrides)
    delayed: DelayedScales | None = None       # created here for the delayed recipe
    stats: StatsAccumulator | None = None      # when set, each quantization the GEMMs consume is recorded
    record_amax: bool = True
    fp64: bool = False                         # float64 accumulation and outputs (precision.fp8_tp_invariant)

    def __post_init__(self):
        if self.enabled and self.recipe.name == "delayed" and self.delayed is None:
            self.delayed = DelayedScales(self.recipe)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, state: GemmState) -> torch.Tensor:
    """x [..., K], weight [N, K] -> y [..., N] in x.dtype (float64 with state.fp64); no bias (the caller adds it in
    high precision)."""
    return _Fp8Linear.apply(x, weight, state)


def _quantize(t: torch.Tensor, state: GemmState, role: str, usage: str, record: bool,
              scale: torch.Tensor | None = None) -> QTensor:
    """Quantize one operand; delayed scaling reads the current scale (unless `scale` is given) and records amax."""
    if scale is None and state.delayed is not None:
        scale = state.delayed.scale(role)
    q = quantize(t, state.recipe, role, usage, scale=scale)
    if record and state.delayed is not None:
        state.delayed.record(role, q.amax)
    return q


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, state: GemmState):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)                                       # [M, K]
        acc = torch.float64 if state.fp64 else torch.float32       # accumulation dtype
        out = torch.float64 if state.fp64 else x.dtype
        if state.fp64:
            x2 = x2.float()                                         # quantize the fp32 values (exact from float64)
        record = state.record_amax
        ctx.state, ctx.x_shape = state, x.shape
        ctx.scales = (None, None)
        if not state.enabled:
            if state.stats is not None and record:
                state.stats.add("activation", x2, None)
                state.stats.add("weight", weight, None)
            y = (x2.to(acc) @ weight.to(acc).t()).to(out) if state.fp64 else x2 @ weight.t()
        else:
            qx = _quantize(x2, state, "activation", "rowwise", record)
            qw = _quantize(weight, state, "weight", "rowwise", record)
            if state.stats is not None and record:
                state.stats.add("activation", x2, qx)
                state.stats.add("weight", weight, qw)
            if state.recipe.per_tensor:
                ctx.scales = (qx.scale, qw.scale)                   # backward rebuilds the same FP8 tensors
            y = (qx.dq.to(acc) @ qw.dq.to(acc).t()).to(out)         # [M, N]
        ctx.save_for_backward(x2, weight)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        state: GemmState = ctx.state
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0])                       # [M, N]
        need_dx, need_dw = ctx.needs_input_grad[:2]
        # fp64: accumulate in float64 and return dX unrounded (autograd rounds it to x's dtype, after the TP
        # reduction where x is the float64 input of a column layer). dY arrives as float64 from a float64 output.
        acc = torch.float64 if state.fp64 else torch.float32
        if not state.enabled:
            if state.stats is not None:
                state.stats.add("gradient", dy2, None)
            if state.fp64:
                dx = (dy2.to(acc) @ weight.to(acc)).reshape(ctx.x_shape) if need_dx else None
                dw = (dy2.to(acc).t() @ x2.to(acc)).to(weight.dtype) if need_dw else None
                return dx, dw, None
            dx = (dy2 @ weight).reshape(ctx.x_shape) if need_dx else None
            dw = dy2.t() @ x2 if need_dw else None
            return dx, dw, None
        if state.fp64:
            dy2 = dy2.float()                                       # the fp32 values of dY: quantized as without fp64

        recipe, (sx, sw) = state.recipe, ctx.scales
        qdy = _quantize(dy2, state, "gradient", "rowwise", record=True)
        if state.stats is not None:
            state.stats.add("gradient", dy2, qdy)
        dx = dw = None
        if need_dx:
            qw = _quantize(weight, state, "weight", "columnwise", record=False, scale=sw)
            dx = (qdy.dq.to(acc) @ qw.dq.to(acc))                          # [M, K]
            dx = (dx if state.fp64 else dx.to(x2.dtype)).reshape(ctx.x_shape)
        if need_dw and not recipe.fp8_wgrad:
            dw = (dy2.to(acc).t() @ x2.to(acc)).to(weight.dtype) if state.fp64 else dy2.t() @ x2
        elif need_dw:
            if recipe.per_tensor:
                qdy_c = qdy
                qx_c = _quantize(x2, state, "activation", "columnwise", record=False, scale=sx)
            else:
                qdy_c = _quantize(dy2, state, "gradient", "columnwise", record=False)
                qx_c = _quantize(x2, state, "activation", "columnwise", record=False)
            dw = (qdy_c.dq.to(acc).t() @ qx_c.dq.to(acc)).to(weight.dtype)   # [N, K]
        return dx, dw, None
