"""Coloured-shapes webdataset shards: the embedded default dataset for the quickstart and the tests.

Each image is a plain background (white or a light tint) with ONE shape (circle, square, triangle, diamond, star)
in one of eight well-separated colours, drawn inside one cell of a 3x3 grid (with jitter and size variation).
Image sizes and aspect ratios vary (sides 80..512 px, aspect up to 3:1, both orientations), so stage-2 native
resolution resizing has something to do; stage 1 simply resizes everything to 224.

The caption is fully determined by the image, from one fixed template::

    "a {colour} {shape} in the {position}."        e.g. "a red circle in the top left."

Every sample is two tar members written with `webdataset.TarWriter`:

* ``{key}.jpg``  - the image (JPEG, quality 90)
* ``{key}.json`` - ``{"caption", "conversations", "shape", "colour", "position", "background", "width",
  "height", "bbox"}``; ``conversations`` is the stage-2 form (human prompt ``"<image>\\nDescribe the image in
  detail."``, gpt answer = caption), so stage 1 (``caption``) and stage 2 (``conversations``) read the same shards.

Keys are ``{split}-{shard:05d}-{idx:06d}`` (idx counts samples within the split); files are
``{out}/train/shapes-{shard:05d}.tar`` and ``{out}/heldout/shapes-{shard:05d}.tar``; ``{out}/manifest.json``
describes them (shard paths relative to ``out``). Every sample is a pure function of (seed, split, idx), and the
tars carry fixed mtimes/owners, so a seed gives byte-identical shards.

CLI: ``python -m genlip_mcore.data.shapes OUT [--samples N] [--shards K] [--seed S] [--heldout H]``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

PROMPT = "<image>\nDescribe the image in detail."
TEMPLATE = "a {colour} {shape} in the {position}."

SHAPES = ("circle", "square", "triangle", "diamond", "star")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (250, 130, 10),
    "pink": (245, 110, 190),
    "black": (20, 20, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "grey": (232, 232, 232),
    "cream": (250, 244, 224),
    "pale blue": (224, 236, 250),
    "pale green": (228, 246, 228),
}

# name -> (row, col) in the 3x3 grid, raster order
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}

# long/short side ratios and their weights (square and mild ratios most often; 3:1 occasionally)
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0)
ASPECT_WEIGHTS = (0.30, 0.18, 0.16, 0.14, 0.12, 0.10)
MIN_SIDE, MAX_SIDE = 80, 512
SHAPE_FRAC = (0.6, 0.9)     # shape size as a fraction of the grid cell's short side
COLOUR_JITTER = 12          # +- per channel on the shape colour
JPEG_QUALITY = 90
SPLITS = ("train", "heldout")
_SPLIT_IDS = {"train": 0, "heldout": 1}

_CAPTION_RE = re.compile(
    r"^a (?P<colour>{}) (?P<shape>{}) in the (?P<position>{})\.$".format(
        "|".join(map(re.escape, COLOURS)), "|".join(SHAPES),
        "|".join(sorted(map(re.escape, POSITIONS), key=len, reverse=True))))


def caption_for(shape: str, colour: str, position: str) -> str:
    """The caption of an image showing a `colour` `shape` at `position` (the one fixed template)."""
    if shape not in SHAPES or colour not in COLOURS or position not in POSITIONS:
        raise ValueError(f"unknown attribute in {(shape, colour, position)!r}")
    return TEMPLATE.format(colour=colour, shape=shape, position=position)


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of `caption_for`: {"shape", "colour", "position"}; ValueError if it is not a shapes caption."""
    m = _CAPTION_RE.match(caption.strip())
    if m is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return {"shape": m["shape"], "colour": m["colour"], "position": m["position"]}


def caption_words() -> list[str]:
    """Every word that can appear in a caption (sorted; the final '.' is attached to the last word in captions,
    so the list also holds the bare '.')."""
    words = set(TEMPLATE.format(colour="", shape="", position="").replace(".", " ").split())
    words |= set(SHAPES)
    for name in (*COLOURS, *POSITIONS):
        words |= set(name.split())
    return sorted(words) + ["."]


