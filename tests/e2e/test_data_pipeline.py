"""The data pipeline as training runs it, on generated shapes shards (real JPEGs in webdataset tars)."""

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from genlip_mcore import config as C
from genlip_mcore.data.loader import DataLoader, SampleProcessor
from genlip_mcore.data.shapes import make_shapes
from genlip_mcore.data.shards import SourceReader, index_shard
from genlip_mcore.data.sources import expand_shards
from genlip_mcore.data.tokenizer import train_sentencepiece
from tests.distributed.launch import REPO


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, samples=240, shards=8, seed=3, heldout=16)
    tok = train_sentencepiece(["a red circle in the top left.", "Describe the image in detail."] * 50 +
                              [f"a {c} {s} in the {p}." for c in ("red", "green", "blue", "black")
                               for s in ("circle", "square", "star") for p in ("top", "left", "center")],
                              root / "tok", 400)
    return root, str(tok)


def data_cfg(shapes, **kw):
    root, tok = shapes
    base = dict(sources=[str(root / "train" / "*.tar")], tokenizer_path=tok, image_size=64, max_seq_len=512,
                pack_buffer=8, num_workers=2)
    return C.DataConfig(**{**base, **kw})


def train_keys(root):
    return sorted(r.key for s in sorted((root / "train").glob("*.tar")) for r in index_shard(str(s), Counter()))


def loader(shapes, dp_rank=0, dp_size=1, state=None, mbs=2, **kw):
    return DataLoader(data_cfg(shapes, **kw), patch_size=16, seed=5, dp_rank=dp_rank, dp_size=dp_size,
                      micro_batch_size=mbs, state=state)


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shapes):
    seen = []
    for rank in (0, 1):
        it = loader(shapes, dp_rank=rank, dp_size=2)
        while True:
            batch = next(it)
            seen += [k for k, epoch in batch.sample_keys if epoch == 0]
            epochs = [s["reader"]["sources"][0]["epoch"] for s in it.slot_states.values()]
            if len(epochs) == 2 and min(epochs) >= 2:     # epoch 0 long gone from both workers' buffers
                break
    assert sorted(seen) == train_keys(shapes[0])            # the union, exactly once


@pytest.mark.parametrize("workers,mbs", [(0, 2), (2, 2), (2, 1)])    # (2, 1): 3 rows in, so the workers rotate
def test_resume_gives_the_batches_of_an_uninterrupted_run(shapes, workers, mbs):
    straight = loader(shapes, num_workers=workers, mbs=mbs)
    expected = [next(straight) for _ in range(7)]
    first = loader(shapes, num_workers=workers, mbs=mbs)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))      # it must survive a checkpoint round trip
    resumed = loader(shapes, num_workers=workers, state=state, mbs=mbs)
    for want in expected[3:]:
        got = next(resumed)
        assert got.sample_keys == want.sample_keys
        for name in ("tokens", "targets", "position_ids", "patches"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.img_lens == want.img_lens and got.txt_lens == want.txt_lens


def _jpeg(size=(80, 60), colour=(200, 30, 30), mode="RGB", noise=False):
    buf = io.BytesIO()
    img = Image.effect_noise(size, 64).convert(mode) if noise else Image.new(mode, size, colour)
    img.save(buf, "JPEG")
    return buf.getvalue()


def _cut(data: bytes, fraction: float) -> bytes:
    return data[:int(len(data) * fraction)]


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


GOOD_CAPTION = b'{"caption": "a red circle in the top left."}'
BAD_SAMPLES = {   # key -> (members, expected skip reason)
    "undecodable": ({"jpg": b"\x00\x01garbage" * 20, "json": GOOD_CAPTION}, "undecodable_image"),
    "truncated": ({"jpg": _cut(_jpeg((200, 200), noise=True), 0.6), "json": GOOD_CAPTION}, "truncated_image"),
    "zero_bytes": ({"jpg": b"", "json": GOOD_CAPTION}, "empty_image"),
    "one_pixel": ({"png": _png(Image.new("RGB", (1, 1))), "json": GOOD_CAPTION}, "tiny_image"),
    "bomb": ({"jpg": _jpeg((700, 700)), "json": GOOD_CAPTION}, "too_many_pixels"),
    "aspect": ({"png": _png(Image.new("RGB", (603, 2))), "json": GOOD_CAPTION}, "aspect_ratio"),
    "no_caption": ({"jpg": _jpeg()}, "missing_caption"),
    "blank_caption": ({"jpg": _jpeg(), "json": b'{"caption": "   "}'}, "empty_caption"),
    "not_utf8": ({"jpg": _jpeg(), "txt": b"caf\xe9 \xff\xfe"}, "bad_caption_encoding"),
    "bad_json": ({"jpg": _jpeg(), "json": b'{"caption": "a red'}, "malformed_json"),
    "no_image": ({"json": GOOD_CAPTION}, "missing_image"),
}
def _webp():
    buf = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 200, 10)).save(buf, "WEBP")
    return buf.getvalue()


