"""The contract between the data pipeline and the model: one packed THD stream per micro-batch.

Dimensions: T tokens (micro_batch_size rows of max_seq_len, concatenated), N_p image patches, P = C*p*p.

Samples are laid out [image patches][text] and concatenated; the row padding is one trailing text-only sample
whose targets are all ignored. Since samples are isolated by the attention rule, concatenating the rows of a
micro-batch into one stream changes nothing, and keeps the model at batch size 1 (Megatron's THD convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class Batch:
    tokens: Tensor            # [T] long; 0 at image and padding positions
    patches: Tensor           # [N_p, P] float, (c, i, j)-flattened, raster patch order per image
    position_ids: Tensor      # [3, T] long (t, h, w); each sample restarts at 0 (spec §4.1)
    targets: Tensor           # [T] long: the token position t must predict, IGNORE_INDEX where none
    img_lens: list[int]       # per sample, padding sample last (0)
    txt_lens: list[int]       # per sample, each >= 1
    seed: int = 0             # global identity of this micro-batch (drop path draws); layout-independent
    num_samples: int = 0      # real samples (padding excluded)
    sample_keys: list = field(default_factory=list)   # (shard key, epoch) per real sample, for audits and tests
    stats: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def to(self, device, non_blocking: bool = True) -> "Batch":
        pin = non_blocking and torch.device(device).type == "cuda"    # pageable sources make the copy blocking
        move = lambda t: (t.pin_memory() if pin and not t.is_pinned() else t).to(device, non_blocking=non_blocking)
        return replace(self, tokens=move(self.tokens), patches=move(self.patches),
                       position_ids=move(self.position_ids), targets=move(self.targets))


def concat(batches: list[Batch], seed: int) -> Batch:
    """Rows of one micro-batch -> one stream (each row already ends with its padding sample)."""
    if len(batches) == 1:
        return replace(batches[0], seed=seed)
    return Batch(
        tokens=torch.cat([b.tokens for b in batches]), patches=torch.cat([b.patches for b in batches]),
        position_ids=torch.cat([b.position_ids for b in batches], 1),
        targets=torch.cat([b.targets for b in batches]),
        img_lens=[n for b in batches for n in b.img_lens], txt_lens=[n for b in batches for n in b.txt_lens],
        seed=seed, num_samples=sum(b.num_samples for b in batches),
        sample_keys=[k for b in batches for k in b.sample_keys])
