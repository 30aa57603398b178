"""Checkpoint directory layout; the crash-safe write every save goes through (training checkpoints in
`train/checkpoint.py`, model-only ones for `genlip-convert from-hf` here); what a complete checkpoint holds, and
the one-line errors for one that is not. Loading a model for inference lives in `genlip_mcore/inference.py`.

    <save_dir>/latest                      text: the name of the newest complete checkpoint ("iter_0000200")
    <save_dir>/iter_0000200/               megatron dist_checkpointing (torch_dist) files: model, optimizer, ...
    <save_dir>/iter_0000200/genlip.json    config, iteration, consumed samples, data-loader state, tokenizer
    <save_dir>/iter_0000200/tokenizer/     a copy of the tokenizer files, so a checkpoint is self-contained

A checkpoint is written to `.tmp_iter_...` beside its final place and renamed into it only when complete, and
`latest` is replaced atomically after that: a crash at any moment leaves the previous checkpoint and pointer whole.
A save that fails (a full disk, a dead writer) removes its `.tmp_` directory and stops the run on every rank.

Keep-last pruning counts checkpoints by iteration number, never deletes the one just written or the one the run
resumed from, and leaves "future" checkpoints alone: after a rollback (resuming from an older checkpoint), those of
the abandoned run with a higher iteration are neither counted nor deleted until this run passes them; a save at
the same iteration replaces one. `latest` always names the newest save of the running run.

Before anything is read, a checkpoint's files are checked (present, long enough for what `.metadata` says they
hold, `.metadata` made only of torch's checkpoint metadata classes: it is a pickle, and torch unpickles it without
restriction). A damaged checkpoint gives one line naming the file and the last complete checkpoint beside it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Iterable, Optional

from genlip_mcore.data.tokenizer import copy_tokenizer

META = "genlip.json"
LATEST = "latest"
# What megatron dist_checkpointing (torch_dist) writes besides the *.distcp shard files named in .metadata.
DIST_FILES = ("metadata.json", "common.pt", ".metadata")
META_KEYS = ("iteration", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, or a save that failed; the message is one line naming the file."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(path: Path) -> Optional[int]:
    m = re.fullmatch(r"iter_(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def write_latest(save_dir: Path, name: str) -> None:
    tmp = save_dir / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, save_dir / LATEST)            # atomic on POSIX


def checkpoints(save_dir: Path) -> list[Path]:
    """Checkpoints with their genlip.json (the last file a save writes), oldest first by iteration number."""
    found = [p for p in Path(save_dir).glob("iter_*") if iteration_of(p) is not None and (p / META).is_file()]
    return sorted(found, key=iteration_of)


def last_complete(save_dir: Path, exclude: Iterable[Path] = ()) -> Optional[Path]:
    """The newest checkpoint in `save_dir` whose files all check out, other than `exclude`."""
    skip = {Path(p).resolve() for p in exclude}
    for p in reversed(checkpoints(save_dir)):
        if p.resolve() in skip:
            continue
        try:
            _check(p)
        except _Damaged:
            continue
        return p
    return None


def _fallback(save_dir: Path, broken: Optional[Path] = None) -> str:
    other = last_complete(save_dir, [broken] if broken else [])
    if other is None:
        return f"; no other complete checkpoint in {save_dir}"
    return f"; the last complete checkpoint is {other} (resume with training.load_dir={other})"


def _hf_export(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors*"))


def resolve(path: str | Path) -> Path:
    """A save dir (follow `latest`) or one checkpoint dir -> the checkpoint dir; CheckpointError otherwise."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if _hf_export(path):
        raise CheckpointError(f"{path} is a HuggingFace export (config.json + safetensors), not a training "
                              f"checkpoint: convert it with `genlip-convert from-hf --hf {path} --out SAVE_DIR` "
                              "and start from SAVE_DIR with training.init_from")
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        target = path / name
        if name and (target / META).is_file():
            return target
        raise CheckpointError(f"{path / LATEST} names {name!r}, which is not a complete checkpoint (no "
                              f"{target / META}){_fallback(path)}")
    if path.is_dir() and iteration_of(path) is not None:
        raise CheckpointError(f"{path / META}: missing, so {path} is not a complete checkpoint"
                              f"{_fallback(path.parent, path)}")
    raise CheckpointError(f"{path} is neither a checkpoint (no {META}) nor a save dir (no {LATEST})")


def read_meta(ckpt_dir: str | Path, keys: Iterable[str] = META_KEYS) -> dict:
    """genlip.json as a dict holding at least `keys`; CheckpointError naming the file otherwise."""
    d = Path(ckpt_dir)
    try:
        return _meta(d, keys)
    except _Damaged as e:
        raise CheckpointError(f"{e}{_fallback(d.parent, d)}") from None


class _Damaged(Exception):
    """What is wrong with one checkpoint, before the last complete one is looked up."""


