"""Model checkpoints through megatron.core.dist_checkpointing (torch_dist): any TP/PP/VPP layout loads any other.

Tensors are identified by their global keys (layers carry global offsets), so the container keys ("model0",
"model1" per virtual stage) do not tie a checkpoint to a layout.
"""

from __future__ import annotations

import os

from megatron.core import dist_checkpointing


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def model_sharded_state_dict(chunks: list) -> dict:
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks: list, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), path)


def load_model(chunks: list, path: str) -> None:
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), path)
    for i, c in enumerate(chunks):
        _unwrap(c).load_state_dict(state[f"model{i}"], strict=True)
