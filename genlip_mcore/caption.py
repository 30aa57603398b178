"""`genlip-caption`: greedy captions from a training checkpoint (any TP/PP layout) or an HF export directory.

    genlip-caption --checkpoint runs/tiny/checkpoints img1.jpg img2.png      # a save dir (follows `latest`) or iter_*
    genlip-caption --hf exports/genlip-l16 --stage 2 --max-new-tokens 256 photo.jpg

Prints one line per image, `path<TAB>caption`, in the order given (whitespace runs inside a caption, newlines
included, become one space). An image that cannot be read is reported on stderr and the exit status is 1; the
others are still captioned. With --shards, a sample whose image or caption cannot be read is left out of the
exact-match rate and counted by reason (on stderr and in the summary line).

Everything runs through the HF model (`hf/modeling_genlip.py`) in fp32: a checkpoint is first turned into HF-layout
tensors by `inference.load_for_inference`, so both sources give the same numbers. An export is checked before it
is used: tensors missing, unexpected, of the wrong shape or holding NaN/Inf, or a layer count other than
config.json's, end the command with one line naming the file and the tensors. Images are preprocessed exactly as in
training (`data.images`: stage 1 a fixed square, stage 2 native resolution) and the prompt is laid out as in
training (`data.sample`: [image][prompt ids], the prompt stripped and tokenized on its own).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from genlip_mcore import logs
from genlip_mcore.data.errors import SkipSample
from genlip_mcore.data.images import ImageConfig, decode_pil
from genlip_mcore.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_kind
from genlip_mcore.hf.configuration_genlip import DEFAULT_PROMPT
from genlip_mcore.hf.export import check_hf_weights, hf_config, load_hf_config
from genlip_mcore.hf.modeling_genlip import GenLIPModel

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------
def _image_config(stage, image_size, patch_size, min_pixels, max_pixels, **limits) -> ImageConfig:
    return ImageConfig(stage=int(stage), image_size=image_size, patch_size=patch_size, min_pixels=min_pixels,
                       max_pixels=max_pixels, **limits)


def _from_checkpoint(path, tokenizer, stage):
    from genlip_mcore.inference import load_for_inference

    cfg, state, tok_copy = load_for_inference(path)
    config = hf_config(cfg)
    with torch.device("meta"):            # no random init of weights that are replaced right away
        model = GenLIPModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    d = cfg.data
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer_kind(tokenizer), tokenizer, d.end_text)
    else:
        tok = load_tokenizer(d.tokenizer_kind, tok_copy or d.tokenizer_path, d.end_text)
    image_cfg = _image_config(stage or d.stage, d.image_size, cfg.model.patch_size, d.min_pixels, d.max_pixels,
                              max_image_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio,
                              jpeg_draft=d.jpeg_draft)
    return model, tok, image_cfg, d.prompt


def _from_hf(path, tokenizer, stage):
    check_hf_weights(path, load_hf_config(path))   # from_pretrained would fill gaps randomly and keep NaN
    # no dtype keyword: transformers < 4.56 calls it torch_dtype, >= 5 deprecates that; load_captioner casts to fp32
    model = GenLIPModel.from_pretrained(path)
    c = model.config
    tok_path = tokenizer if tokenizer is not None else path
    tok = load_tokenizer(tokenizer_kind(tok_path), tok_path, getattr(c, "end_text", None))
    image_cfg = _image_config(stage or getattr(c, "image_stage", 1), getattr(c, "image_size", 224), c.patch_size,
                              getattr(c, "min_pixels", 4096), getattr(c, "max_pixels", 262144),
                              jpeg_draft=bool(getattr(c, "jpeg_draft", False)))
    return model, tok, image_cfg, getattr(c, "prompt", DEFAULT_PROMPT)


def load_captioner(checkpoint=None, hf=None, tokenizer=None, *, stage: Optional[int] = None,
                   device: Optional[str] = None):
    """-> (model, tokenizer, image_cfg, prompt), the model in eval mode, fp32, on `device` (default: cuda if present).

    checkpoint: a save dir or one iter_* dir (any TP/PP). hf: an export directory (config.json + safetensors +
    tokenizer files). tokenizer: overrides the checkpoint's copy / the export's files. stage: overrides the image
    preprocessing of the checkpoint (1: fixed square, 2: native resolution)."""
    if (checkpoint is None) == (hf is None):
        raise ValueError("give exactly one of checkpoint and hf")
    model, tok, image_cfg, prompt = (_from_checkpoint(checkpoint, tokenizer, stage) if checkpoint is not None
                                     else _from_hf(hf, tokenizer, stage))
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model's vocabulary is {model.config.vocab_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=torch.float32).eval(), tok, image_cfg, prompt


# ------------------------------------------------------------------------------------------------------------------
# Captioning
# ------------------------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt as training lays it out: stripped, tokenized on its own, no special tokens (spec §6.3)."""
    prompt = (prompt or "").strip()
    return tokenizer.encode(prompt) if prompt else []


