"""GenLIP's transformer layer: Megatron's TransformerLayer plus LayerScale and per-sample DropPath.

Dimensions: T_l tokens of the packed stream on this rank (T, or T/TP under sequence parallelism), D hidden.

Both additions live in the residual add: x + drop(gamma * (branch + bias)). We swap the layer's two
bias-dropout-add callables after construction, so everything else in the parent (TE fused modules, selective and
full recompute, the local spec) is untouched.

DropPath is per *sample*, not per packed row as in the reference (spec §11.11, architecture decision 6). The keep
decisions arrive precomputed in the packed params ([L, 2, S]) so recompute replays them exactly and every TP rank
agrees. A dropped branch is multiplied by zero, never skipped, so every parameter still receives a gradient and
overlapped gradient reduction sees the same hooks every step.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor


def tp_group():
    """The tensor-parallel process group for layers we build ourselves (megatron-core deprecates leaving it None),
    or None before model parallelism is set up, as megatron-core itself then passes."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def param_device(config):
    """Where our own parameters live: as Megatron's CPU-init path, the default device (CPU, or meta inside
    `with torch.device("meta")`), else the current GPU."""
    return None if config.use_cpu_initialization else torch.cuda.current_device()


class SPLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with Megatron's norm signature that also works under sequence parallelism.

    Megatron's WrappedTorchNorm refuses SP; the only extra thing SP needs is the `sequence_parallel` flag, which
    makes finalize_model_grads all-reduce these grads over TP (each rank saw only its token shard)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.sp = bool(config.sequence_parallel)
        self.tp_invariant = getattr(config, "genlip_tp_invariant", False)
        for p in self.parameters():
            p.sequence_parallel = self.sp

    def forward(self, x: Tensor) -> Tensor:
        if self.tp_invariant:                  # precision.fp8_tp_invariant: float64 affine part and grad sums
            from genlip_mcore.model.fp8.invariant import layer_norm_fp64

            return layer_norm_fp64(x, self.weight, self.bias, self.eps, self.sp)
        return super().forward(x)


def residual_add(x: Tensor, bias: Optional[Tensor], gamma: Tensor, scale: Optional[Tensor],
                 residual: Tensor) -> Tensor:
    """residual + DropPath(LayerScale(x + bias)): the end of each branch of a layer (spec §2.4). scale [T_l, 1, 1]
    is the per-sample keep / (1 - p) factor, or None (eval, or no drop path)."""
    if bias is not None:
        x = x + bias
    x = x * gamma
    if scale is not None:
        x = x * scale.to(x.dtype)
    return residual + x


@functools.lru_cache(maxsize=1)
def compiled_residual_add():
    """`residual_add` through torch.compile (model.compile): one fused kernel instead of four elementwise passes.
    Built on first use; dynamic shapes, since the SP shard and the drop-path branch vary."""
    return torch.compile(residual_add, dynamic=True)


class GenLIPTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None):
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        dev = param_device(config)
        shape = (config.hidden_size,)
        self.ls_attn = torch.nn.Parameter(torch.full(shape, config.layer_scale_init, dtype=config.params_dtype,
                                                     device=dev))
        self.ls_mlp = torch.nn.Parameter(torch.full(shape, config.layer_scale_init, dtype=config.params_dtype,
                                                    device=dev))
        for p in (self.ls_attn, self.ls_mlp):
            # Replicated over TP but applied to an SP token shard: grads must be summed over TP.
            p.sequence_parallel = bool(config.sequence_parallel)
        self.self_attn_bda = lambda training, fused: self._residual_fn(0)
        self.mlp_bda = lambda training, fused: self._residual_fn(1)
        self._packed = None

    def forward(self, *args, **kwargs):
        self._packed = kwargs.get("packed_seq_params")
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._packed = None

    def _residual_fn(self, branch: int):
        gamma = self.ls_attn if branch == 0 else self.ls_mlp
        add = compiled_residual_add() if getattr(self.config, "genlip_compile", False) else residual_add
        if getattr(self.config, "genlip_tp_invariant", False):     # float64 bias and LayerScale (fp8/invariant.py)
            from genlip_mcore.model.fp8.invariant import residual_add_fp64

            add = functools.partial(residual_add_fp64, sequence_parallel=bool(self.config.sequence_parallel))

        def bda(x_with_bias, residual: Tensor, prob: float) -> Tensor:
            x, bias = x_with_bias                                   # [T_l, 1, D], [D] or None
            return add(x, bias, gamma, self._drop_path_scale(branch, x.shape[0]), residual)

        return bda

    def _drop_path_scale(self, branch: int, local_tokens: int):
        p = self._packed
        if not self.training or p is None or getattr(p, "drop_path_scale", None) is None:
            return None
        tok = p.sample_of_token                                     # [T]
        if local_tokens != tok.shape[0]:                            # SP shard: rank r holds [r*T_l, (r+1)*T_l)
            r = self.pg_collection.tp.rank()
            tok = tok[r * local_tokens:(r + 1) * local_tokens]
        per_sample = p.drop_path_scale[self.layer_number - 1, branch]   # [S]
        return per_sample.index_select(0, tok)[:, None, None]           # [T_l, 1, 1]
