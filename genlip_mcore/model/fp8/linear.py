"""Megatron's tensor-parallel linears with FP8 GEMMs: emulated (any device) or torchao's real FP8 matmul.

Dimensions: T_l tokens of this rank (T under SP after the all-gather), K input features of the GEMM (K/TP for the
row-parallel layer), N output features (N/TP for the column-parallel layer).

Only `_forward_impl` changes, the one place where megatron-core's ColumnParallelLinear and RowParallelLinear
multiply. Everything around it stays megatron's: parameters and their names (checkpoints and the HF export do
not change), the row-parallel output reduction (all-reduce or reduce-scatter, done by `forward` after
`_forward_impl`), and the communication inside, which goes through megatron's own autograd mappings exactly as
its LinearWithGradAccumulationAndAsyncCommunication does: under SP the input is all-gathered (backward:
reduce-scatter of dX); a column layer without SP all-reduces dX over TP. The bias is added in high precision, so
its gradient comes from the high-precision dY, as in Transformer Engine.

A module without `fp8_state` (the default; `model/fp8/attach.py` sets it after the model is built), or with a frozen
weight, runs megatron's own path.

TP-invariant mode (`GemmState.fp64`, precision.fp8_tp_invariant): every sum that TP splits across ranks is formed in
float64 and rounded once. The input is cast to float64 before megatron's gather/copy mapping, so the reduce-scatter
or all-reduce of the column layer's dX (partial sums over N/TP) runs in float64 and is rounded when the gradient
leaves the cast; the row layer returns its float64 partial outputs (sums over K/TP) to megatron's reduction and
`forward` rounds the reduced output. With the float64 GEMMs (gemm.py), TP=1 and TP=k then round the same float64
numbers, and FP8 quantization, which is discontinuous, sees the same fp32 values on every layout.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from genlip_mcore.model.fp8.gemm import GemmState, fp8_linear
from genlip_mcore.model.fp8.quant import Recipe, quantize


def in_backward() -> bool:
    """True while autograd runs a backward pass: a forward then is an activation-recompute replay (megatron's
    CheckpointFunction re-runs the layer inside its backward), which must not record amaxes or stats again."""
    return torch._C._current_graph_task_id() != -1


class _ReplayScales:
    """Delayed scales for a recompute replay: the activation and weight scales that the original forward used (the
    live ones may have moved on since, when pipeline parallelism runs other micro-batches in between, as TE also
    guards against); the gradient scale and every amax record stay live, since the replay's backward is the only
    backward this micro-batch gets."""

    def __init__(self, live, scales: dict):
        self.live, self.scales = live, scales

    def scale(self, role: str) -> torch.Tensor:
        return self.scales[role] if role in self.scales else self.live.scale(role)

    def record(self, role: str, amax: torch.Tensor) -> None:
        self.live.record(role, amax)


@functools.lru_cache(maxsize=None)
def torchao_config(recipe: Recipe):
    """torchao's Float8LinearConfig for a recipe: tensorwise, rowwise, or rowwise_with_gw_hp (fp8_wgrad=False), with
    the gradient's FP8 format set from precision.fp8 (hybrid: E5M2) in both GEMMs that consume it."""
    from torchao.float8.config import Float8LinearConfig

    name = recipe.name if recipe.fp8_wgrad or recipe.name != "rowwise" else "rowwise_with_gw_hp"
    c = Float8LinearConfig.from_recipe_name(name)
    g = recipe.dtype("gradient")
    return dataclasses.replace(
        c, cast_config_grad_output=dataclasses.replace(c.cast_config_grad_output, target_dtype=g),
        cast_config_grad_output_for_grad_weight=dataclasses.replace(c.cast_config_grad_output_for_grad_weight,
                                                                    target_dtype=g))


class _GradientStats(torch.autograd.Function):
    """Identity whose backward adds dY [.., N] to the statistics (torchao GEMMs do not expose their operands)."""

    @staticmethod
    def forward(ctx, y, state: GemmState):
        ctx.state = state
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        st = ctx.state
        if st.stats is not None:
            dy2 = dy.reshape(-1, dy.shape[-1])
            st.stats.add("gradient", dy2, quantize(dy2, st.recipe, "gradient"))
        return dy, None


