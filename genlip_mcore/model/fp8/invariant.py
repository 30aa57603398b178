"""TP-invariant numerics (precision.fp8_tp_invariant): the sums that tensor parallelism splits, formed in float64.

Dimensions: T_l tokens of this rank (T/TP under SP), D hidden, N positions with a caption label, V/TP vocabulary
entries of this rank.

FP8 quantization is discontinuous, so a difference of one fp32 rounding between layouts (TP splits a sum into
per-rank partial sums, which fp32 rounds before adding) moves the rare value that sits on an FP8 rounding boundary
by a whole FP8 step, and training steps compound it. In this mode each such sum is accumulated in float64, the
partial sums are reduced over TP in float64, and the result is rounded to fp32 once, so TP=1 and TP=k round the
same number. The GEMMs and their TP reductions are in gemm.py and linear.py; this module has the rest:
  * parameters replicated over TP but applied to an SP token shard (LayerNorm weight and bias, row-parallel biases,
    LayerScale): megatron sums their fp32 per-rank grads over TP at the end of the step; here `tp_sum_fp64` sums
    each micro-batch's float64 partial grads over TP in the backward (their `sequence_parallel` flag is cleared,
    attach.py, so megatron does not sum them again);
  * the vocabulary-parallel cross-entropy, whose softmax denominator is a sum over the vocabulary shards;
  * the gradient norm that sets the clip factor (train/step.py).
Everything else a layer does is per token or per head, which TP and SP do not split.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from torch import Tensor


def _tp_group_if_split():
    from genlip_mcore.model.layer import tp_group

    group = tp_group()
    return group if group is not None and dist.get_world_size(group) > 1 else None


class _TPSumFp64(torch.autograd.Function):
    """Identity cast of a parameter to float64 whose backward all-reduces the float64 gradient over TP (when SP
    splits the tokens it was applied to) and rounds it to the parameter's dtype once."""

    @staticmethod
    def forward(ctx, param, group):
        ctx.group, ctx.dtype = group, param.dtype
        return param.double()

    @staticmethod
    def backward(ctx, grad):
        if ctx.group is not None:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad.to(ctx.dtype), None


def tp_sum_fp64(param: Tensor, sequence_parallel: bool) -> Tensor:
    """param as float64; its gradient is the float64 sum over the TP ranks' token shards under SP."""
    return _TPSumFp64.apply(param, _tp_group_if_split() if sequence_parallel else None)


def layer_norm_fp64(x: Tensor, weight: Tensor, bias: Tensor, eps: float, sequence_parallel: bool) -> Tensor:
    """LayerNorm [T_l, ..., D] whose affine part runs in float64 (normalization is per token, as usual)."""
    xhat = torch.nn.functional.layer_norm(x, weight.shape, None, None, eps)
    y = xhat.double() * tp_sum_fp64(weight, sequence_parallel) + tp_sum_fp64(bias, sequence_parallel)
    return y.to(x.dtype)


def residual_add_fp64(x: Tensor, bias: Optional[Tensor], gamma: Tensor, scale: Optional[Tensor], residual: Tensor,
                      sequence_parallel: bool) -> Tensor:
    """layer.residual_add with the bias and LayerScale applied in float64, rounded once before the residual add."""
    y = x.double()
    if bias is not None:
        y = y + tp_sum_fp64(bias, sequence_parallel)
    y = y * tp_sum_fp64(gamma, sequence_parallel)
    if scale is not None:
        y = y * scale.double()
    return residual + y.to(residual.dtype)


def cross_entropy_fp64(logits: Tensor, labels: Tensor) -> Tensor:
    """Vocabulary-parallel cross-entropy in float64: logits [N, V/TP] float64, labels [N] global ids -> per-token
    losses [N] float64, the same on every TP rank. Megatron's version casts to fp32, so its sum of exponentials, and
    through it every dlogit, would depend on how TP splits the vocabulary. The max is detached (it cancels); the two
    sums are all-reduced with megatron's mapping, whose backward passes the gradient to each rank's share."""
    group = _tp_group_if_split()

    def total(t: Tensor) -> Tensor:
        return tensor_parallel.reduce_from_tensor_model_parallel_region(t, group=group) if group else t

    v_local = logits.shape[-1]
    first = dist.get_rank(group) * v_local if group else 0
    m = logits.detach().max(dim=-1).values                                          # [N]
    if group:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - m[:, None]                                                   # [N, V/TP]
    local = labels - first
    mine = (local >= 0) & (local < v_local)
    picked = shifted.gather(-1, local.clamp(0, v_local - 1)[:, None])[:, 0] * mine    # [N], 0 off this rank
    return total(shifted.exp().sum(-1)).log() - total(picked)


def grad_norm_fp64(optimizer) -> float:
    """Megatron's gradient norm (`optimizer.get_grad_norm()`: the same main gradients, each TP/DP replica counted
    once, summed over each sub-optimizer's grad-stats group) with the sum of squares in float64. Megatron's fp32 sum
    depends on how TP splits the tensors by ~1e-7, and through the clip factor it would move every weight by an
    ulp; this one agrees across layouts to float64 rounding, so clipping keeps TP=1 and TP=k in step."""
    total = 0.0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        grads = opt.get_main_grads_for_grad_norm()
        device = grads[0].device if grads else (torch.device("cuda") if torch.cuda.is_available() else None)
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            sq += g.double().square().sum()
        dist.all_reduce(sq, group=opt.get_grad_stats_parallel_group())
        total += sq.item()
    return math.sqrt(total)
