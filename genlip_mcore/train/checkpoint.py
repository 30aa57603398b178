"""Training checkpoints through megatron.core.dist_checkpointing (torch_dist), layout in genlip_mcore/ckpt.py.

What a checkpoint holds: model chunks, optimizer (fully reshardable for the distributed optimizer), LR schedule,
iteration and consumed rows, every data-parallel rank's data-loader state, and every rank's RNG state.
- Model and optimizer tensors carry global keys and offsets, so any TP/PP/VPP/DP layout loads any other.
- The data-loader state is per DP rank: restored when DP size and loader workers match; otherwise the run
  continues from a fresh permutation of the next epoch (a different layout cannot continue the same shard deal).
- RNG states are restored when the layout is the same (our numerics draw nothing from them: drop path is seeded
  by the batch, but recompute and user extensions may).

Crash safety: all ranks write into `.tmp_<name>`; rank 0 adds genlip.json and the tokenizer copy, renames the
directory into place, then moves `latest`. A crash or SIGKILL at any point leaves the previous checkpoint and
pointer intact; leftovers are removed by the next save. A save that raises (a full disk) on any rank removes its
`.tmp_` directory and raises CheckpointError on every rank (genlip_mcore/ckpt.py).

The LR schedule is part of the run: resuming with a config whose schedule differs (SCHEDULE_FIELDS) fails, naming
each field, unless training.override_opt_param_scheduler applies the new schedule from the resumed step
(Megatron's meaning). The schedule counts optimizer steps, not samples, so global_batch_size is not part of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from genlip_mcore import ckpt
from genlip_mcore.ckpt import CheckpointError
from genlip_mcore.config import Config, to_dict

log = logging.getLogger(__name__)
OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
TRAINING_KEYS = ("iteration", "consumed_rows", "config", "scheduler", "layout", "data")
# What build_scheduler reads (train/optim.py): the scheduler itself would silently keep the checkpoint's values.
SCHEDULE_FIELDS = (("training", "train_iters"), ("optimizer", "lr"), ("optimizer", "min_lr"),
                   ("optimizer", "lr_warmup_fraction"), ("optimizer", "lr_decay_style"),
                   ("optimizer", "weight_decay"))


def _rng_state() -> dict:
    """Every generator's state as tensors, ints, floats and tuples only, so it loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _read_rng(path: Path) -> dict:
    """An RNG state file, unpickled with weights_only=True: nothing in a checkpoint can run code. Files of older
    checkpoints hold the numpy state as an ndarray; they load too, because megatron-core registers numpy's
    plain-array reconstruction as a safe global (megatron/core/safe_globals.py), and nothing more."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:      # noqa: BLE001 - any unreadable or unsafe file gets the same one-line error
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"{path}: not a loadable RNG state file ({first}); refusing to load it") from None


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def _gather_data_states(data_state) -> Optional[list]:
    """Every DP rank's loader state (identical across the TP/PP ranks of one DP rank)."""
    group = parallel_state.get_data_parallel_group()
    states = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, data_state, group=group)
    return states


def save_checkpoint(cfg: Config, chunks: list, optimizer, scheduler, *, iteration: int, consumed_rows: int,
                    data_state=None, tokenizer: Optional[str] = None, resumed_from: Optional[Path] = None) -> Path:
    """Collective. `resumed_from`: the checkpoint this run started from, which keep-last pruning never deletes."""
    save_dir = Path(cfg.training.save_dir or Path(cfg.training.run_dir) / "checkpoints")
    tmp, final = ckpt.prepare_save(save_dir, ckpt.iter_name(iteration))
    data_states = _gather_data_states(data_state)
    error = None
    try:
        state = ckpt.model_sharded_state_dict(chunks)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=OPT_METADATA)
        dist_checkpointing.save(state, str(tmp))
        _fault_disk_full(f"disk_full_during_save@{iteration}")
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank{dist.get_rank():05d}.pt")
    except ckpt.failures() as e:    # any failure: every rank stops, the partial directory goes
        error = e
    ckpt.end_write(tmp, final, error)                            # every rank's files are in tmp
    _fault_point(f"kill_during_save@{iteration}")
    meta = None
    if dist.get_rank() == 0:
        meta = {"iteration": iteration, "consumed_rows": consumed_rows, "config": to_dict(cfg),
                "scheduler": scheduler.state_dict(), "layout": ckpt.layout(),
                "data": {"num_workers": cfg.data.num_workers, "ranks": data_states}, "tokenizer": None}
    ckpt.publish_all(tmp, final, meta, tokenizer, cfg.training.keep_last, [resumed_from] if resumed_from else [])
    return final


