"""`genlip-pretrain --config FILE [section.key=value ...]` (also `python -m genlip_mcore.train`).

Launched directly (one process) or under torchrun/srun. With `data.sources` it trains on webdataset shards;
without, on the generated colour-patch packs of `genlip_mcore.data.synthetic` (the tests' fast default).

Start-up runs cheapest first: the config is loaded and validated before torch or Megatron is imported (a typo
costs a second), then `genlip_mcore.preflight` checks paths, disk and tokenizer, then the model is built. Exit
status: 0 done, 1 the run stopped on data or numerics, 2 a config or preflight error (one line on stderr); a
graceful stop on a signal or time budget exits with its own code (`train.stop`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from genlip_mcore import config as C
from genlip_mcore import logs, procutil

log = logging.getLogger("genlip_mcore.train")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="genlip-pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (see examples/configs)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return ap.parse_args(argv)


def _config_error(e: C.ConfigError) -> int:
    print(f"genlip-pretrain: config error: {e}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    procutil.defer_stop_signals()       # a stop signal during start-up stops the run after its first step
    logs.setup()
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        cfg = C.load(args.config, args.overrides, world_size=world)
        from genlip_mcore import preflight

        preflight.run(cfg, rank=rank)
    except C.ConfigError as e:
        return _config_error(e)
    logs.attach_file(Path(cfg.training.run_dir) / "logs" / f"rank{rank}.log")
    from genlip_mcore.parallel import init_distributed
    from genlip_mcore.train.loop import train

    init_distributed()
    try:
        results = train(cfg)
    except C.ConfigError as e:          # what only the built model or loader can tell
        return _config_error(e)
    except RuntimeError as e:           # data or numerics that cannot go on: one clear line, no traceback wall
        log.error(f"genlip-pretrain: stopped: {e}")
        return 1
    if results:
        log.info(f"done: loss {results[0].loss:.4f} -> {results[-1].loss:.4f} over {len(results)} iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
