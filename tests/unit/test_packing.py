"""First-fit packing: rows are exactly max_seq_len, deterministic, nothing lost, labels shifted per sample."""

import random

import torch

from genlip_mcore.data.batch import IGNORE_INDEX
from genlip_mcore.data.packing import Packer, PackItem, pack_efficiency, row_to_batch
from genlip_mcore.model.attention import build_packed_params


def item(n_img, n_txt, tag):
    tokens = [0] * n_img + [tag] * n_txt
    labels = [IGNORE_INDEX] * (n_img + 1) + [tag] * (n_txt - 1)
    pos = torch.arange(n_img + n_txt).expand(3, -1).clone()
    return PackItem(tokens, labels, pos, n_img, torch.full((n_img, 4), float(tag)), ref=tag)


def drain(items, max_seq_len, buffer):
    packer, rows = Packer(max_seq_len, buffer), []
    for it in items:
        packer.add(it)
        if packer.ready():
            rows.append(packer.pop_row())
    while packer.buffer:
        rows.append(packer.pop_row())
    return rows


def test_first_fit_in_arrival_order():
    rows = drain([item(6, 2, 1), item(5, 5, 2), item(1, 1, 3), item(3, 3, 4)], max_seq_len=16, buffer=4)
    assert [[i.ref for i in r] for r in rows] == [[1, 3, 4], [2]]       # 8 + 2 + 6 = 16; 10 waits


def test_nothing_lost_nothing_repeated_and_deterministic():
    rng = random.Random(0)
    items = [item(rng.randint(16, 300), rng.randint(2, 80), t) for t in range(1, 400)]
    rows = drain(items, 1024, 50)
    assert sorted(i.ref for r in rows for i in r) == list(range(1, 400))
    assert all(sum(i.length for i in r) <= 1024 for r in rows)
    assert [[i.ref for i in r] for r in drain(items, 1024, 50)] == [[i.ref for i in r] for r in rows]


def test_stage1_sized_samples_pack_above_98_percent():
    rng = random.Random(1)
    items = [item(196, rng.randint(20, 130), t) for t in range(1, 3000)]     # 224 px + Recap-like captions
    rows = drain(items, 16384, 200)[:-1]                                      # the final flush is partial
    assert pack_efficiency([row_to_batch(r, 16384) for r in rows]) >= 0.98


def test_row_to_batch_shifts_per_sample_and_pads():
    a, b = item(3, 4, 7), item(2, 3, 9)
    batch = row_to_batch([a, b], 16)
    assert batch.num_tokens == 16 and batch.img_lens == [3, 2, 0] and batch.txt_lens == [4, 3, 4]
    # targets[t] = labels[t+1] inside a sample; a sample's last position and all padding predict nothing.
    assert batch.targets.tolist() == a.labels[1:] + [IGNORE_INDEX] + b.labels[1:] + [IGNORE_INDEX] + [IGNORE_INDEX] * 4
    assert batch.patches.shape == (5, 4) and batch.position_ids.shape == (3, 16)
    p = build_packed_params(batch.img_lens, batch.txt_lens)                   # a valid model input
    assert p.total_len == 16 and p.img_idx.tolist() == [0, 1, 2, 7, 8]


def test_a_full_row_has_no_padding_sample():
    batch = row_to_batch([item(4, 4, 1), item(4, 4, 2)], 16)
    assert batch.img_lens == [4, 4] and batch.txt_lens == [4, 4]