def _fault_point(name: str) -> None:
    """Fault injection for the crash-safety tests: GENLIP_FAULT=<name> SIGKILLs this process here
    (e.g. GENLIP_FAULT=kill_during_save@4: all shards of iteration 4 are written, nothing is renamed yet)."""
    if os.environ.get("GENLIP_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fault_disk_full(name: str) -> None:
    """GENLIP_FAULT=<name>:<rank> raises ENOSPC on that rank here (a full disk, seen by one rank only)."""
    if os.environ.get("GENLIP_FAULT") == f"{name}:{dist.get_rank()}":
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (GENLIP_FAULT)")


def schedule_changes(saved: dict, cfg: Config) -> list[str]:
    """'section.field: old -> new' for every schedule field where `saved` (a checkpoint's config) and cfg differ."""
    new = to_dict(cfg)
    return [f"{s}.{k}: {saved[s][k]!r} in the checkpoint, {new[s][k]!r} now" for s, k in SCHEDULE_FIELDS
            if saved.get(s, {}).get(k, new[s][k]) != new[s][k]]


def _check_schedule(meta: dict, directory: Path, cfg: Config) -> None:
    changes = schedule_changes(meta["config"], cfg)
    if not changes:
        return
    if not cfg.training.override_opt_param_scheduler:
        raise CheckpointError(f"{directory} was trained with another LR schedule ({'; '.join(changes)}): resume "
                              "with the same values, or set training.override_opt_param_scheduler=true to apply "
                              f"the new schedule from iteration {meta['iteration']}")
    if dist.get_rank() == 0:
        log.warning(f"training.override_opt_param_scheduler: the new schedule applies from iteration "
                    f"{meta['iteration']} ({'; '.join(changes)})")


def _warn_future(directory: Path, iteration: int, cfg: Config) -> None:
    save_dir = Path(cfg.training.save_dir or Path(cfg.training.run_dir) / "checkpoints")
    future = [p.name for p in ckpt.checkpoints(save_dir) if ckpt.iteration_of(p) > iteration]
    if future and dist.get_rank() == 0:
        log.warning(f"{save_dir} holds checkpoints past iteration {iteration}, of an abandoned run "
                    f"({', '.join(future)}): left alone and not counted by keep_last; a save of this run at the "
                    "same iteration replaces one, and `latest` follows this run")


@dataclasses.dataclass
class Resumed:
    iteration: int
    consumed_rows: int
    data_state: object          # this DP rank's loader state, or None when it cannot continue exactly
    directory: Optional[Path] = None    # the checkpoint (for save_checkpoint's resumed_from)


def load_checkpoint(path: str, chunks: list, optimizer, scheduler, cfg: Config) -> Resumed:
    directory = ckpt.resolve(path)
    meta = ckpt.read_meta(directory)
    if meta.get("weights_only"):
        raise CheckpointError(f"{directory} holds model weights only (no optimizer or schedule, e.g. written by "
                              "genlip-convert from-hf): start a run from it with training.init_from, not "
                              "training.load_dir")
    meta = ckpt.read_meta(directory, TRAINING_KEYS)
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{directory / ckpt.META}: its config is not a mapping")
    _check_schedule(meta, directory, cfg)
    _warn_future(directory, meta["iteration"], cfg)
    state = ckpt.model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPT_METADATA)
    loaded = ckpt.load_sharded(state, directory)
    for i, c in enumerate(chunks):
        ckpt._unwrap(c).load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    same = meta["layout"] == ckpt.layout()
    rng_file = directory / "rng" / f"rank{dist.get_rank():05d}.pt"
    if same and rng_file.is_file():
        _set_rng_state(_read_rng(rng_file))
    data = meta["data"]
    dp_rank = parallel_state.get_data_parallel_rank()
    exact = len(data["ranks"]) == ckpt.layout()["dp"] and data["num_workers"] == cfg.data.num_workers
    if not exact and dist.get_rank() == 0:
        log.warning(f"data-parallel size or loader workers changed ({len(data['ranks'])} -> {ckpt.layout()['dp']} "
                    f"ranks): the data continues from a fresh shard deal, not the saved position")
    log.info(f"resumed from {directory} at iteration {meta['iteration']}")
    return Resumed(meta["iteration"], meta["consumed_rows"], data["ranks"][dp_rank] if exact else None, directory)


def load_weights_only(path: str, chunks: list) -> None:
    """Stage 2 from a stage-1 checkpoint: model tensors only; optimizer, schedule and data start fresh."""
    ckpt.load_model(chunks, ckpt.resolve(path))
