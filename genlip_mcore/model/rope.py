"""Interleaved multimodal RoPE (spec §4).

Dimensions: T tokens in the packed stream, hd head_dim, F = hd/2 rotary frequencies.

Megatron's MultimodalRotaryEmbedding uses Qwen2-VL's *chunked* sections; GenLIP interleaves the axes per frequency
slot (T, H, W, T, H, W, ...). We compute the per-token angles here and hand them to Megatron's standard
rotate-half apply function as `rotary_pos_emb` of shape [T, 1, 1, hd]; it takes cos/sin in fp32 and casts to the
activation dtype, exactly as the reference does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """[F] fp32; from an int64 arange cast to float, as the reference computes it (spec §4.2)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def axis_of_slot(num_freqs: int, mrope_section: list[int]) -> Tensor:
    """[F] long in {0: T, 1: H, 2: W}. Slot j is H if j%3==1 and j<3*sec[1], W if j%3==2 and j<3*sec[2], else T."""
    j = torch.arange(num_freqs)
    axis = torch.zeros(num_freqs, dtype=torch.long)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def mrope_angles(position_ids: Tensor, head_dim: int, theta: float, mrope_section: list[int]) -> Tensor:
    """position_ids [3, T] (t, h, w) -> rotary_pos_emb [T, 1, 1, hd] fp32 (angles duplicated: rotate-half layout)."""
    freqs = inv_freq(head_dim, theta, device=position_ids.device)                  # [F]
    axis = axis_of_slot(freqs.numel(), mrope_section).to(position_ids.device)      # [F]
    pos = position_ids.float().index_select(0, axis)                               # [F, T]: the axis each slot reads
    angles = pos.t() * freqs                                                       # [T, F]
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]                   # [T, 1, 1, hd]