def _meta(d: Path, keys: Iterable[str]) -> dict:
    f = d / META
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _Damaged(f"{f}: not readable JSON ({_first_line(e)})") from None
    missing = [k for k in keys if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise _Damaged(f"{f}: lacks {', '.join(missing)}")
    return meta


def _first_line(e: BaseException) -> str:
    """An exception in one line. torch's CheckpointException holds a traceback per rank: take its last
    `SomeError: message` line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if any(line.startswith("Traceback") for line in lines):
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
        return (raised or lines)[-1][:300]
    return lines[0][:300]


def failures() -> tuple:
    """What a checkpoint read or write raises: torch's CheckpointException is a BaseException, not an Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes torch's checkpoint metadata is made of: dataclasses and enums of torch.distributed.checkpoint,
    torch.Size, dtypes and layouts. Anything else (os.system, ...) is refused before it is called."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
               "torch.distributed.checkpoint.filesystem")

    def find_class(self, module, name):
        import collections
        import dataclasses
        import enum

        import torch

        if module in self.MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"),
                                ("collections", "OrderedDict")):
            return {"Size": torch.Size, "_get_layout": torch.serialization._get_layout,
                    "OrderedDict": collections.OrderedDict}[name]
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


def check_files(ckpt_dir: str | Path, with_meta: bool = True) -> None:
    """Every file of a checkpoint is there and long enough, and .metadata is plain metadata; CheckpointError naming
    the first file that is not, and the last complete checkpoint beside it. `with_meta=False`: a bare
    dist_checkpointing directory (save_model's), without genlip.json."""
    d = Path(ckpt_dir)
    try:
        _check(d, with_meta)
    except _Damaged as e:
        raise CheckpointError(f"{e}{_fallback(d.parent, d)}") from None


def _check(d: Path, with_meta: bool = True) -> None:
    """Reads genlip.json and .metadata, stats the rest."""
    if with_meta:
        _meta(d, META_KEYS)
    for name in DIST_FILES:
        if not (d / name).is_file():
            raise _Damaged(f"{d / name}: missing")
    try:
        with open(d / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        need: dict[str, int] = {}
        for info in metadata.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:      # noqa: BLE001 - truncated, garbage or hostile: the same one line
        raise _Damaged(f"{d / '.metadata'}: not readable checkpoint metadata ({_first_line(e)})") from None
    for rel, size in sorted(need.items()):
        f = d / rel
        if not f.is_file():
            raise _Damaged(f"{f}: missing")
        if f.stat().st_size < size:
            raise _Damaged(f"{f}: truncated ({f.stat().st_size} bytes, .metadata expects at least {size})")


def load_sharded(sharded_state: dict, ckpt_dir: str | Path, with_meta: bool = True) -> dict:
    """dist_checkpointing.load after check_files; whatever still fails inside it becomes one line."""
    from megatron.core import dist_checkpointing

    d = Path(ckpt_dir)
    check_files(d, with_meta)
    try:
        return dist_checkpointing.load(sharded_state, str(d))
    except failures() as e:     # torch and megatron raise many kinds; the user needs one line
        raise CheckpointError(f"{d}: could not be loaded ({_first_line(e)}){_fallback(d.parent, d)}") from None


# ------------------------------------------------------------------------------------------------------------------
# Writing: model state through dist_checkpointing, and the crash-safe publish every save goes through
# ------------------------------------------------------------------------------------------------------------------
def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def model_sharded_state_dict(chunks: list) -> dict:
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks: list, path: str) -> None:
    """Model tensors only, no metadata (tests)."""
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), path)


def load_model(chunks: list, path: str) -> None:
    """Model tensors of any checkpoint into these chunks, whatever layout wrote it (resharded on load). Callers
    that take a user's path resolve it first (`resolve` requires genlip.json); the bare directories of
    `save_model` (tests) have none."""
    state = load_sharded(model_sharded_state_dict(chunks), path, with_meta=False)
    for i, c in enumerate(chunks):
        _unwrap(c).load_state_dict(state[f"model{i}"], strict=True)


def layout() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(), "world": dist.get_world_size()}


_results_manager = None


def _writer_queue_dies_with_us() -> None:
    """dist_checkpointing's writer reports through a Manager queue served by a spawned process, which it starts
    lazily and which outlives a SIGKILLed trainer (holding its pipes and terminal forever). Start that server
    ourselves, set to die with its parent. Touches a private name of megatron.core 0.16 (checked: filesystem_async)."""
    global _results_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if _results_manager is None and getattr(fa, "_results_queue", 1) is None:
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        from genlip_mcore.procutil import serve_until_parent_dies

        _results_manager = SyncManager(ctx=mp.get_context("spawn"))
        _results_manager.start(serve_until_parent_dies)
        fa._results_queue = _results_manager.Queue()


