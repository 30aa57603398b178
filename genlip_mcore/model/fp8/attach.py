"""Give the block linears of built model chunks their FP8 state, and keep delayed scaling in step across ranks.

Each transformer layer has four GEMMs (GEMMS); each gets one GemmState named "<global layer>.<gemm>". Layers that
Megatron keeps in high precision under first_last_layers_bf16 (its own `is_first_last_bf16_layer` rule, on global
layer numbers) get `enabled=False`: they run plain matmuls but still report high-precision statistics.

Delayed scaling (TE's semantics as Megatron runs them): each micro-batch's forward first reduces the amaxes that
this rank recorded since the previous one (forward operands of the previous micro-batch, gradients of whatever
backward ran since) with one MAX all-reduce over the amax group (TP x DP, megatron's `get_amax_reduction_group`),
then pushes them into the histories and recomputes the scales. Every rank of the group does the same, so scales
agree across TP and DP. The histories are not saved in checkpoints (a resume restarts them at scale 1.0, where TE
would restore them).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.fp8_utils import is_first_last_bf16_layer

from genlip_mcore.model.fp8.gemm import GemmState
from genlip_mcore.model.fp8.linear import _FP8Mixin
from genlip_mcore.model.fp8.quant import Recipe

GEMMS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}
# Which operands are split over TP ranks (each rank holds different elements) and which are the same on every TP
# rank (the column layer's input, copied or SP-gathered; the row layer's dY, the gradient of a reduced output).
TP_REPLICATED = {"linear_qkv": ("activation",), "linear_fc1": ("activation",),
                 "linear_proj": ("gradient",), "linear_fc2": ("gradient",)}


def unwrap(model):
    """The GenLIPModel inside megatron's wrappers (DDP, Float16Module)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def high_precision_layer(pr, num_layers: int, layer_number: int) -> bool:
    """Megatron's first/last-layers rule for a global, 1-based layer number, read from our precision config (the
    TransformerConfig does not carry these fields outside the te backend)."""
    rule = SimpleNamespace(first_last_layers_bf16=pr.first_last_layers_bf16, num_layers=num_layers,
                           num_layers_at_start_in_bf16=pr.num_layers_at_start_in_bf16,
                           num_layers_at_end_in_bf16=pr.num_layers_at_end_in_bf16)
    return is_first_last_bf16_layer(rule, layer_number - 1)


def attach_fp8(model, cfg, backend: str) -> dict:
    """Set `fp8_state` on every block linear of one GenLIPModel chunk; returns {(layer, gemm): GemmState}, also kept
    as `model.fp8_states`."""
    recipe = Recipe.from_precision(cfg.precision)
    states = {}
    for layer in model.decoder.layers:
        n = layer.layer_number
        enabled = not high_precision_layer(cfg.precision, cfg.model.num_layers, n)
        for gemm in GEMMS:
            module = getattr(getattr(layer, _PARENT[gemm]), gemm)
            if not isinstance(module, _FP8Mixin):
                raise TypeError(f"layer {n} {gemm} is {type(module).__name__}, not an FP8-capable linear; the local "
                                f"spec builds Emu linears when precision.fp8 is set")
            module.fp8_state = states[(n, gemm)] = GemmState(recipe, name=f"{n}.{gemm}", enabled=enabled,
                                                             fp64=cfg.precision.fp8_tp_invariant)
            module.fp8_backend = backend
    if cfg.precision.fp8_tp_invariant and model.post_process:
        # The LM head stays high precision; float64 sums make its dX all-reduce layout-independent, and its
        # float64 logits feed the float64 cross-entropy (genlip.py). Not in fp8_states: no statistics.
        model.output_layer.fp8_state = GemmState(recipe, name="output_layer", enabled=False, fp64=True)
        model.output_layer.fp64_output = True
    if cfg.precision.fp8_tp_invariant:
        # SP-replicated parameters (LayerNorms, row-parallel biases, LayerScale) get their TP sum in float64 in the
        # backward (fp8/invariant.py), so megatron must not sum them over TP again at the end of the step.
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False):
                p.sequence_parallel = False
    model.fp8_states = states
    return states


def chunk_states(model) -> dict:
    return getattr(unwrap(model), "fp8_states", None) or {}


def begin_step(chunks: list) -> None:
    """Before a step's micro-batches: drop replay scales left over by an aborted step (see linear.py)."""
    for m in chunks:
        for module in unwrap(m).modules():
            if isinstance(module, _FP8Mixin):
                module.fp8_reset_replays()


def delayed_update(model) -> None:
    """Once per micro-batch, at the start of its forward (train/step.py): reduce this chunk's pending amaxes over
    the amax group with one MAX all-reduce and update every delayed history. Nothing to do without delayed states."""
    delayed = [s.delayed for s in chunk_states(model).values() if s.enabled and s.delayed is not None]
    if not delayed or not torch.is_grad_enabled():           # evaluation (no_grad) records nothing
        return
    amax = torch.stack([d.pending() for d in delayed])       # [n_states, 3], on the CPU with the histories
    group = parallel_state.get_amax_reduction_group(with_context_parallel=False, tp_only_amax_red=False)
    if dist.get_world_size(group) > 1:
        on_device = amax.cuda() if torch.cuda.is_available() else amax      # NCCL reduces device tensors only
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX, group=group)
        amax = on_device.cpu()
    for d, a in zip(delayed, amax, strict=True):
        d.update(a)
