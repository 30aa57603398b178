"""HF (released GenLIP layout, spec §8.1) <-> Megatron global tensors (TP=1 view), as one declarative table.

Dimensions: D hidden, hd head_dim, H heads, F ffn, E text_embed_dim, V vocab, P = 3*16*16.

Fused tensors on the Megatron side (spec §8.4):
- linear_qkv [4D, D]: per head n the rows [q_n; gate_n; k_n; v_n] (hd each). HF q_proj is [query; gate] (2D rows),
  k_proj and v_proj are [D, D]. Biases follow the same interleave.
- linear_fc1 [2F, D] = [gate_fc; fc1]: Megatron's GLU activates the first half, and the reference's activated
  branch is gate_fc.
- patch embedding: HF Conv2d [D, 3, 16, 16] <-> Linear [D, P] by reshape ((c, i, j) order).
Names use the local spec's module paths; `sharded_state_dict_keys_map` maps the norms to TE names on save.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# (megatron suffix, hf suffix) for one-to-one tensors inside layer i.
_LAYER_DIRECT = [
    ("input_layernorm.weight", "layer_norm1.weight"),
    ("input_layernorm.bias", "layer_norm1.bias"),
    ("self_attention.linear_proj.weight", "self_attn.out_proj.weight"),
    ("self_attention.linear_proj.bias", "self_attn.out_proj.bias"),
    ("pre_mlp_layernorm.weight", "layer_norm2.weight"),
    ("pre_mlp_layernorm.bias", "layer_norm2.bias"),
    ("mlp.linear_fc2.weight", "mlp.fc2.weight"),
    ("mlp.linear_fc2.bias", "mlp.fc2.bias"),
    ("ls_attn", "layer_scale1.lambda1"),
    ("ls_mlp", "layer_scale2.lambda1"),
]
_TOP_DIRECT = [
    ("embedding.patch_embed.bias", "vision_embeddings.patch_embedding.bias"),
    ("embedding.word_embeddings.weight", "embeddings.weight"),
    ("decoder.final_layernorm.weight", "ln_post.weight"),
    ("decoder.final_layernorm.bias", "ln_post.bias"),
    ("output_layer.weight", "lm_head.weight"),
]
_TOP_PROJ = [
    ("embedding.in_proj.weight", "in_proj.weight"), ("embedding.in_proj.bias", "in_proj.bias"),
    ("proj.weight", "proj.weight"), ("proj.bias", "proj.bias"),
]


def _qkv_from_hf(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """q [2D, ...] (query; gate), k/v [D, ...] -> [4D, ...] in per-head [q; g; k; v] blocks."""
    query, gate = q.chunk(2, 0)
    parts = [t.reshape(heads, -1, *t.shape[1:]) for t in (query, gate, k, v)]   # [H, hd, ...] each
    return torch.cat(parts, 1).reshape(-1, *q.shape[1:])


def _qkv_to_hf(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    blocks = qkv.reshape(heads, 4, -1, *qkv.shape[1:])                           # [H, 4, hd, ...]
    query, gate, k, v = (blocks[:, j].reshape(-1, *qkv.shape[1:]) for j in range(4))
    return torch.cat([query, gate]), k, v


def hf_to_megatron(hf: dict[str, Tensor], num_layers: int, heads: int, has_proj: bool) -> dict[str, Tensor]:
    """Every HF tensor is used exactly once: a missing or left-over key raises (naming the first few)."""
    used: set[str] = set()

    def get(k: str) -> Tensor:
        used.add(k)
        return hf[k]

    out: dict[str, Tensor] = {}
    try:
        w = get("vision_embeddings.patch_embedding.weight")
        out["embedding.patch_embed.weight"] = w.reshape(w.shape[0], -1)
        for mk, hk in _TOP_DIRECT + (_TOP_PROJ if has_proj else []):
            out[mk] = get(hk)
        for i in range(num_layers):
            m, h = f"decoder.layers.{i}.", f"visual.layers.{i}."
            for mk, hk in _LAYER_DIRECT:
                out[m + mk] = get(h + hk)
            for kind in ("weight", "bias"):
                out[m + f"self_attention.linear_qkv.{kind}"] = _qkv_from_hf(
                    get(h + f"self_attn.q_proj.{kind}"), get(h + f"self_attn.k_proj.{kind}"),
                    get(h + f"self_attn.v_proj.{kind}"), heads)
                out[m + f"mlp.linear_fc1.{kind}"] = torch.cat([get(h + f"mlp.gate_fc.{kind}"),
                                                               get(h + f"mlp.fc1.{kind}")])
    except KeyError as e:
        raise KeyError(f"HF tensor {e.args[0]} is missing") from None
    extra = sorted(set(hf) - used)
    if extra:
        raise KeyError(f"{len(extra)} HF tensors have no place in a {num_layers}-layer model: {extra[:5]}")
    return out


def megatron_to_hf(mg: dict[str, Tensor], num_layers: int, heads: int, has_proj: bool,
                   patch_size: int = 16, num_channels: int = 3) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    w = mg["embedding.patch_embed.weight"]
    out["vision_embeddings.patch_embedding.weight"] = w.reshape(w.shape[0], num_channels, patch_size, patch_size)
    for mk, hk in _TOP_DIRECT + (_TOP_PROJ if has_proj else []):
        out[hk] = mg[mk]
    for i in range(num_layers):
        m, h = f"decoder.layers.{i}.", f"visual.layers.{i}."
        for mk, hk in _LAYER_DIRECT:
            out[h + hk] = mg[m + mk]
        for kind in ("weight", "bias"):
            q, k, v = _qkv_to_hf(mg[m + f"self_attention.linear_qkv.{kind}"], heads)
            out[h + f"self_attn.q_proj.{kind}"], out[h + f"self_attn.k_proj.{kind}"] = q, k
            out[h + f"self_attn.v_proj.{kind}"] = v
            gate, up = mg[m + f"mlp.linear_fc1.{kind}"].chunk(2)
            out[h + f"mlp.gate_fc.{kind}"], out[h + f"mlp.fc1.{kind}"] = gate, up
    return out


def load_megatron_tp1(model: torch.nn.Module, tensors: dict[str, Tensor],
                      rename: Callable[[str], str] = lambda n: n) -> None:
    """Copy global tensors into a TP=1, PP=1 model; every parameter must be covered, and nothing left over."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - {rename(k) for k in tensors})
    extra = sorted({rename(k) for k in tensors} - set(params))
    if missing or extra:
        raise KeyError(f"key map mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k, t in tensors.items():
            p = params[rename(k)]
            if p.shape != t.shape:
                raise ValueError(f"{k}: shape {tuple(t.shape)} != parameter {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
