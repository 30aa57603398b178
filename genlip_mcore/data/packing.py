"""Greedy first-fit packing of samples into rows of exactly `max_seq_len` tokens (THD), and rows into Batches.

Dimensions: L_i tokens of sample i (n_img + n_txt), R = max_seq_len tokens per row, N_p patches, P patch values.

As the reference (spec §6.6): keep a buffer of at least `buffer` samples; fill a row by walking the buffer in
arrival order and taking every sample that still fits (first fit, skipping those that do not); close the row when
nothing more fits. The row is padded to exactly R with one trailing text-only padding sample (no loss), so every
micro-batch has the same shape: static pipeline shapes, and R is already a multiple of what TP/SP/FP8 need
(`config.seq_len_multiple`). Deterministic: the same samples in the same order give the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from genlip_mcore.data.batch import IGNORE_INDEX, Batch


@dataclass
class PackItem:
    tokens: list[int]             # [L] (0 at image positions)
    labels: list[int]             # [L] unshifted: label[t] is the token at t, or IGNORE_INDEX
    positions: torch.Tensor       # [3, L] long
    n_img: int
    pixels: Any                   # [N_img, P] patches, or deferred image bytes + target size (DALI decode later)
    ref: Any = None               # where the sample came from (resume of the packer buffer)

    @property
    def length(self) -> int:
        return len(self.tokens)


class Packer:
    def __init__(self, max_seq_len: int, buffer: int):
        self.max_seq_len, self.buffer_size = max_seq_len, buffer
        self.buffer: list[PackItem] = []

    def ready(self) -> bool:
        return len(self.buffer) >= self.buffer_size

    def add(self, item: PackItem) -> None:
        if item.length > self.max_seq_len:
            raise ValueError(f"sample of {item.length} tokens cannot fit a row of {self.max_seq_len}")
        self.buffer.append(item)

    def pop_row(self) -> list[PackItem]:
        """First fit over the buffer in arrival order. Only call with a non-empty buffer."""
        space, row, rest = self.max_seq_len, [], []
        for item in self.buffer:
            if item.length <= space and space > 0:
                row.append(item)
                space -= item.length
            else:
                rest.append(item)
        self.buffer = rest
        return row


def row_to_batch(row: list[PackItem], max_seq_len: int, seed: int = 0) -> Batch:
    """Concatenate one row's samples, shift labels into targets per sample, pad with a text-only sample."""
    tokens, targets, positions, patches, img_lens, txt_lens = [], [], [], [], [], []
    for item in row:
        tokens += item.tokens
        # Position t predicts label t+1 of the same sample; the last position predicts nothing.
        targets += item.labels[1:] + [IGNORE_INDEX]
        positions.append(item.positions)
        patches.append(item.pixels)
        img_lens.append(item.n_img)
        txt_lens.append(item.length - item.n_img)
    pad = max_seq_len - len(tokens)
    if pad:
        tokens += [0] * pad
        targets += [IGNORE_INDEX] * pad
        positions.append(torch.zeros(3, pad, dtype=torch.long))
        img_lens.append(0)
        txt_lens.append(pad)
    deferred = bool(patches) and not torch.is_tensor(patches[0])
    return Batch(tokens=torch.tensor(tokens, dtype=torch.long),
                 patches=patches if deferred else torch.cat(patches) if patches else torch.zeros(0),
                 position_ids=torch.cat(positions, 1), targets=torch.tensor(targets, dtype=torch.long),
                 img_lens=img_lens, txt_lens=txt_lens, seed=seed, num_samples=len(row),
                 sample_keys=[(i.ref.key, i.ref.epoch) for i in row if hasattr(i.ref, "key")])


def pack_efficiency(batches: list[Batch]) -> Optional[float]:
    """Real (non-padding) tokens over row slots."""
    slots = sum(b.num_tokens for b in batches)
    real = sum(sum(b.img_lens[:b.num_samples]) + sum(b.txt_lens[:b.num_samples]) for b in batches)
    return real / slots if slots else None
