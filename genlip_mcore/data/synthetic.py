"""Generated packs for tests and the CPU smoke run: a small task a model can only solve by looking.

Each image is a grid of patches, each patch one flat colour out of `num_colours`; the caption names the colours
of the first patches in raster order (token id = COLOUR0 + colour). A model that cannot see the image cannot beat
the colour prior, so a falling loss proves the image->text path works. Deterministic in (seed, row index).
"""

from __future__ import annotations

import torch

from genlip_mcore.data.batch import IGNORE_INDEX, Batch, concat

PROMPT = [3, 4]   # a fixed unlabelled prompt, like "Describe the image in detail."
END = 2           # end token, labelled like the reference's <|im_end|>
COLOUR0 = 5       # token id of colour 0


def _colours(n: int, patch_dim: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, patch_dim, generator=gen) * 2 - 1


def make_row(row_index: int, *, seed: int, max_seq_len: int, patch_dim: int, num_colours: int = 8,
             caption_len: int = 6, grid: tuple[int, int] = (2, 6)) -> Batch:
    """One packed row of exactly max_seq_len tokens (samples of random grids, then a padding sample)."""
    palette = _colours(num_colours, patch_dim, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + row_index)
    tokens, patches, pos, targets, img_lens, txt_lens = [], [], [], [], [], []
    used = 0
    while True:
        gh, gw = (int(torch.randint(grid[0], grid[1] + 1, (1,), generator=gen)) for _ in range(2))
        n_img = gh * gw
        colours = torch.randint(0, num_colours, (n_img,), generator=gen)
        text = PROMPT + [COLOUR0 + int(c) for c in colours[:caption_len]] + [END]
        n = n_img + len(text)
        if used + n + 1 > max_seq_len:          # keep >= 1 token for the padding sample
            break
        labels = [IGNORE_INDEX] * (n_img + len(PROMPT)) + text[len(PROMPT):]
        tokens += [0] * n_img + text
        targets += labels[1:] + [IGNORE_INDEX]   # shifted: position t predicts label t+1
        patches.append(palette[colours])
        r = torch.arange(n_img)
        start = max(gh, gw)
        txt_pos = torch.arange(start, start + len(text))
        pos.append(torch.cat([torch.stack([torch.zeros(n_img, dtype=torch.long), r // gw, r % gw]),
                              txt_pos.expand(3, -1)], 1))
        img_lens.append(n_img)
        txt_lens.append(len(text))
        used += n
    pad = max_seq_len - used
    tokens += [0] * pad
    targets += [IGNORE_INDEX] * pad
    pos.append(torch.zeros(3, pad, dtype=torch.long))
    return Batch(tokens=torch.tensor(tokens), patches=torch.cat(patches), position_ids=torch.cat(pos, 1),
                 targets=torch.tensor(targets), img_lens=img_lens + [0], txt_lens=txt_lens + [pad],
                 num_samples=len(img_lens))


class SyntheticPacks:
    """Iterator over this DP rank's micro-batches; rows are numbered globally so any layout sees the same data."""

    def __init__(self, *, seed: int, max_seq_len: int, patch_dim: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, vocab_size: int, start_iteration: int = 0):
        if vocab_size < COLOUR0 + 8:
            raise ValueError(f"the synthetic task needs a vocabulary of at least {COLOUR0 + 8} tokens")
        self.kw = dict(seed=seed, max_seq_len=max_seq_len, patch_dim=patch_dim)
        self.gbs, self.mbs, self.dp_rank, self.dp_size = global_batch_size, micro_batch_size, dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        self.iteration, self.next_mb = start_iteration, 0

    @classmethod
    def for_config(cls, cfg, dp_rank: int, dp_size: int) -> "SyntheticPacks":
        t = cfg.training
        return cls(seed=t.seed, max_seq_len=cfg.data.max_seq_len, patch_dim=cfg.model.patch_dim,
                   global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                   dp_rank=dp_rank, dp_size=dp_size, vocab_size=cfg.model.vocab_size)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        first = self.iteration * self.gbs + self.dp_rank * self.per_rank + self.next_mb * self.mbs
        rows = [make_row(first + i, **self.kw) for i in range(self.mbs)]
        self.next_mb += 1
        if self.next_mb * self.mbs == self.per_rank:
            self.iteration, self.next_mb = self.iteration + 1, 0
        return concat(rows, seed=first)


def blind_floor(batch: Batch, num_colours: int = 8) -> float:
    """Lowest mean caption loss a model that cannot see the image can reach on `batch`: colour targets are
    uniform over the palette to it (ln num_colours each); prompt-determined END tokens cost nothing."""
    labelled = batch.targets != IGNORE_INDEX
    colour = (batch.targets >= COLOUR0) & (batch.targets < COLOUR0 + num_colours)
    return float(colour.sum()) * torch.log(torch.tensor(float(num_colours))).item() / max(int(labelled.sum()), 1)
