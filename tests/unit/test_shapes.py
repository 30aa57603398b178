"""The coloured-shapes generator: deterministic real webdataset shards whose captions are fully fixed by the image."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from genlip_mcore.data import shapes as S

SEED = 7


def _read_tar(path):
    """{key: {ext: bytes}} in member order."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    manifest = S.make_shapes(root / "a", samples=150, shards=3, seed=SEED, heldout=20)
    return root, manifest


def _all_samples(root, manifest):
    for split, info in manifest["splits"].items():
        for shard, rel in enumerate(info["shards"]):
            for key, members in _read_tar(root / "a" / rel).items():
                yield split, shard, key, members


def test_deterministic_for_a_seed(ds, tmp_path):
    root, manifest = ds
    again = S.make_shapes(tmp_path / "b", samples=150, shards=3, seed=SEED, heldout=20)
    assert again == manifest
    for info in manifest["splits"].values():
        for rel in info["shards"]:
            assert (root / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (root / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    other = S.make_shapes(tmp_path / "c", samples=150, shards=3, seed=SEED + 1, heldout=20)
    rel = other["splits"]["train"]["shards"][0]
    assert (root / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_counts_layout_and_manifest(ds):
    root, manifest = ds
    assert json.loads((root / "a" / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == SEED
    assert manifest["vocabulary"] == S.caption_words()
    train, held = manifest["splits"]["train"], manifest["splits"]["heldout"]
    assert train["shards"] == [f"train/shapes-{i:05d}.tar" for i in range(3)]
    assert train["samples"] == 150 and train["samples_per_shard"] == [50, 50, 50]
    assert held["shards"] == ["heldout/shapes-00000.tar"]
    assert held["samples"] == 20 and held["samples_per_shard"] == [20]
    seen = {"train": [], "heldout": []}
    for split, shard, key, members in _all_samples(root, manifest):
        assert sorted(members) == ["jpg", "json"]
        m = re.fullmatch(rf"{split}-(\d{{5}})-(\d{{6}})", key)
        assert m and int(m[1]) == shard
        seen[split].append(int(m[2]))
    assert seen["train"] == list(range(150)) and seen["heldout"] == list(range(20))
    per_shard = [len(_read_tar(root / "a" / rel)) for rel in train["shards"]]
    assert per_shard == [50, 50, 50]


def test_uneven_split_and_default_heldout(tmp_path):
    m = S.make_shapes(tmp_path, samples=41, shards=4, seed=0)
    assert m["splits"]["train"]["samples_per_shard"] == [11, 10, 10, 10]
    assert m["splits"]["heldout"]["samples"] == 16          # 5% of 41 is under the minimum of 16
    assert sum(len(_read_tar(tmp_path / r)) for r in m["splits"]["heldout"]["shards"]) == 16
    assert S.make_shapes(tmp_path / "big", samples=40, shards=1, seed=0, heldout=100)["splits"]["heldout"][
        "samples_per_shard"] == [34, 33, 33]                # held-out shards are no bigger than training shards
    with pytest.raises(ValueError):
        S.make_shapes(tmp_path / "bad", samples=2, shards=3, seed=0)


def test_images_decode_with_varied_sizes(ds):
    root, manifest = ds
    sizes = set()
    for _, _, _key, members in _all_samples(root, manifest):
        img = Image.open(io.BytesIO(members["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        img.load()
        meta = json.loads(members["json"])
        assert img.size == (meta["width"], meta["height"])
        assert S.MIN_SIDE <= min(img.size) and max(img.size) <= S.MAX_SIDE
        sizes.add(img.size)
    ratios = [w / h for w, h in sizes]
    assert len(sizes) > 50
    assert any(r > 1.2 for r in ratios) and any(r < 1 / 1.2 for r in ratios) and any(r == 1 for r in ratios)
    assert max(max(r, 1 / r) for r in ratios) >= 2.5
    assert len({round(max(r, 1 / r), 1) for r in ratios}) >= 5


def test_captions_match_attributes(ds):
    root, manifest = ds
    vocab = set(S.caption_words())
    combos = set()
    for _, _, _, members in _all_samples(root, manifest):
        meta = json.loads(members["json"])
        cap = meta["caption"]
        assert cap == cap.lower() and cap == S.caption_for(meta["shape"], meta["colour"], meta["position"])
        assert S.parse_caption(cap) == {k: meta[k] for k in ("shape", "colour", "position")}
        assert meta["conversations"] == [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                         {"from": "gpt", "value": cap}]
        assert set(cap[:-1].split()) <= vocab and cap.endswith(".")
        combos.add((meta["shape"], meta["colour"], meta["position"]))
    assert {c[0] for c in combos} == set(S.SHAPES)
    assert {c[1] for c in combos} == set(S.COLOURS)
    assert {c[2] for c in combos} == set(S.POSITIONS)
    with pytest.raises(ValueError):
        S.parse_caption("a red blob in the top left.")


def test_image_shows_the_stated_colour_at_the_stated_position(ds):
    root, manifest = ds
    checked = 0
    for _, _, _, members in _all_samples(root, manifest):
        meta = json.loads(members["json"])
        px = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"), dtype=np.float32)
        h, w, _ = px.shape
        x0, y0, x1, y1 = meta["bbox"]
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        # the shape's centre lies in the grid cell that the caption names
        row, col = S.POSITIONS[meta["position"]]
        assert int(cx // (w / 3)) == col and int(cy // (h / 3)) == row, meta
        # the pixels at the shape's centre have the shape's colour
        d = max(1, int(0.15 * r))
        patch = px[int(cy) - d:int(cy) + d + 1, int(cx) - d:int(cx) + d + 1].reshape(-1, 3).mean(0)
        assert np.abs(patch - np.array(S.COLOURS[meta["colour"]])).max() < 40, (meta, patch)
        # and the nearest named colour is the stated one
        names = list(S.COLOURS)
        dist = [np.linalg.norm(patch - np.array(S.COLOURS[n])) for n in names]
        assert names[int(np.argmin(dist))] == meta["colour"]
        # the image corner farthest from the shape is plain background
        fx = 0 if cx > w / 2 else w - 4
        fy = 0 if cy > h / 2 else h - 4
        corner = px[fy:fy + 4, fx:fx + 4].reshape(-1, 3).mean(0)
        assert np.abs(corner - np.array(S.BACKGROUNDS[meta["background"]])).max() < 10, (meta, corner)
        checked += 1
    assert checked == 170


def test_readable_by_webdataset(ds):
    import webdataset as wds

    root, manifest = ds
    urls = [str(root / "a" / r) for r in manifest["splits"]["heldout"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 20
    assert isinstance(samples[0]["jpg"], Image.Image)
    assert S.parse_caption(samples[0]["json"]["caption"])["shape"] == samples[0]["json"]["shape"]


def test_heldout_differs_from_train(ds):
    root, manifest = ds
    train = {m["jpg"] for s, _, _, m in _all_samples(root, manifest) if s == "train"}
    held = [m["jpg"] for s, _, _, m in _all_samples(root, manifest) if s == "heldout"]
    assert not train & set(held)


def test_caption_words():
    words = S.caption_words()
    assert words == sorted(set(words) - {"."}) + ["."]
    assert {"a", "in", "the", "red", "circle", "top", "left", "center"} <= set(words)
    assert "pale" not in words                              # backgrounds never appear in captions


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from genlip_mcore.config import DataConfig
    from genlip_mcore.data.tokenizer import train_sentencepiece

    texts = [S.caption_for(s, c, p) for s in S.SHAPES for c in S.COLOURS for p in S.POSITIONS]
    return str(train_sentencepiece(texts + [DataConfig().prompt], tmp_path_factory.mktemp("tok"), vocab_size=300))


def _shard(path, samples):
    import webdataset as wds

    with open(path, "wb") as f:
        sink = wds.TarWriter(f)
        for i, members in enumerate(samples):
            sink.write({"__key__": f"s{i:03d}", **members})
        sink.close()
    return str(path)


def test_blind_floor_leaves_out_samples_training_would_skip(ds, tok, tmp_path):
    from genlip_mcore.config import DataConfig

    good = []
    for i in range(3):
        img, meta = S.render_sample(SEED, "train", i)
        good.append({"jpg": S._encode_jpeg(img), "json": json.dumps(meta).encode()})
    bad = [{"jpg": good[0]["jpg"]}, {"jpg": good[0]["jpg"], "json": b'{"url": "x"}'}, {"json": b"{not json"}]
    clean = DataConfig(sources=[_shard(tmp_path / "clean.tar", good)], tokenizer_path=tok)
    mixed = DataConfig(sources=[_shard(tmp_path / "mixed.tar", [bad[0], good[0], *bad[1:], *good[1:]])],
                       tokenizer_path=tok)
    floor = S.blind_floor(clean, 16)
    assert floor is not None and S.blind_floor(mixed, 16) == floor
    not_shapes = [{"jpg": good[0]["jpg"], "json": json.dumps({"caption": "a photo of a dog"}).encode()}]
    assert S.blind_floor(DataConfig(sources=[_shard(tmp_path / "dog.tar", not_shapes)], tokenizer_path=tok), 16) is None


def _metrics(run_dir, rows):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_quickstart_summary_reports_held_out_loss_beside_exact_match(ds, tok, tmp_path, capsys):
    from genlip_mcore.config import DataConfig
    from genlip_mcore.data.__main__ import main

    root, manifest = ds
    held = str(root / "a" / manifest["splits"]["heldout"]["shards"][0])
    d = DataConfig(sources=[str(root / "a" / "train" / "*.tar")], valid_sources=[held], tokenizer_path=tok)
    _metrics(tmp_path / "run", [
        {"iteration": 1, "loss": 9.0}, {"iteration": 2, "loss": 8.0}, {"iteration": 2, "valid_loss": 7.0},  # earlier
        {"iteration": 1, "loss": 5.0}, {"iteration": 2, "valid_loss": 0.75, "valid_ppl": 2.1, "valid_tokens": 40},
        {"iteration": 2, "loss": 1.0, "lr": 1e-3}])
    captions = "ok   k\ta red circle in the top.\t(true: ...)\nexact match: 95.0% of 20 held-out images\n"
    lines = S.summary(d, 16, tmp_path / "run", captions)
    floor = S.blind_floor(DataConfig(sources=[held], tokenizer_path=tok), 16)
    assert lines == [
        "held-out loss 0.7500 (iteration 2, 40 caption tokens), exact match 95.0% of 20 held-out images",
        f"training loss 5.0000 (iteration 1) -> 1.0000 (iteration 2); a model blind to the image cannot go below ~{floor:.4f} on this data "
        "(ln 360 nats per caption over its labelled tokens)"]
    (tmp_path / "captions.txt").write_text(captions)
    (tmp_path / "c.yaml").write_text("model:\n  variant: tiny\n")
    args = ["shapes-summary", "--config", str(tmp_path / "c.yaml"), "--captions", str(tmp_path / "captions.txt"),
            f"data.sources={d.sources[0]}", f"data.valid_sources={held}", f"data.tokenizer_path={tok}"]
    assert main([*args, f"training.run_dir={tmp_path / 'run'}"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    assert main([*args, f"training.run_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"genlip-data shapes-summary: {tmp_path / 'none' / 'metrics.jsonl'}: no metrics (has the run trained?)"
