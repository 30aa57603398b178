"""`genlip-pretrain --config FILE [section.key=value ...]` (also `python -m genlip_mcore.train`).

Launched directly (one process) or under torchrun/srun. Until the webdataset pipeline lands, the data is the
generated colour-patch task of `genlip_mcore.data.synthetic`: its captions name patch colours, so a model that
cannot see the image stays at the colour prior (ln 8 nats on colour tokens) while a seeing model goes below it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from genlip_mcore import config as C

log = logging.getLogger("genlip_mcore.train")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="genlip-pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (see examples/configs)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return ap.parse_args(argv)


def run(cfg: C.Config) -> list[float]:
    from megatron.core import parallel_state

    from genlip_mcore.data.synthetic import SyntheticPacks
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import data_parallel_info, setup_model_parallel
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks
    from genlip_mcore.train.step import step_shape, train_step

    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg))
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_scheduler(cfg, optimizer)
    dp_rank, dp = data_parallel_info()
    t = cfg.training
    if cfg.data.sources:
        from genlip_mcore.data.loader import DataLoader

        data = DataLoader(cfg.data, patch_size=cfg.model.patch_size, seed=t.seed, dp_rank=dp_rank, dp_size=dp,
                          micro_batch_size=t.micro_batch_size)
    else:
        data = SyntheticPacks.for_config(cfg, dp_rank, dp)
    shape = step_shape(cfg, dp)
    losses = []
    is_logger = parallel_state.get_data_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage(
        ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0
    for it in range(1, t.train_iters + 1):
        start = time.perf_counter()
        r = train_step(chunks, optimizer, scheduler, data, **shape)
        dt = time.perf_counter() - start
        losses.append(r.loss)
        if is_logger:
            tokens = t.global_batch_size * cfg.data.max_seq_len
            log.info(f"iteration {it:6d}/{t.train_iters} | lr {r.lr:.3e} | loss {r.loss:.4f} | "
                     f"grad norm {r.grad_norm:.3f} | caption tokens {r.num_tokens} | "
                     f"{tokens / dt:,.0f} tokens/s | {dt * 1000:.0f} ms")
    return losses


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
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
    init_distributed()
    losses = run(cfg)
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