def blind_floor(d, patch_size: int, limit: int = 1000):
    """The lowest mean caption-token loss that a model which cannot see the image can reach on shapes shards, or
    None if `d.sources` are not shapes data. A caption is a function of (colour, shape, position), drawn uniformly
    and independently, so the best blind log-loss of a whole caption is ln(8 * 5 * 9) nats, spread over its
    labelled tokens (caption and end tokens, as the training loss counts them; measured on up to `limit` samples
    with `d`'s tokenizer and layout)."""
    from collections import Counter

    from genlip_mcore.data.batch import IGNORE_INDEX
    from genlip_mcore.data.errors import SkipSample
    from genlip_mcore.data.sample import LayoutConfig, build_layout, parse_record
    from genlip_mcore.data.shards import index_shard, read_sample
    from genlip_mcore.data.sources import expand_shards
    from genlip_mcore.data.tokenizer import load_tokenizer

    tok = load_tokenizer(d.tokenizer_kind, d.tokenizer_path, d.end_text)
    layout_cfg = LayoutConfig(prompt=d.prompt, max_caption_tokens=d.max_caption_tokens, max_sample_len=d.max_sample_len)
    labelled, n = 0, 0
    for shard in (s for pattern in d.sources for s in expand_shards(pattern)):
        for ref in index_shard(shard, Counter()):
            try:                                 # a sample training would skip (no caption, bad json) is left out
                turns = parse_record(read_sample(ref), d.stage)
                layout = build_layout((1, 1), turns, tok, layout_cfg)
            except SkipSample:
                continue
            try:
                parse_caption(" ".join(t for role, t in turns if role == "assistant"))
            except ValueError:
                return None
            labelled += sum(lab != IGNORE_INDEX for lab in layout.labels)
            n += 1
            if n >= limit:
                break
        if n >= limit:
            break
    if not n:
        return None
    return math.log(len(COLOURS) * len(SHAPES) * len(POSITIONS)) / (labelled / n)


