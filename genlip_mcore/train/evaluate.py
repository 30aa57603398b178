"""Validation loss on held-out shards (data.valid_sources), Megatron's evaluate(): forward only, same batches each time.

Each pass builds the held-out loader afresh from its start with the run's seed, so every pass (and every run and
resume of the same config) sees the same `training.eval_iters` global batches: the numbers are comparable along a
curve. The batches go through the pipeline schedule with forward_only=True, the model in eval mode (no drop path)
and without autograd; the loss is the token-weighted mean over all of them, from one all-reduce of the last stage's
(sum, count) over the world. The RNG streams are restored afterwards (building a torch DataLoader draws a seed from
the global generator), so training is bitwise the same with validation on or off.

Generated data (no data.sources) has no held-out shards: valid_sources is refused there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from genlip_mcore.config import Config, ConfigError
from genlip_mcore.data.sources import expand_shards
from genlip_mcore.train.step import forward_only_sums, step_shape


def valid_data_config(cfg: Config, dp_size: int):
    """The held-out DataConfig: each valid_sources pattern one equally weighted source, and as many loader workers
    (up to data.num_workers) as its shards allow: every reader slot (DP rank x worker) needs one shard per source."""
    d = cfg.data
    if cfg.training.eval_iters < 1:
        raise ConfigError(f"training.eval_iters: must be >= 1 with data.valid_sources, got {cfg.training.eval_iters}")
    if not d.sources:
        raise ConfigError("data.valid_sources: needs data.sources (generated data has no held-out shards)")
    fewest = None
    for i, pattern in enumerate(d.valid_sources):
        n = len(expand_shards(pattern))
        if n < dp_size:
            raise ConfigError(f"data.valid_sources[{i}]: {pattern!r} matches {n} shard(s); each of the {dp_size} "
                              f"data-parallel ranks needs at least one")
        fewest = n if fewest is None else min(fewest, n)
    workers = min(d.num_workers, fewest // dp_size)
    return dataclasses.replace(d, sources=list(d.valid_sources), source_weights=[],
                               num_workers=workers if workers > 1 else 0)


class Evaluator:
    """`due(iteration, last)` says when; `run()` returns {"valid_loss", "valid_ppl", "valid_tokens"} on every rank."""

    def __init__(self, cfg: Config, chunks: list, dp_rank: int, dp_size: int):
        self.cfg, self.chunks, self.dp_rank, self.dp_size = cfg, chunks, dp_rank, dp_size
        self.data_cfg = valid_data_config(cfg, dp_size)
        self.shape = step_shape(cfg, dp_size)

    def due(self, iteration: int, last: bool) -> bool:
        interval = self.cfg.training.eval_interval
        return last or (interval > 0 and iteration % interval == 0)

    def batches(self):
        """The held-out micro-batches of this DP rank, from the start."""
        from genlip_mcore.data.loader import DataLoader

        t = self.cfg.training
        return DataLoader(self.data_cfg, patch_size=self.cfg.model.patch_size, seed=t.seed, dp_rank=self.dp_rank,
                          dp_size=self.dp_size, micro_batch_size=t.micro_batch_size)

    def run(self) -> dict:
        modes = [m.training for m in self.chunks]
        hooked = [m for m in self.chunks if getattr(m, "use_forward_hook", False)]
        # Distributed optimizer with overlapped param gather: finish the gather and take the hooks off, as
        # Megatron's training loop does around evaluate().
        for m in hooked:
            m.disable_forward_pre_hook()
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker_states = tracker.get_states()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                for m in self.chunks:
                    m.eval()
                data = self.batches()
                totals = forward_only_sums(self.chunks, data, **self.shape)
                for _ in range(self.cfg.training.eval_iters - 1):
                    totals += forward_only_sums(self.chunks, data, **self.shape)
                del data                                     # its workers (if any) stop with it
        finally:
            for m, mode in zip(self.chunks, modes, strict=True):
                m.train(mode)
            tracker.set_states(tracker_states)
            for m in hooked:
                m.enable_forward_pre_hook()
        dist.all_reduce(totals)
        loss_sum, count = totals.tolist()
        loss = loss_sum / count if count else float("nan")
        return {"valid_loss": loss, "valid_ppl": _ppl(loss), "valid_tokens": int(count)}


def build_evaluator(cfg: Config, chunks: list, dp_rank: int, dp_size: int) -> Optional[Evaluator]:
    return Evaluator(cfg, chunks, dp_rank, dp_size) if cfg.data.valid_sources else None


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 20.0)) if math.isfinite(loss) else float("nan")   # Megatron caps the exponent at 20


