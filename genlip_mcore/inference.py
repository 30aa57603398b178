"""Loading a training checkpoint for inference: the one path `genlip-caption --checkpoint` and `genlip-convert to-hf`
share, so a caption and an export of the same checkpoint see the same tensors.

Any TP/PP/VPP layout loads in one process: the model is rebuilt at TP=PP=1 in fp32 and dist_checkpointing
reassembles every tensor from its shards. The result is keyed as the HF layout (`hf.keymap`), which both the HF
model and the exporter read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def load_for_inference(path: str | Path):
    """Any checkpoint (a save dir, following `latest`, or one iter_* dir) -> (Config, HF-layout state dict in fp32,
    path of its tokenizer copy or None). A missing or damaged checkpoint raises ckpt.CheckpointError (one line)."""
    import torch

    from genlip_mcore import config as C
    from genlip_mcore.ckpt import load_sharded, read_meta, resolve
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
    state = load_sharded({"model0": model.sharded_state_dict()}, ckpt)
    model.load_state_dict(state["model0"], strict=True)
    tensors = {k: v.detach().float() for k, v in model.state_dict().items() if torch.is_tensor(v)
               and not k.endswith("_extra_state")}
    m = cfg.model
    hf = megatron_to_hf(tensors, m.num_layers, m.num_attention_heads, m.text_embed_dim != m.hidden_size,
                        m.patch_size, m.num_channels)
    tok: Optional[Path] = ckpt / meta["tokenizer"] if meta.get("tokenizer") else None
    return cfg, hf, tok
