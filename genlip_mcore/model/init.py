"""Weight initialisation per spec §5, identical under every parallel layout.

Each parameter's *global* tensor is drawn from its own generator, seeded by (seed, canonical name with the global
layer index), then this rank's TP shard is cut out of it. So TP=1 and TP=8 x PP=4 start from bit-identical
weights, and a pipeline stage's draws do not depend on what other stages built.

Spec §5.2, by Megatron name (mcore gated-QKV layout, per head n: [q_n; gate_n; k_n; v_n], hd rows each):
- linear_qkv.weight: Xavier-uniform of the reference's matrices: q/gate rows bound sqrt(6/(D+2D)) (q_proj is
  [2D, D]), k/v rows bound sqrt(6/(2D));   linear_proj.weight (out_proj): bound sqrt(6/(2D))
- linear_fc1 ([gate; up] = [gate_fc; fc1]), linear_fc2, patch embedding, word embeddings, in_proj, proj, LM head:
  Normal(0, init_std)
- every bias 0, LayerNorm weight 1 / bias 0, layer scales layer_scale_init.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state

_ONES = re.compile(r"(layernorm|layer_norm)(_weight|\.weight)$|final_layernorm\.weight$")


def _canonical(name: str, layer_offsets: dict[int, int]) -> str:
    """Replace this chunk's local layer index with the global one: decoder.layers.3.x -> decoder.layers.<g>.x"""
    m = re.search(r"decoder\.layers\.(\d+)\.", name)
    if m is None:
        return re.sub(r"^(module\.)+", "", name)
    g = layer_offsets[int(m.group(1))]
    return re.sub(r"^.*decoder\.layers\.\d+\.", f"decoder.layers.{g}.", name)


def _global_value(name: str, shape: list[int], cfg, gen: torch.Generator) -> torch.Tensor:
    D, hd = cfg.hidden_size, cfg.head_dim
    if name.endswith(("ls_attn", "ls_mlp")):
        return torch.full(shape, cfg.layer_scale_init)
    if _ONES.search(name):
        return torch.ones(shape)
    if name.endswith("bias") or name.endswith("layer_norm_bias"):
        return torch.zeros(shape)
    if name.endswith("linear_qkv.weight"):
        w = torch.rand(shape, generator=gen) * 2 - 1                         # U(-1, 1), [4D, D]
        row = torch.arange(shape[0]) % (4 * hd)                              # position inside a head's block
        bound = torch.where(row < 2 * hd, math.sqrt(6 / (3 * D)), math.sqrt(6 / (2 * D)))
        return w * bound[:, None]
    if name.endswith("linear_proj.weight"):
        return (torch.rand(shape, generator=gen) * 2 - 1) * math.sqrt(6 / (2 * D))
    if name.endswith("weight"):
        return torch.randn(shape, generator=gen) * cfg.init_std
    raise ValueError(f"no initialisation rule for parameter {name}")


def _local_shard(name: str, full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if "linear_fc1" in name:
        # SwiGLU fc1 holds [gate; up] globally but [gate_r; up_r] on rank r.
        return torch.cat([h.chunk(tp_size, dim)[tp_rank] for h in full.chunk(2, dim)], dim)
    return full.chunk(tp_size, dim)[tp_rank]


def _global_shape(name: str, param, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, model_cfg, seed: int) -> None:
    """Fill every parameter of one model chunk (possibly wrapped) according to the rules above."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    layers = _find_layers(model)
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    for name, param in model.named_parameters():
        canon = _canonical(name, offsets)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{canon}".encode()))
        full = _global_value(canon, _global_shape(canon, param, tp_size), model_cfg, gen)
        param.copy_(_local_shard(canon, full, param, tp_rank, tp_size).to(param.dtype))


def _find_layers(model: torch.nn.Module):
    for module in model.modules():
        if hasattr(module, "decoder") and hasattr(module.decoder, "layers"):
            return list(module.decoder.layers)
    return []