def summary(d, patch_size: int, run_dir, captions: Optional[str] = None) -> list[str]:
    """The quickstart's closing report, from a finished run on shapes data: the held-out loss beside the exact-match
    rate of the greedy captions (`captions`: what genlip-caption printed, or None), then the training loss against
    the blind floor of the held-out shards (`d.valid_sources`, else `d.sources`). ValueError names a missing piece."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        raise ValueError(f"{path}: no metrics (has the run trained?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines ({e})") from None
    # Rows of earlier attempts in the same run dir come first: the latest rows win (last row per iteration).
    train = [(r["iteration"], r["loss"]) for r in rows if r.get("loss") is not None]
    valid = [r for r in rows if r.get("valid_loss") is not None]
    if not train:
        raise ValueError(f"{path}: no training loss logged")
    first = min(dict(train))
    lines = []
    if valid:
        v = valid[-1]
        lines.append(f"held-out loss {v['valid_loss']:.4f} (iteration {v['iteration']}, "
                     f"{v.get('valid_tokens', '?')} caption tokens)")
    else:
        lines.append("held-out loss: none logged (data.valid_sources not set)")
    m = re.search(r"exact match: ([\d.]+%) of (\d+) held-out images", captions or "")
    if m:
        lines[0] += f", exact match {m[1]} of {m[2]} held-out images"
    line = (f"training loss {dict(train)[first]:.4f} (iteration {first}) -> {train[-1][1]:.4f} "
            f"(iteration {train[-1][0]})")
    floor = blind_floor(replace(d, sources=list(d.valid_sources or d.sources)), patch_size)
    if floor is not None:
        line += (f"; a model blind to the image cannot go below ~{floor:.4f} on this data (ln "
                 f"{len(COLOURS) * len(SHAPES) * len(POSITIONS)} nats per caption over its labelled tokens)")
    return lines + [line]


def _image_size(rng: np.random.Generator, max_side: int = MAX_SIDE, square: bool = False) -> tuple[int, int]:
    ratio = float(ASPECTS[rng.choice(len(ASPECTS), p=ASPECT_WEIGHTS)])
    ratio = 1.0 if square else ratio
    lo = max(MIN_SIDE, math.ceil(MIN_SIDE * ratio))
    long = int(rng.integers(lo, max(lo, max_side) + 1))
    short = max(MIN_SIDE, round(long / ratio))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":   # apex up, fills the bbox
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":       # five points, apex up
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def render_sample(seed: int, split: str, idx: int, max_side: int = MAX_SIDE,
                  square: bool = False) -> tuple[Image.Image, dict]:
    """Sample `idx` of `split` for `seed`: (RGB image, metadata json dict). Pure function of its arguments.
    `max_side` caps the long side (never below what the aspect ratio needs at an 80 px short side); `square`
    makes every image square (for stage-1 runs, whose fixed square resize would otherwise squash the shapes)."""
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(idx)])
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    w, h = _image_size(rng, max_side, square)

    row, col = POSITIONS[position]
    cw, ch = w / 3, h / 3
    size = float(rng.uniform(*SHAPE_FRAC)) * min(cw, ch)
    r = size / 2
    # jitter keeps the whole shape inside its own cell, so the position is never ambiguous
    cx = (col + 0.5) * cw + float(rng.uniform(-1, 1)) * (cw - size) / 2
    cy = (row + 0.5) * ch + float(rng.uniform(-1, 1)) * (ch - size) / 2
    fill = tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255))
                 for c in COLOURS[colour])

    img = Image.new("RGB", (w, h), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)

    caption = caption_for(shape, colour, position)
    meta = {
        "caption": caption,
        "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": caption}],
        "shape": shape, "colour": colour, "position": position, "background": background,
        "width": w, "height": h, "bbox": [round(v, 2) for v in box],
    }
    return img, meta


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_shard(path: Path, seed: int, split: str, shard: int, first: int, count: int,
                 max_side: int = MAX_SIDE, square: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        sink = wds.TarWriter(f, encoder=False, mtime=0, user="genlip", group="genlip")
        for idx in range(first, first + count):
            img, meta = render_sample(seed, split, idx, max_side, square)
            sink.write({"__key__": f"{split}-{shard:05d}-{idx:06d}", "jpg": _encode_jpeg(img),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
        sink.close()
    os.replace(tmp, path)


def _split_counts(n: int, shards: int) -> list[int]:
    return [n // shards + (1 if i < n % shards else 0) for i in range(shards)]


def make_shapes(out_dir, samples: int, shards: int, seed: int, heldout: int | None = None,
                max_side: int = MAX_SIDE, square: bool = False) -> dict:
    """Write `samples` training samples evenly over `shards` tars under `out_dir`/train and a held-out split of
    `heldout` samples (default 5%, at least 16) under `out_dir`/heldout, in as many shards as it needs at the
    training shard size. Deterministic for `seed` (and `max_side`, the cap on an image's long side: small images
    for a stage-1 run decode several times faster; and `square`: square images only, undistorted by stage 1). Returns the manifest (also written to `out_dir`/manifest.json):
    {"splits": {split: {"shards": [paths relative to out_dir], "samples": N, "samples_per_shard": [...]}},
     "seed", "vocabulary", "prompt", "template", "shapes", "colours", "positions", "backgrounds"}.
    """
    samples, shards, seed = int(samples), int(shards), int(seed)
    if shards < 1 or samples < shards:
        raise ValueError(f"need 1 <= shards <= samples, got samples={samples} shards={shards}")
    if heldout is None:
        heldout = max(16, round(0.05 * samples))
    heldout = int(heldout)
    if heldout < 0:
        raise ValueError(f"heldout must be >= 0, got {heldout}")
    out = Path(out_dir)
    per_shard = math.ceil(samples / shards)
    layout = {"train": _split_counts(samples, shards),
              "heldout": _split_counts(heldout, math.ceil(heldout / per_shard)) if heldout else []}

    manifest: dict = {"splits": {}, "seed": seed, "max_side": int(max_side), "square": bool(square)}
    for split in SPLITS:
        paths, first = [], 0
        for shard, count in enumerate(layout[split]):
            rel = f"{split}/shapes-{shard:05d}.tar"
            _write_shard(out / rel, seed, split, shard, first, count, max_side, square)
            paths.append(rel)
            first += count
        manifest["splits"][split] = {"shards": paths, "samples": first, "samples_per_shard": layout[split]}
    manifest.update(vocabulary=caption_words(), prompt=PROMPT, template=TEMPLATE, shapes=list(SHAPES),
                    colours={k: list(v) for k, v in COLOURS.items()}, positions=list(POSITIONS),
                    backgrounds={k: list(v) for k, v in BACKGROUNDS.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--max-side", type=int, default=MAX_SIDE)
    p.add_argument("--square", action="store_true")
    a = p.parse_args(argv)
    m = make_shapes(a.out, a.samples, a.shards, a.seed, a.heldout, a.max_side, a.square)
    print(json.dumps({s: v["samples"] for s, v in m["splits"].items()}))


if __name__ == "__main__":
    main()
