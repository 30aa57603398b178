"""Checkpoint directory layout; the crash-safe write every save goes through (training checkpoints in
`train/checkpoint.py`, model-only ones for `genlip-convert from-hf` here); loading a model for inference from any
checkpoint layout.

    <save_dir>/latest                      text: the name of the newest complete checkpoint ("iter_0000200")
    <save_dir>/iter_0000200/               megatron dist_checkpointing (torch_dist) files: model, optimizer, ...
    <save_dir>/iter_0000200/genlip.json    config, iteration, consumed samples, data-loader state, tokenizer
    <save_dir>/iter_0000200/tokenizer/     a copy of the tokenizer files, so a checkpoint is self-contained

A checkpoint is written to `.tmp_iter_...` beside its final place and renamed into it only when complete, and
`latest` is replaced atomically after that: a crash at any moment leaves the previous checkpoint and pointer whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

META = "genlip.json"
LATEST = "latest"


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def write_latest(save_dir: Path, name: str) -> None:
    tmp = save_dir / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, save_dir / LATEST)            # atomic on POSIX


def resolve(path: str | Path) -> Path:
    """A save dir (follow `latest`) or one checkpoint dir -> the checkpoint dir; clear errors otherwise."""
    path = Path(path)
    if (path / META).is_file():
        return path
    if (path / LATEST).is_file():
        target = path / (path / LATEST).read_text().strip()
        if (target / META).is_file():
            return target
        raise FileNotFoundError(f"{path}/{LATEST} points to {target.name}, which is not a complete checkpoint")
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {META}) nor a save dir (no {LATEST})")


def read_meta(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / META).read_text())


def checkpoints(save_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p for p in save_dir.glob("iter_*") if (p / META).is_file())


def load_for_inference(path: str | Path):
    """Any checkpoint (any TP/PP/VPP layout) -> (Config, HF-layout state dict, tokenizer path or None).

    Needs no more processes than one: the model is rebuilt at TP=PP=1 and dist_checkpointing reshards on load."""
    import torch
    from megatron.core import dist_checkpointing

    from genlip_mcore import config as C
    from genlip_mcore.hf.keymap import megatron_to_hf
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import init_distributed, setup_model_parallel

    ckpt = resolve(path)
    meta = read_meta(ckpt)
    cfg = C.from_dict(meta["config"])
    cfg.parallel = C.ParallelConfig()
    cfg.precision = C.PrecisionConfig()                 # fp32 for inference on any machine
    cfg.model.transformer_impl, cfg.model.attention_backend = "local", "auto"
    init_distributed()
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    model = build_model_chunks(cfg, initialize=False)[0]
    state = dist_checkpointing.load({"model0": model.sharded_state_dict()}, str(ckpt))
    model.load_state_dict(state["model0"], strict=True)
    tensors = {k: v.detach().float() for k, v in model.state_dict().items() if torch.is_tensor(v)
               and not k.endswith("_extra_state")}
    m = cfg.model
    hf = megatron_to_hf(tensors, m.num_layers, m.num_attention_heads, m.text_embed_dim != m.hidden_size,
                        m.patch_size, m.num_channels)
    tok: Optional[Path] = None
    if meta.get("tokenizer"):
        tok = ckpt / meta["tokenizer"]
    return cfg, hf, tok


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
    """Model tensors of any checkpoint into these chunks, whatever layout wrote it (resharded on load)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(path))
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

        from genlip_mcore.procutil import die_with_parent

        _results_manager = SyncManager(ctx=mp.get_context("spawn"))
        _results_manager.start(die_with_parent)
        fa._results_queue = _results_manager.Queue()


def prepare_save(save_dir: Path, name: str) -> tuple[Path, Path]:
    """(tmp, final) for checkpoint `name`; rank 0 clears leftovers of crashed saves and makes tmp. Collective."""
    import shutil

    import torch.distributed as dist

    tmp, final = save_dir / f".tmp_{name}", save_dir / name
    _writer_queue_dies_with_us()
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".tmp_*"):                    # a crashed earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    return tmp, final


def publish(tmp: Path, final: Path, meta: dict, tokenizer: Optional[str], keep_last: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: metadata, tokenizer copy, rename, `latest`, keep-last-K."""
    import logging
    import shutil

    if tokenizer:
        meta["tokenizer"] = copy_tokenizer(tokenizer, tmp)
    (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_latest(final.parent, final.name)
    for old in checkpoints(final.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    logging.getLogger(__name__).info(f"saved checkpoint {final}")


def copy_tokenizer(path: str, dest: Path) -> str:
    """Copy the tokenizer files into `dest`/tokenizer; returns the path to load them from, relative to `dest`."""
    import shutil

    src = Path(path)
    out = dest / "tokenizer"
    out.mkdir()
    if src.is_dir():                      # an HF-style folder (tokenizer.model or tokenizer.json & co)
        from genlip_mcore.hf.export import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        return "tokenizer"
    for f in ([src] if src.is_file() else []) + [p for p in src.parent.glob("tokenizer*") if p != src]:
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return f"tokenizer/{src.name}"


def save_weights_checkpoint(cfg, chunks: list, save_dir: str | Path, *, iteration: int = 0,
                            tokenizer: Optional[str] = None, source: Optional[str] = None) -> Path:
    """A model-only checkpoint in the training layout (`latest`, iter_*, genlip.json, tokenizer copy), from any
    TP/PP/VPP layout and loadable by any other: what `genlip-convert from-hf` writes, and what stage 2 starts from
    with `training.init_from`. It has no optimizer state, so `training.load_dir` refuses it. Collective."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from genlip_mcore.config import to_dict

    tmp, final = prepare_save(Path(save_dir), iter_name(iteration))
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"iteration": iteration, "consumed_rows": 0, "config": to_dict(cfg), "layout": layout(),
                "weights_only": True, "source": source, "tokenizer": None}
        publish(tmp, final, meta, tokenizer, keep_last=1 << 30)
    dist.barrier()
    return final