def _torchao_linear(x: torch.Tensor, weight: torch.Tensor, state: GemmState) -> torch.Tensor:
    """Real FP8 GEMMs through torchao (torch._scaled_mm, also on CPU). Statistics, on logging steps only, come from
    our quantizers with the same recipe."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    from torchao.float8.float8_training_tensor import LinearMMConfig

    if state.stats is not None and state.record_amax:
        x2 = x.reshape(-1, x.shape[-1])
        state.stats.add("activation", x2, quantize(x2, state.recipe, "activation"))
        state.stats.add("weight", weight, quantize(weight, state.recipe, "weight"))
    y = matmul_with_hp_or_float8_args.apply(x, weight.t(), LinearMMConfig(), torchao_config(state.recipe))
    return _GradientStats.apply(y, state) if state.stats is not None else y


class _FP8Mixin:
    fp8_state: GemmState | None = None
    fp8_backend: str = "emulate"         # "emulate" | "torchao"
    # TP-invariant mode: return the float64 GEMM output (a row layer's partial sums before megatron's reduction;
    # the LM head's logits for the float64 cross-entropy) instead of rounding it in _forward_impl
    fp64_output: bool = False

    def _forward_impl(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                      grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None):
        state = self.fp8_state
        if state is None or not weight.requires_grad:
            return super()._forward_impl(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                         sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group)
        tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        dtype = input.dtype
        if state.fp64:
            input = input.double()                                    # TP sums of dX in float64 (module doc)
        if sequence_parallel:                                         # [T_l, b, K] -> [T, b, K]
            x = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            x = copy_to_tensor_model_parallel_region(input, group=tp_group)
        else:
            x = input
        y = self._fp8_gemm(x, weight, self._call_state(state))        # [T, b, N]
        if state.fp64 and not self.fp64_output:
            y = y.to(dtype)                                           # no TP sum follows: round now
        return y + bias if bias is not None else y

    def _call_state(self, state: GemmState) -> GemmState:
        """The state for this call. A recompute replay records nothing in its forward (its backward records dY as
        usual); under delayed scaling it reuses the scales of the original forward, which a forward run without
        autograd (the first pass of activation recompute) leaves in a FIFO, consumed in micro-batch order."""
        if in_backward():
            delayed = state.delayed
            if delayed is not None and self._replay_scales:
                delayed = _ReplayScales(state.delayed, self._replay_scales.pop(0))
            return dataclasses.replace(state, record_amax=False, delayed=delayed)
        if state.delayed is not None and not torch.is_grad_enabled() and self.training:
            self._replay_scales.append({r: state.delayed.scale(r) for r in ("activation", "weight")})
        elif not self.training and state.record_amax:
            return dataclasses.replace(state, record_amax=False)       # evaluation: use the scales, record nothing
        return state

    def _fp8_gemm(self, x: torch.Tensor, weight: torch.Tensor, state: GemmState) -> torch.Tensor:
        if self.fp8_backend == "torchao" and state.enabled:
            return _torchao_linear(x, weight, state)
        return fp8_linear(x, weight, state)

    def fp8_reset_replays(self) -> None:
        """Forget scales kept for replays that never came (a step that raised between forward and backward)."""
        self._replay_scales = []


class EmuColumnParallelLinear(_FP8Mixin, ColumnParallelLinear):
    """ColumnParallelLinear whose GEMMs run in FP8 once `fp8_state` is set (same parameters and keys)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._replay_scales: list = []


class EmuRowParallelLinear(_FP8Mixin, RowParallelLinear):
    """RowParallelLinear whose GEMMs run in FP8 once `fp8_state` is set; its output reduction stays megatron's."""

    fp64_output = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._replay_scales: list = []

    def forward(self, input_):
        output, output_bias = super().forward(input_)
        if output.dtype == torch.float64 and input_.dtype != torch.float64:
            output = output.to(input_.dtype)                          # TP-invariant mode: round the reduced sum
        return output, output_bias
