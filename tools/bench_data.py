"""Data pipeline throughput, Pillow vs DALI, side by side in one process on the same shards.

For stage 1 (224 px) and stage 2 (NaViT smart_resize) it runs the loader exactly as training does, in-process
(data.num_workers=0, so the figure is per loader process), and prints samples/s, packed tokens/s, packing
efficiency and the DALI/Pillow ratio. Contenders alternate over --rounds; the median is reported.

  python tools/bench_data.py                      # generates 2000 shapes samples in a temp dir
  python tools/bench_data.py --shards '/data/x/{000..009}.tar' --tokenizer tok/tokenizer.model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import genlip_mcore  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genlip_mcore import config as C
from genlip_mcore.data.loader import DataLoader
from genlip_mcore.data.packing import pack_efficiency


def measure(d: C.DataConfig, batches: int) -> dict:
    loader = DataLoader(d, patch_size=16, seed=0, dp_rank=0, dp_size=1, micro_batch_size=1)
    next(loader)                                        # first buffer fill: not timed
    start = time.perf_counter()
    out = [next(loader) for _ in range(batches)]
    dt = time.perf_counter() - start
    return {"samples_per_sec": sum(b.num_samples for b in out) / dt,
            "tokens_per_sec": sum(b.num_tokens for b in out) / dt, "pack_efficiency": pack_efficiency(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", help="shard pattern (default: generated shapes)")
    ap.add_argument("--tokenizer", help="SentencePiece model (default: trained on the shards' captions)")
    ap.add_argument("--max-seq-len", type=int, default=16384)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dali-device", default="cpu", choices=["cpu", "mixed"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    shards, tok = a.shards, a.tokenizer
    if shards is None:
        from genlip_mcore.data.shapes import make_shapes

        make_shapes(tmp.name, samples=2000, shards=4, seed=0)
        shards = f"{tmp.name}/train/*.tar"
    if tok is None:
        from genlip_mcore.data.__main__ import _captions
        from genlip_mcore.data.tokenizer import train_sentencepiece

        tok = str(train_sentencepiece(list(_captions([shards])), Path(tmp.name) / "tok", 400))
    results = {}
    for stage in (1, 2):
        runs = {"pil": [], "dali": []}
        for r in range(a.rounds):
            order = ["pil", "dali"] if r % 2 == 0 else ["dali", "pil"]
            for dec in order:
                d = C.DataConfig(sources=[shards], tokenizer_path=tok, stage=stage, decoder=dec,
                                 dali_device=a.dali_device, max_seq_len=a.max_seq_len, num_workers=0)
                runs[dec].append(measure(d, a.batches))
        results[f"stage{stage}"] = {dec: {k: statistics.median(m[k] for m in ms) for k in ms[0]}
                                    for dec, ms in runs.items()}
    if a.json:
        print(json.dumps(results))
        return 0
    print(f"data pipeline, one loader process, rows of {a.max_seq_len} tokens, median of {a.rounds} rounds "
          f"x {a.batches} rows, shards {shards}")
    print(f"{'stage':8s}{'decoder':10s}{'samples/s':>12s}{'tokens/s':>14s}{'pack eff.':>11s}")
    for stage, by in results.items():
        for dec, m in by.items():
            name = dec if dec == "pil" else f"dali-{a.dali_device}"
            print(f"{stage:8s}{name:10s}{m['samples_per_sec']:12.1f}{m['tokens_per_sec']:14,.0f}"
                  f"{m['pack_efficiency']:11.4f}")
        ratio = by["dali"]["samples_per_sec"] / by["pil"]["samples_per_sec"]
        print(f"{stage}: dali/pil = {ratio:.2f}x samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
