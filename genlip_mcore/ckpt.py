"""Checkpoint directory layout, and loading a model for inference from any checkpoint layout.

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
