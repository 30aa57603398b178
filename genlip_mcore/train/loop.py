"""The training loop, top to bottom: build, maybe resume, then step, log, save.

Every rank runs the same loop. The loss and every logged number are global (reduced over the world), and one rank
(last pipeline stage, TP rank 0, DP rank 0) writes them. A stop signal or the wall-clock budget ends the loop at a
step boundary with a checkpoint and `Stopped` (exit code 75); see train/stop.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from genlip_mcore.config import Config
from genlip_mcore.data.batch import IGNORE_INDEX, Batch
from genlip_mcore.model import build_model_chunks
from genlip_mcore.parallel import data_parallel_info, setup_model_parallel
from genlip_mcore.train import checkpoint as ckpt_io
from genlip_mcore.train import fp8_stats as fp8_stats_io
from genlip_mcore.train import stop
from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks
from genlip_mcore.train.step import StepResult, step_shape, train_step

log = logging.getLogger("genlip_mcore.train")


class MeasuredData:
    """Wraps the batch iterator: time spent waiting for data, and what went through (for the log line)."""

    def __init__(self, it: Iterator[Batch], model_cfg):
        from genlip_mcore.train.metrics import step_flops

        self.it, self.model_cfg, self.step_flops = it, model_cfg, step_flops
        self.stats: dict = {}
        self.reset()

    def reset(self) -> None:
        self.totals = torch.zeros(5, dtype=torch.float64)   # wait s, samples, tokens, padding tokens, FLOPs

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        b = next(self.it)
        real = sum(b.img_lens[:b.num_samples]) + sum(b.txt_lens[:b.num_samples])
        n_lm = int((b.targets != IGNORE_INDEX).sum())
        flops = self.step_flops(self.model_cfg, b.img_lens, b.txt_lens, n_lm=n_lm)
        self.totals += torch.tensor([time.perf_counter() - start, b.num_samples, b.num_tokens,
                                     b.num_tokens - real, flops], dtype=torch.float64)
        self.stats = b.stats or self.stats
        return b


def build_data(cfg: Config, dp_rank: int, dp_size: int, start_iteration: int, state=None):
    t = cfg.training
    if not cfg.data.sources:
        from genlip_mcore.data.synthetic import SyntheticPacks

        data = SyntheticPacks.for_config(cfg, dp_rank, dp_size)
        data.iteration = start_iteration                 # generated rows are numbered by iteration
        return data
    from genlip_mcore.data.loader import DataLoader

    return DataLoader(cfg.data, patch_size=cfg.model.patch_size, seed=t.seed, dp_rank=dp_rank, dp_size=dp_size,
                      micro_batch_size=t.micro_batch_size, state=state)


def _data_state(data):
    return data.state_dict() if hasattr(data, "state_dict") else {"iteration": data.iteration}


def _is_writer() -> bool:
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _interval_metrics(cfg: Config, measured: MeasuredData, dt: float, iters: int) -> dict:
    """Throughput over the last log interval, summed over the world (each DP replica counted once)."""
    from genlip_mcore.train.metrics import memory_gib, peak_tflops

    totals = measured.totals.clone()
    dist.all_reduce(totals)
    world = dist.get_world_size()
    model_parallel = world // parallel_state.get_data_parallel_world_size()
    wait, samples, tokens, pad, flops = (totals / model_parallel).tolist()
    wait = totals[0].item() / world
    skipped = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(skipped, measured.stats.get("skipped", {}),
                           group=parallel_state.get_data_parallel_group())
    total_skips: dict = {}
    for s in skipped:
        for k, v in (s or {}).items():
            total_skips[k] = total_skips.get(k, 0) + v
    tflops = flops / dt / world / 1e12
    peak = peak_tflops(cfg.logging.peak_tflops)
    measured.reset()
    return {"elapsed_ms_per_iteration": 1000 * dt / iters, "samples_per_sec": samples / dt,
            "tokens_per_sec": tokens / dt, "tflops_per_gpu": tflops,
            "mfu": tflops / peak if peak else None, "padding_fraction": pad / tokens if tokens else None,
            "data_wait_fraction": wait / dt, "skipped": total_skips, "memory_gib": memory_gib()}


def train(cfg: Config, data_override: Optional[Iterator[Batch]] = None) -> list[StepResult]:
    """Runs to training.train_iters (or exit_interval) and returns each step's result; raises stop.Stopped after
    saving when a stop signal or exit_duration_mins ends the run early. Signal handlers are restored on return."""
    t = cfg.training
    with stop.Stopper(t.exit_duration_mins, t.stop_grace_secs) as stopper:
        return _train(cfg, data_override, stopper)


def _train(cfg: Config, data_override: Optional[Iterator[Batch]], stopper: stop.Stopper) -> list[StepResult]:
    from genlip_mcore.train.metrics import MetricsLogger

    t = cfg.training
    setup_model_parallel(cfg.parallel, t.seed)
    rank0 = dist.get_rank() == 0
    if t.exit_duration_mins and not t.save_interval and rank0:
        log.warning(f"training.exit_duration_mins={t.exit_duration_mins:g} with training.save_interval=0: only the "
                    f"save at the exit protects this run, and a crash loses everything; set training.save_interval "
                    f"(about an hour of steps)")
    fp8_stats = fp8_stats_io.for_run(cfg, _is_writer())   # None unless logging.fp8_stats_interval; before the model
    chunks = wrap_chunks(cfg, build_model_chunks(cfg, initialize=not t.load_dir))
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_scheduler(cfg, optimizer)
    start, consumed, data_state, resumed = 0, 0, None, None
    if t.load_dir:
        resumed = ckpt_io.load_checkpoint(t.load_dir, chunks, optimizer, scheduler, cfg)
        start, consumed, data_state = resumed.iteration, resumed.consumed_rows, resumed.data_state
        if start >= t.train_iters:
            if rank0:
                log.info(f"nothing to do: resumed at iteration {start} and training.train_iters is {t.train_iters}; "
                         f"no step taken, nothing saved")
            return []
    elif t.init_from:
        ckpt_io.load_weights_only(t.init_from, chunks)
    dp_rank, dp = data_parallel_info()
    data = data_override or build_data(cfg, dp_rank, dp, start, data_state)
    measured = MeasuredData(data, cfg.model)
    shape = step_shape(cfg, dp)
    # --- validation setup (owned by train/evaluate.py) ---
    from genlip_mcore.train.evaluate import build_evaluator

    evaluator = build_evaluator(cfg, chunks, dp_rank, dp)
    # --- end validation setup ---
    if fp8_stats is not None:
        fp8_stats.attach(chunks, start)
    results: list[StepResult] = []
    in_a_row = skipped_steps = 0
    last_log, since_log = time.perf_counter(), 0
    with MetricsLogger(cfg, Path(t.run_dir), _is_writer(), t.train_iters, start) as metrics, \
            fp8_stats or contextlib.nullcontext():
        for it in range(start + 1, t.train_iters + 1):
            stats_step = fp8_stats is not None and fp8_stats.begin(it)
            r = train_step(chunks, optimizer, scheduler, measured, **shape)
            if stats_step:
                fp8_stats.end(it)
            results.append(r)
            consumed += t.global_batch_size
            since_log += 1
            in_a_row = 0 if r.update_successful else in_a_row + 1
            skipped_steps += 0 if r.update_successful else 1
            if in_a_row >= t.max_nonfinite_steps:
                raise RuntimeError(f"{in_a_row} consecutive steps with a non-finite loss or gradient (training."
                                   f"max_nonfinite_steps); the last checkpoint saved is intact")
            stop.fault_point(it)
            why = stopper.agree()                                # one small all-reduce: do all ranks stop here?
            stopping = why is not None and it < t.train_iters
            if it % t.log_interval == 0 or it == t.train_iters or stopping:
                now = time.perf_counter()
                extra = _interval_metrics(cfg, measured, now - last_log, since_log)
                metrics.log(it, {"iteration": it, "consumed_samples": consumed, "loss": r.loss, "lr": r.lr,
                                 "grad_norm": r.grad_norm, "caption_tokens": r.num_tokens,
                                 "nonfinite_skips": skipped_steps, **extra})
                last_log, since_log = now, 0
            exiting = bool(t.exit_interval) and it % t.exit_interval == 0
            if (t.save_interval and it % t.save_interval == 0) or it == t.train_iters or exiting or stopping:
                saved = ckpt_io.save_checkpoint(cfg, chunks, optimizer, scheduler, iteration=it,
                                                consumed_rows=consumed, data_state=_data_state(data),
                                                tokenizer=cfg.data.tokenizer_path if cfg.data.sources else None,
                                                resumed_from=resumed.directory if resumed else None)
                last_log = time.perf_counter()                   # saving time is not training throughput
                stopper.saved = stopping
            # --- validation hook (owned by train/evaluate.py) ---
            if evaluator is not None and evaluator.due(it, last=it == t.train_iters or exiting):
                metrics.log_validation(it, evaluator.run())
                last_log = time.perf_counter()                   # nor is validation time
            # --- end validation hook ---
            if stopping:
                if rank0:
                    log.info(f"stopping at iteration {it} ({why}): saved {saved}; exiting with code "
                             f"{stop.EXIT_STOPPED}, resume with training.load_dir")
                metrics.close()                                  # a saved stop is not a failed run
                raise stop.Stopped(why, it)
            if why is not None and rank0:
                log.info(f"stop requested ({why}) at the last iteration: the run is complete")
            if exiting:
                log.info(f"exit_interval: stopping after iteration {it}")
                break
    return results
