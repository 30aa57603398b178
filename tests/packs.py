"""Test packs: the reference's packed row (tests/reference) turned into GenLIPModel inputs.

The reference marks padding with sample id -1 and labels positions unshifted; GenLIPModel takes padding as one
trailing text-only sample and `targets` already shifted (targets[t] = labels[t + 1]).
"""

from __future__ import annotations

import torch

from genlip_mcore.hf.keymap import hf_to_megatron
from genlip_mcore.model import build_packed_params
from tests.reference.genlip_ref import RefConfig

IGNORE = -100


def ref_config(model_cfg, num_layers=None) -> RefConfig:
    return RefConfig(hidden_size=model_cfg.hidden_size, intermediate_size=model_cfg.ffn_hidden_size,
                     num_hidden_layers=num_layers or model_cfg.num_layers,
                     num_attention_heads=model_cfg.num_attention_heads, text_embed_dim=model_cfg.text_embed_dim,
                     vocab_size=model_cfg.vocab_size, mrope_section=tuple(model_cfg.mrope_section),
                     layer_norm_eps=model_cfg.layernorm_epsilon)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[1:], torch.full((1,), IGNORE, dtype=labels.dtype)])


def model_inputs(row: dict, seed: int = 0) -> dict:
    """Reference row -> kwargs of GenLIPModel.forward (padding becomes a text-only sample)."""
    img, txt = list(row["img_lens"]), list(row["txt_lens"])
    if row["pad_len"]:
        img, txt = img + [0], txt + [row["pad_len"]]
    targets = shifted_targets(row["labels"])
    patches = row["pixel_patches"].reshape(row["pixel_patches"].shape[0], -1)    # (c, i, j) flattening
    return dict(tokens=row["input_ids"], patches=patches, position_ids=row["position_ids"].clamp(min=0),
                packed=build_packed_params(img, txt, seed=seed, targets=targets), targets=targets)


def megatron_tensors(ref_sd: dict, model_cfg) -> dict:
    return hf_to_megatron(ref_sd, model_cfg.num_layers, model_cfg.num_attention_heads,
                          model_cfg.text_embed_dim != model_cfg.hidden_size)