def _agree(error: Optional[BaseException]) -> Optional[str]:
    """One all-reduce: whether any rank failed. None if none did; else this rank's error, or that another rank's.
    Every rank takes the same branch after it, so a failure on one rank never leaves the others in a barrier."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    flag = torch.tensor([int(error is not None)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    return _first_line(error) if error is not None else "it failed on another rank"


def _previous(save_dir: Path) -> str:
    try:
        return f"the previous checkpoint {resolve(save_dir)} is intact"
    except CheckpointError:
        return f"there is no earlier complete checkpoint in {save_dir}"


def _save_failed(tmp: Path, final: Path, reason: str) -> CheckpointError:
    """Rank 0 removes the partial directory; every rank raises the same line."""
    import shutil

    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return CheckpointError(f"saving checkpoint {final.name} (iteration {iteration_of(final)}) in {final.parent} "
                           f"failed: {reason}; removed {tmp.name}; {_previous(final.parent)}")


def prepare_save(save_dir: Path, name: str) -> tuple[Path, Path]:
    """(tmp, final) for checkpoint `name`; rank 0 clears leftovers of crashed saves and makes tmp. Collective."""
    import shutil

    import torch.distributed as dist

    tmp, final = save_dir / f".tmp_{name}", save_dir / name
    _writer_queue_dies_with_us()
    error = None
    if dist.get_rank() == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            for stale in save_dir.glob(".tmp_*"):                    # a crashed earlier save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    reason = _agree(error)
    if reason:
        raise _save_failed(tmp, final, reason)
    return tmp, final


def end_write(tmp: Path, final: Path, error: Optional[BaseException]) -> None:
    """After every rank wrote its files into `tmp` (or failed to): all go on, or all raise. Collective."""
    reason = _agree(error)
    if reason:
        raise _save_failed(tmp, final, reason)


def publish_all(tmp: Path, final: Path, meta: Optional[dict], tokenizer: Optional[str], keep_last: int,
                keep: Iterable[Path] = ()) -> None:
    """Rank 0 publishes (`meta` is only needed there); every rank learns whether it worked. Collective."""
    import torch.distributed as dist

    error = None
    if dist.get_rank() == 0:
        try:
            publish(tmp, final, meta, tokenizer, keep_last, keep)
        except Exception as e:      # noqa: BLE001 - a full disk, a vanished dir: the run stops with one line
            error = e
    reason = _agree(error)
    if reason:
        raise _save_failed(tmp, final, reason)


def publish(tmp: Path, final: Path, meta: dict, tokenizer: Optional[str], keep_last: int,
            keep: Iterable[Path] = ()) -> None:
    """Rank 0, once every rank's files are in `tmp`: metadata, tokenizer copy, rename, `latest`, keep-last-K."""
    import logging
    import shutil

    if tokenizer:
        meta["tokenizer"] = copy_tokenizer(tokenizer, tmp / "tokenizer").relative_to(tmp).as_posix()
    (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    if final.exists():                        # a checkpoint of an abandoned run at this iteration (a rollback)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_latest(final.parent, final.name)
    for old in prunable(final, keep_last, keep):
        shutil.rmtree(old, ignore_errors=True)
    logging.getLogger(__name__).info(f"saved checkpoint {final}")


def prunable(newest: Path, keep_last: int, keep: Iterable[Path] = ()) -> list[Path]:
    """What keep-last-K deletes after saving `newest`: training checkpoints up to its iteration beyond the newest K,
    except `newest`, those in `keep` (the one the run resumed from) and weights-only ones (a conversion's output,
    not the run's). Checkpoints past `newest` (an abandoned run's, after a rollback) are not counted."""
    it = iteration_of(newest)
    protected = {Path(p).resolve() for p in keep} | {newest.resolve()}
    past = [p for p in checkpoints(newest.parent) if iteration_of(p) <= it]
    out = []
    for p in past[:-keep_last]:
        if p.resolve() in protected:
            continue
        try:
            if json.loads((p / META).read_text()).get("weights_only"):
                continue
        except (OSError, ValueError, AttributeError):
            pass                                  # an unreadable genlip.json: not a checkpoint anyone can use
        out.append(p)
    return out


def save_weights_checkpoint(cfg, chunks: list, save_dir: str | Path, *, iteration: int = 0,
                            tokenizer: Optional[str] = None, source: Optional[str] = None) -> Path:
    """A model-only checkpoint in the training layout (`latest`, iter_*, genlip.json, tokenizer copy), from any
    TP/PP/VPP layout and loadable by any other: what `genlip-convert from-hf` writes, and what stage 2 starts from
    with `training.init_from`. It has no optimizer state, so `training.load_dir` refuses it. Collective."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from genlip_mcore.config import to_dict

    tmp, final = prepare_save(Path(save_dir), iter_name(iteration))
    error = None
    try:
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    except failures() as e:     # see end_write
        error = e
    end_write(tmp, final, error)
    meta = {"iteration": iteration, "consumed_rows": 0, "config": to_dict(cfg), "layout": layout(),
            "weights_only": True, "source": source, "tokenizer": None} if dist.get_rank() == 0 else None
    publish_all(tmp, final, meta, tokenizer, keep_last=1 << 30)
    return final
