"""`genlip-pretrain --config FILE [section.key=value ...]` (also `python -m genlip_mcore.train`).

Launched directly (one process) or under torchrun/srun. With `data.sources` it trains on webdataset shards;
without, on the generated colour-patch packs of `genlip_mcore.data.synthetic` (the tests' fast default): their
captions name patch colours, so a model that cannot see the image stays at the colour prior, and the run ends by
printing that floor next to its own loss.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from genlip_mcore import config as C
from genlip_mcore import logs

log = logging.getLogger("genlip_mcore.train")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="genlip-pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (see examples/configs)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return ap.parse_args(argv)


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logs.setup()
    from genlip_mcore.parallel import init_distributed

    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        cfg = C.load(args.config, args.overrides, world_size=world)
        if cfg.data.sources:
            from genlip_mcore.data.loader import check_tokenizer

            check_tokenizer(cfg.data, cfg.model.vocab_size)
    except C.ConfigError as e:
        print(f"genlip-pretrain: config error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logs.attach_file(Path(cfg.training.run_dir) / "logs" / f"rank{rank}.log")
    init_distributed()
    from genlip_mcore.train.loop import train

    try:
        losses = [r.loss for r in train(cfg)]
    except RuntimeError as e:           # data or numerics that cannot go on: one clear line, no traceback wall
        log.error(f"genlip-pretrain: stopped: {e}")
        return 1
    if losses and cfg.data.sources and dist_rank() == 0:
        from genlip_mcore.data.shapes import blind_floor

        floor = blind_floor(cfg.data, cfg.model.patch_size)
        if floor is not None:
            log.info(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f}; a model blind to the image cannot go below "
                     f"~{floor:.4f} on this data (ln 360 nats per caption over its labelled tokens)")
    if losses and not cfg.data.sources:
        from genlip_mcore.data.synthetic import blind_floor, make_row

        rows = [make_row(i, seed=cfg.training.seed, max_seq_len=cfg.data.max_seq_len,
                         patch_dim=cfg.model.patch_dim) for i in range(64)]
        floor = sum(blind_floor(r) for r in rows) / len(rows)
        log.info(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f}; a model blind to the image cannot go below "
                 f"~{floor:.4f} on this data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
