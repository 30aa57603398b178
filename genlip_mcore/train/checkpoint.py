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
pointer intact; leftovers are removed by the next save.
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
from genlip_mcore.ckpt import (  # noqa: F401
    layout,
    load_model,
    model_sharded_state_dict,
    prepare_save,
    publish,
    save_model,
    save_weights_checkpoint,
)
from genlip_mcore.config import Config, to_dict

log = logging.getLogger(__name__)
OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


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
                    data_state=None, tokenizer: Optional[str] = None) -> Path:
    save_dir = Path(cfg.training.save_dir or Path(cfg.training.run_dir) / "checkpoints")
    tmp, final = prepare_save(save_dir, ckpt.iter_name(iteration))
    rank0 = dist.get_rank() == 0
    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=OPT_METADATA)
    dist_checkpointing.save(state, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{dist.get_rank():05d}.pt")
    data_states = _gather_data_states(data_state)
    dist.barrier()                                               # every rank's files are in tmp
    _fault_point(f"kill_during_save@{iteration}")
    if rank0:
        meta = {"iteration": iteration, "consumed_rows": consumed_rows, "config": to_dict(cfg),
                "scheduler": scheduler.state_dict(), "layout": layout(),
                "data": {"num_workers": cfg.data.num_workers, "ranks": data_states}, "tokenizer": None}
        publish(tmp, final, meta, tokenizer, cfg.training.keep_last)
    dist.barrier()
    return final


def _fault_point(name: str) -> None:
    """Fault injection for the crash-safety tests: GENLIP_FAULT=<name> SIGKILLs this process here
    (e.g. GENLIP_FAULT=kill_during_save@4: all shards of iteration 4 are written, nothing is renamed yet)."""
    if os.environ.get("GENLIP_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@dataclasses.dataclass
class Resumed:
    iteration: int
    consumed_rows: int
    data_state: object          # this DP rank's loader state, or None when it cannot continue exactly


def load_checkpoint(path: str, chunks: list, optimizer, scheduler, cfg: Config) -> Resumed:
    directory = ckpt.resolve(path)
    meta = ckpt.read_meta(directory)
    if meta.get("weights_only"):
        raise RuntimeError(f"{directory} holds model weights only (no optimizer or schedule, e.g. written by "
                           "genlip-convert from-hf): start a run from it with training.init_from, not "
                           "training.load_dir")
    state = model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPT_METADATA)
    loaded = dist_checkpointing.load(state, str(directory))
    for i, c in enumerate(chunks):
        ckpt._unwrap(c).load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    same = meta["layout"] == layout()
    rng_file = directory / "rng" / f"rank{dist.get_rank():05d}.pt"
    if same and rng_file.is_file():
        _set_rng_state(_read_rng(rng_file))
    data = meta["data"]
    dp_rank = parallel_state.get_data_parallel_rank()
    exact = len(data["ranks"]) == layout()["dp"] and data["num_workers"] == cfg.data.num_workers
    if not exact and dist.get_rank() == 0:
        log.warning(f"data-parallel size or loader workers changed ({len(data['ranks'])} -> {layout()['dp']} "
                    f"ranks): the data continues from a fresh shard deal, not the saved position")
    log.info(f"resumed from {directory} at iteration {meta['iteration']}")
    return Resumed(meta["iteration"], meta["consumed_rows"], data["ranks"][dp_rank] if exact else None)


def load_weights_only(path: str, chunks: list) -> None:
    """Stage 2 from a stage-1 checkpoint: model tensors only; optimizer, schedule and data start fresh."""
    load_model(chunks, str(ckpt.resolve(path)))
