"""Packed rows that look like GenLIP's two training stages, without any data on disk.

Dimensions: R tokens per row, N_p image patches in the row, P = 3 * 16 * 16 values per patch.

The measurements need rows whose *shape* is realistic (how many samples, how long their images and captions are,
how much padding), not real pixels or words: kernels and GEMMs cost the same on random values. Samples are drawn
from the distributions below, laid out exactly as the data pipeline lays them out (`data.sample`), and packed by
the pipeline's own first-fit packer (`data.packing`, a 200-sample buffer), so padding comes out as in training.

- stage 1: 224 px images, 196 patches; text = 7 prompt tokens ("Describe the image in detail.") + a caption of
  30-100 tokens + 2 end tokens, so about 270 tokens per sample (spec §11: "about 270 tokens per sample").
- stage 2: NaViT. A source image of long side 256-1600 px and aspect 1:1 to 2:1 (either orientation), resized by
  `smart_resize` (16-1024 patches, most large sources at the 1024 cap); text = 7 + 60-400 + 2 tokens (long
  captions: an assumption, the stage-2 corpora's lengths are not in the spec).
"""

from __future__ import annotations

import numpy as np
import torch

from genlip_mcore.data.batch import IGNORE_INDEX, Batch
from genlip_mcore.data.images import smart_resize
from genlip_mcore.data.packing import Packer, PackItem, row_to_batch
from genlip_mcore.data.sample import IMAGE_ID, sample_positions

KINDS = ("stage1", "stage2")
PROMPT_TOKENS, END_TOKENS = 7, 2
CAPTION = {"stage1": (30, 100), "stage2": (60, 400)}      # caption tokens, inclusive range
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)
PACK_BUFFER = 200                                          # the packer buffer of the example configs


def draw_sample(kind: str, rng: np.random.Generator) -> tuple[tuple[int, int], int]:
    """((gh, gw) patch grid, text tokens) of one sample of `kind`."""
    if kind == "stage1":
        grid = (14, 14)
    elif kind == "stage2":
        long = int(rng.integers(256, 1601))
        short = max(16, round(long / float(ASPECTS[rng.integers(len(ASPECTS))])))
        h, w = (long, short) if rng.random() < 0.5 else (short, long)
        H, W = smart_resize(h, w)
        grid = (H // 16, W // 16)
    else:
        raise ValueError(f"unknown pack kind {kind!r}; choose one of {KINDS}")
    lo, hi = CAPTION[kind]
    return grid, PROMPT_TOKENS + int(rng.integers(lo, hi + 1)) + END_TOKENS


def _item(grid: tuple[int, int], n_txt: int, vocab_size: int, gen: torch.Generator) -> PackItem:
    """A sample without pixels: the buffer holds 200 of them, only the packed ones get pixels."""
    n_img = grid[0] * grid[1]
    text = torch.randint(1, vocab_size, (n_txt,), generator=gen).tolist()
    tokens = [IMAGE_ID] * n_img + text
    labels = [IGNORE_INDEX] * (n_img + PROMPT_TOKENS) + text[PROMPT_TOKENS:]       # caption + end are labelled
    return PackItem(tokens, labels, sample_positions(grid, n_txt), n_img, None)


def make_batch(kind: str, max_seq_len: int, *, vocab_size: int, patch_dim: int, seed: int = 0) -> Batch:
    """One packed row of exactly `max_seq_len` tokens of `kind` samples (the first row the packer closes)."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    gen = torch.Generator().manual_seed(seed)
    packer = Packer(max_seq_len, PACK_BUFFER)
    while not packer.ready():
        grid, n_txt = draw_sample(kind, rng)
        if grid[0] * grid[1] + n_txt <= max_seq_len:
            packer.add(_item(grid, n_txt, vocab_size, gen))
    row = packer.pop_row()
    for item in row:
        item.pixels = torch.rand(item.n_img, patch_dim, generator=gen) * 2 - 1         # [n_img, P] in [-1, 1]
    return row_to_batch(row, max_seq_len, seed=seed)


def describe(b: Batch) -> dict:
    """The row's shape in numbers (for the report)."""
    n = b.num_samples
    img, txt = b.img_lens[:n], b.txt_lens[:n]
    return {"tokens": b.num_tokens, "samples": n, "image_tokens": sum(img), "text_tokens": sum(txt),
            "padding_tokens": b.num_tokens - sum(img) - sum(txt),
            "caption_targets": int((b.targets != IGNORE_INDEX).sum()),
            "image_tokens_per_sample": [min(img), round(sum(img) / n, 1), max(img)] if n else None,
            "text_tokens_per_sample": [min(txt), round(sum(txt) / n, 1), max(txt)] if n else None}