def iter_captions(model: GenLIPModel, tokenizer: Tokenizer, image_cfg: ImageConfig, paths: Sequence[str | Path],
                  prompt: str, max_new_tokens: int,
                  batch_size: int) -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    """(path, caption, None) per image in order, or (path, None, reason) for an image that cannot be read."""
    ids = prompt_ids(tokenizer, prompt)
    paths = [str(p) for p in paths]
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = paths[start:start + max(1, batch_size)]
        images, errors = {}, {}
        for p in chunk:
            try:
                images[p] = decode_pil(Path(p).read_bytes(), image_cfg)      # [3, H, W] in [-1, 1]
            except (SkipSample, OSError) as e:
                errors[p] = f"{type(e).__name__}: {e}"
        good = [p for p in chunk if p in images]
        out = model.generate_captions([images[p] for p in good], prompt_ids=ids, max_new_tokens=max_new_tokens,
                                      end_ids=tokenizer.end_ids) if good else []
        captions = dict(zip(good, out, strict=True))
        for p in chunk:
            if p in errors:
                yield p, None, errors[p]
            else:
                yield p, tokenizer.decode(captions[p]), None


def _held_out_samples(pattern: str, image_cfg: ImageConfig, skipped: Counter) -> Iterator[tuple[str, Tensor, str]]:
    """(key, image, truth) of every readable sample; the others are counted in `skipped` by reason (data.errors)."""
    from genlip_mcore.data.loader import IMAGE_EXTS
    from genlip_mcore.data.sample import parse_record
    from genlip_mcore.data.shards import index_shard, read_sample
    from genlip_mcore.data.sources import expand_shards

    shards = expand_shards(pattern)
    if not shards:
        raise FileNotFoundError(f"--shards {pattern}: no shard file matches")
    for shard in shards:
        for ref in index_shard(shard, skipped):
            try:
                data = read_sample(ref)
            except OSError:
                skipped["unreadable_shard"] += 1
                break
            try:
                image = next((data[e] for e in IMAGE_EXTS if e in data), None)
                if image is None:
                    raise SkipSample("missing_image", ref.key)
                truth = " ".join(t for role, t in parse_record(data, stage=2) if role == "assistant")
                yield ref.key, decode_pil(image, image_cfg), truth
            except SkipSample as e:
                skipped[e.reason] += 1
            except OSError:
                skipped["undecodable_image"] += 1


def caption_shards(model, tokenizer, image_cfg, pattern: str, prompt: str, max_new_tokens: int, batch_size: int,
                   limit: Optional[int] = None, skipped: Optional[Counter] = None) -> list[dict]:
    """Greedy captions of the images in webdataset shards, next to each sample's own caption (held-out evaluation).
    Returns [{"key", "caption", "truth"}] in shard order. Samples whose image or caption cannot be read are not
    captioned: each is counted in `skipped` by reason, so a score can say what it leaves out."""
    skipped = Counter() if skipped is None else skipped
    items = []
    for item in _held_out_samples(pattern, image_cfg, skipped):
        items.append(item)
        if limit and len(items) >= limit:
            break
    ids, out = prompt_ids(tokenizer, prompt), []
    for start in range(0, len(items), max(1, batch_size)):
        chunk = items[start:start + max(1, batch_size)]
        gen = model.generate_captions([img for _, img, _ in chunk], prompt_ids=ids, max_new_tokens=max_new_tokens,
                                      end_ids=tokenizer.end_ids)
        out += [{"key": k, "caption": tokenizer.decode(g).strip(), "truth": t.strip()}
                for (k, _, t), g in zip(chunk, gen, strict=True)]
    return out


