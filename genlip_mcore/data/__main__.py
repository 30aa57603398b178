"""`genlip-data`: make the shapes dataset, train a tokenizer on captions, and measure the pipeline.

  genlip-data make-shapes --out DIR --samples N --shards K --seed S [--heldout N] [--max-side PX] [--square]
  genlip-data train-tokenizer --shards PATTERN [PATTERN ...] --out DIR --vocab-size N
  genlip-data stats --config FILE [section.key=value ...] [--max-batches N]
  genlip-data shapes-summary --config FILE [section.key=value ...] [--captions FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter


def _captions(patterns: list[str]):
    """Every caption/turn text of the given shards (json `caption`/`conversations`, or txt)."""
    from genlip_mcore.data.errors import SkipSample
    from genlip_mcore.data.sample import parse_record
    from genlip_mcore.data.shards import index_shard, read_sample
    from genlip_mcore.data.sources import expand_shards

    skips = Counter()
    for pattern in patterns:
        for shard in expand_shards(pattern):
            for ref in index_shard(shard, skips):
                try:
                    turns = parse_record(read_sample(ref), stage=2)
                except SkipSample:
                    continue
                for _, text in turns:
                    yield text


def make_shapes_cmd(a) -> dict:
    from genlip_mcore.data.shapes import make_shapes

    return make_shapes(a.out, samples=a.samples, shards=a.shards, seed=a.seed, heldout=a.heldout,
                       max_side=a.max_side, square=a.square)


def train_tokenizer_cmd(a) -> dict:
    from genlip_mcore.config import DataConfig
    from genlip_mcore.data.tokenizer import train_sentencepiece

    texts = list(_captions(a.shards)) + [DataConfig().prompt]
    if len(texts) < 2:
        raise SystemExit(f"genlip-data train-tokenizer: no captions found in {a.shards}")
    path = train_sentencepiece(texts, a.out, a.vocab_size)
    return {"tokenizer": str(path), "captions": len(texts) - 1, "vocab_size": a.vocab_size}


def stats_cmd(a) -> dict:
    from genlip_mcore import config as C
    from genlip_mcore.data.loader import DataLoader
    from genlip_mcore.data.packing import pack_efficiency

    cfg = C.load(a.config, a.overrides, world_size=1)
    if not cfg.data.sources:
        raise SystemExit("genlip-data stats: data.sources is empty")
    loader = DataLoader(cfg.data, patch_size=cfg.model.patch_size, seed=cfg.training.seed, dp_rank=0, dp_size=1,
                        micro_batch_size=1)
    first = next(loader)                          # worker start-up and the first buffer fill are not timed
    start, batches, start_samples = time.perf_counter(), [], first.stats["samples"]
    for _ in range(a.max_batches):
        batches.append(next(loader))
    dt = time.perf_counter() - start
    last = batches[-1].stats if batches else first.stats
    samples = sum(b.num_samples for b in batches)
    return {"samples": last["samples"], "skipped": last["skipped"], "batches": len(batches) + 1,
            "pack_efficiency": pack_efficiency(batches or [first]),
            "samples_per_sec": samples / dt if dt > 0 else None,
            "tokens_per_sec": sum(b.num_tokens for b in batches) / dt if dt > 0 else None,
            "decoder": cfg.data.decoder if cfg.data.decoder == "pil" else f"dali-{cfg.data.dali_device}",
            "stage": cfg.data.stage, "max_seq_len": cfg.data.max_seq_len,
            "samples_read_before_timing": start_samples}


def shapes_summary_cmd(a) -> str:
    """The quickstart's report after a run on shapes data (lines of text, not JSON)."""
    from pathlib import Path

    from genlip_mcore import config as C
    from genlip_mcore.data.shapes import summary

    cfg = C.load(a.config, a.overrides, world_size=1)
    captions = None
    if a.captions:
        try:
            captions = Path(a.captions).read_text()
        except OSError as e:
            raise ValueError(f"{a.captions}: cannot read the captions ({e.strerror or e})") from None
    return "\n".join(summary(cfg.data, cfg.model.patch_size, cfg.training.run_dir, captions))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="genlip-data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-shapes", help="write shards of coloured shapes with captions (+ a held-out split)")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--max-side", type=int, default=512, help="cap on the long side of the images (px)")
    p.add_argument("--square", action="store_true", help="square images only (stage-1 runs: no squashed shapes)")
    p.set_defaults(fn=make_shapes_cmd)
    p = sub.add_parser("train-tokenizer", help="train a SentencePiece model on the captions of some shards")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.set_defaults(fn=train_tokenizer_cmd)
    p = sub.add_parser("stats", help="run the pipeline as training would and print one JSON object")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--max-batches", type=int, default=20)
    p.set_defaults(fn=stats_cmd)
    p = sub.add_parser("shapes-summary", help="held-out loss, exact match and blind floor of a run on shapes data")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--captions", help="what genlip-caption printed for the held-out shards")
    p.set_defaults(fn=shapes_summary_cmd)
    a = ap.parse_args(argv)
    try:
        out = a.fn(a)
        print(out if isinstance(out, str) else json.dumps(out))
    except Exception as e:                        # config errors and data errors: one clear line, exit 2
        from genlip_mcore.config import ConfigError

        if isinstance(e, (ConfigError, RuntimeError, ValueError)):
            print(f"genlip-data {a.cmd}: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