CONVERTED = {   # odd modes are converted, not dropped
    "palette": _png(Image.new("RGB", (90, 70), (10, 200, 10)).convert("P")),
    "palette_alpha": _png(Image.new("RGBA", (90, 70), (10, 200, 10, 128)).convert("P")),
    "cmyk": _jpeg(mode="CMYK", colour=(0, 200, 200, 0)),
    "grey16": _png(Image.new("I;16", (90, 70), 40000)),
    "rgba": _png(Image.new("RGBA", (90, 70), (10, 10, 200, 50))),
    "webp": _webp(),
}


def _write(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def bad_shards(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = [(f"good{i}", {"jpg": _jpeg((60 + 10 * i, 50)), "json": GOOD_CAPTION}) for i in range(6)]
    ext = {b"\x89PNG": "png", b"RIFF": "webp"}
    good += [(k, {ext.get(v[:4], "jpg"): v, "json": GOOD_CAPTION}) for k, v in CONVERTED.items()]
    bad = [(k, m) for k, (m, _) in BAD_SAMPLES.items()]
    _write(root / "mixed.tar", good[:6] + bad + good[6:])
    _write(root / "cut_full.tar", [(f"cut{i}", {"jpg": _jpeg(), "json": GOOD_CAPTION}) for i in range(4)])
    raw = (root / "cut_full.tar").read_bytes()
    (root / "cut.tar").write_bytes(raw[:2 * 512 + 2 * 1024 + 700])     # ends inside sample 1's image
    (root / "cut_full.tar").unlink()
    (root / "garbage.tar").write_bytes(b"this is not a tar file" * 40)
    return root, [k for k, _ in good] + ["cut0"]


def test_every_bad_kind_is_skipped_and_counted_and_good_samples_all_arrive(shapes, bad_shards):
    root, good_keys = bad_shards
    d = data_cfg(shapes, sources=[str(root / "*.tar")], max_image_pixels=300_000, num_workers=0)
    reader = SourceReader(expand_shards(d.sources[0]), 0, seed=0, slot=0, num_slots=1, shuffle_shards=3)
    process = SampleProcessor(d, 16)
    arrived, skips = [], Counter()
    while True:
        before = Counter(reader.skips)
        raw = reader.next()
        if raw.epoch > 0:
            break
        try:
            process(raw.data, raw.ref)
            arrived.append(raw.key)
        except Exception as e:                                  # only SkipSample may escape the processor
            assert type(e).__name__ == "SkipSample", e
            skips[e.reason] += 1
    skips.update(before)
    expected = Counter(reason for _, reason in BAD_SAMPLES.values())
    expected.update({"truncated_tar": 1, "unreadable_shard": 1})      # cut.tar keeps cut0 only
    assert sorted(arrived) == sorted(good_keys)
    assert skips == expected


def test_training_loader_runs_through_bad_data_and_reports_counts(shapes, bad_shards):
    root, _ = bad_shards
    it = loader(shapes, sources=[str(root / "*.tar"), str(shapes[0] / "train" / "*.tar")], source_weights=[1.0, 1.0],
                max_image_pixels=300_000, num_workers=0)
    for _ in range(12):
        batch = next(it)
    for reason in ("undecodable_image", "truncated_image", "malformed_json", "truncated_tar", "unreadable_shard"):
        assert batch.stats["skipped"].get(reason, 0) >= 1, reason


def test_all_bad_data_stops_with_a_clear_error(shapes, tmp_path):
    _write(tmp_path / "a.tar", [(f"k{i}", {"jpg": b"nope", "json": GOOD_CAPTION}) for i in range(30)])
    it = loader(shapes, sources=[str(tmp_path / "a.tar")], num_workers=0, skip_window=50)
    with pytest.raises(RuntimeError, match=r"of the last 50 samples were skipped.*undecodable_image"):
        next(it)


def test_dali_and_pillow_give_the_same_batches_up_to_resize_rounding(shapes):
    pil, dali = loader(shapes, num_workers=0), loader(shapes, num_workers=0, decoder="dali")
    for _ in range(2):
        a, b = next(pil), next(dali)
        assert a.sample_keys == b.sample_keys and torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.targets, b.targets) and a.patches.shape == b.patches.shape
        diff = (a.patches - b.patches).abs()
        assert diff.mean() < 0.005 and diff.max() < 0.1            # bounds of tests/unit/test_dali.py


def test_stats_cli_stage1_packs_above_98_percent(tmp_path):
    make_shapes(tmp_path, samples=1600, shards=4, seed=0, heldout=16)
    subprocess.run([sys.executable, "-m", "genlip_mcore.data", "train-tokenizer", "--shards",
                    str(tmp_path / "train" / "*.tar"), "--out", str(tmp_path / "tok"), "--vocab-size", "400"],
                   check=True, capture_output=True, cwd=REPO)
    out = subprocess.run([sys.executable, "-m", "genlip_mcore.data", "stats", "--config",
                          "examples/configs/tiny_cpu.yaml", f"data.sources={tmp_path}/train/*.tar",
                          f"data.tokenizer_path={tmp_path}/tok/tokenizer.model", "data.max_seq_len=16384",
                          "--max-batches", "6"], check=True, capture_output=True, text=True, cwd=REPO)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["pack_efficiency"] >= 0.98 and stats["skipped"] == {} and stats["decoder"] == "pil"
    assert stats["batches"] == 7 and stats["samples_per_sec"] > 0 and stats["tokens_per_sec"] > 0