def skip_summary(skipped: Counter) -> str:
    """"3 dropped: missing_image 1, malformed_json 2", or "" when nothing was dropped."""
    n = sum(skipped.values())
    return f"{n} dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()) if v) if n else ""


def exact_match(rows: list[dict]) -> float:
    return sum(r["caption"] == r["truth"] for r in rows) / max(len(rows), 1)


def attribute_accuracy(rows: list[dict]) -> Optional[dict[str, float]]:
    """For the generated shapes data (every truth in its fixed template): the fraction of captions that name the
    right colour, shape and position; None for other data."""
    from genlip_mcore.data.shapes import parse_caption

    try:
        truths = [parse_caption(r["truth"]) for r in rows]
    except ValueError:
        return None
    hits = {"colour": 0, "shape": 0, "position": 0}
    for r, t in zip(rows, truths, strict=True):
        try:
            got = parse_caption(r["caption"])
        except ValueError:
            continue
        for k in hits:
            hits[k] += got[k] == t[k]
    return {k: v / max(len(rows), 1) for k, v in hits.items()} if rows else None


def caption_files(model, tokenizer, image_cfg, paths, prompt, max_new_tokens, batch_size) -> list[str]:
    """Greedy captions of image files, in order. Raises ValueError naming the first image that cannot be read."""
    captions = []
    for path, caption, error in iter_captions(model, tokenizer, image_cfg, paths, prompt, max_new_tokens,
                                              batch_size):
        if error is not None:
            raise ValueError(f"{path}: {error}")
        captions.append(caption)
    return captions


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genlip-caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training save dir (follows `latest`) or one iter_* checkpoint")
    src.add_argument("--hf", help="HF export directory (config.json, model.safetensors, tokenizer files)")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--shards", default=None, help="caption the images of webdataset shards and compare each with its "
                   "own caption (held-out evaluation): prints key, caption, truth and the exact-match rate")
    p.add_argument("--limit", type=int, default=None, help="with --shards: at most this many samples")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="images captioned together (padded batch)")
    p.add_argument("--prompt", default=None, help="default: the prompt the model was trained with")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model / tokenizer.json (or a directory holding one)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=None,
                   help="image preprocessing: 1 fixed square, 2 native resolution (default: the model's)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(logging.WARNING, stream="stderr", fmt="%(levelname)s %(name)s: %(message)s")   # stdout: captions
    if args.hf:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()        # transformers 5 draws a bar for loading a few MB of weights
    from genlip_mcore.ckpt import CheckpointError
    from genlip_mcore.config import ConfigError

    try:
        model, tok, image_cfg, prompt = load_captioner(args.checkpoint, args.hf, args.tokenizer, stage=args.stage,
                                                       device=args.device)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"genlip-caption: {e}", file=sys.stderr)
        return 2
    prompt = prompt if args.prompt is None else args.prompt
    if args.shards:
        skipped: Counter = Counter()
        try:
            rows = caption_shards(model, tok, image_cfg, args.shards, prompt, args.max_new_tokens, args.batch_size,
                                  args.limit, skipped)
        except FileNotFoundError as e:
            print(f"genlip-caption: {e}", file=sys.stderr)
            return 2
        for r in rows:
            print(f"{'ok  ' if r['caption'] == r['truth'] else 'MISS'} {r['key']}\t{r['caption']}\t(true: {r['truth']})")
        dropped = skip_summary(skipped)
        if dropped:
            print(f"genlip-caption: {args.shards}: {dropped} (not in the exact-match rate)", file=sys.stderr)
        rate = f"exact match: {exact_match(rows):.1%} of {len(rows)} held-out images"
        print(f"{rate} ({dropped})" if dropped else rate)
        per = attribute_accuracy(rows)
        if per is not None:
            print("attributes right: " + ", ".join(f"{k} {v:.1%}" for k, v in per.items()))
        return 0 if rows else 1
    if not args.images:
        print("genlip-caption: give image files or --shards", file=sys.stderr)
        return 2
    failed = 0
    for path, caption, error in iter_captions(model, tok, image_cfg, args.images, prompt, args.max_new_tokens,
                                              args.batch_size):
        if error is not None:
            failed += 1
            print(f"{path}: skipped ({error})", file=sys.stderr)
            continue
        print(f"{path}\t{' '.join(caption.split())}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
