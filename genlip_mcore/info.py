"""`genlip-model-info`: parameter counts, training FLOPs per token and the per-rank split of a GenLIP variant.

The model is built on the meta device (no weight memory) in a one-rank gloo world at TP=PP=1, so the counts are
the real module tree's, not a formula's. The TP/PP split is then derived from that TP=1 tree: a parameter of a
tensor-parallel module is divided by TP, every other parameter is replicated; layers split uniformly over the
pipeline stages, the embeddings on the first stage, the final norm, `proj` and the LM head on the last.

FLOPs follow spec §10 (training, per token): 6 * N_eff + attention, with
  N_eff = L * (5 D^2 + 3 D F) + 2 D E (only when E != D) + V E
  attention = 3 * 4 * hd * H * L * pairs / tokens, pairs = n_i^2 + n_t n_i + n_t (n_t + 1) / 2
for one reference sample of n_i image and n_t text tokens (the prefix-LM rule's allowed (q, k) pairs).

Output: one JSON object per variant on stdout, one per line (`--variant l16,so16,g16` gives three lines).
Exit status 2, with the offending field named on stderr, when the variant or layout is invalid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Optional

from genlip_mcore.config import Config, ConfigError, ModelConfig, ParallelConfig, model_config, validate

DEFAULT_SAMPLE = (196, 74)   # 224 px at patch 16 = 14 x 14 image tokens; 74 text tokens (a typical caption row)
# Bytes per parameter for weights, gradients and Adam state, without the distributed optimizer:
# fp32: param 4 + grad 4 + exp_avg 4 + exp_avg_sq 4; bf16 mixed: bf16 param 2 + fp32 main grad 4 + fp32 master 4
# + Adam 8. Activations are not included.
BYTES_PER_PARAM = {"fp32": 16, "bf16_mixed": 18}


# ------------------------------------------------------------------------------------------------------------------
# FLOPs (pure arithmetic on the config).
# ------------------------------------------------------------------------------------------------------------------
def flops_per_token(m: ModelConfig, n_img: int, n_txt: int) -> dict:
    L, D, F, E, V, H = (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.text_embed_dim, m.vocab_size,
                        m.num_attention_heads)
    n_eff = L * (5 * D * D + 3 * D * F) + (2 * D * E if E != D else 0) + V * E
    pairs = n_img * n_img + n_txt * n_img + n_txt * (n_txt + 1) // 2
    tokens = n_img + n_txt
    attention = 3 * 4 * m.head_dim * H * L * pairs / tokens
    dense = 6 * n_eff
    return {"n_eff": n_eff, "dense_flops_per_token": dense, "attention_flops_per_token": attention,
            "flops_per_token": dense + attention,
            "sample": {"image_tokens": n_img, "text_tokens": n_txt, "attention_pairs": pairs}}


# ------------------------------------------------------------------------------------------------------------------
# Parameter groups and the TP/PP split of the TP=1 meta model.
# ------------------------------------------------------------------------------------------------------------------
def _tp_split_params(model) -> set[str]:
    """Names of the parameters that tensor parallelism divides by TP.

    Megatron sets `tensor_model_parallel` on a parallel layer's *weight* only inside its initialisation helpers,
    which do not run with perform_initialization=False (our config), so the attribute alone misses the weights.
    The module types are authoritative; the attribute (set on column-parallel biases) is honoured as well.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    split = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            split.update(prefix + n for n, _ in mod.named_parameters(recurse=False))   # weight [and bias]
        elif isinstance(mod, RowParallelLinear):
            split.add(prefix + "weight")                                                  # bias is replicated
    split.update(n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False))
    return split


def _group(name: str) -> tuple[str, str]:
    """(side, stage part) of a TP=1 parameter name."""
    if name.startswith("embedding.patch_embed."):
        return "vision", "first"
    if name.startswith("embedding."):                        # word_embeddings, in_proj
        return "text", "first"
    if name.startswith("decoder.layers."):
        return "vision", "layer"
    if name.startswith("decoder.final_layernorm."):         # the reference's ln_post
        return "vision", "last"
    if name.startswith(("proj.", "output_layer.")):
        return "text", "last"
    raise ValueError(f"model-info: no parameter group for {name}")


def _stage(parts: dict, layers: int, tp: int, extra: tuple[str, ...]) -> dict:
    """Parameters held by one pipeline stage: `layers` decoder layers plus the `extra` parts."""
    rep = layers * parts["layer"]["replicated"] + sum(parts[e]["replicated"] for e in extra)
    spl = layers * parts["layer"]["tensor_parallel"] + sum(parts[e]["tensor_parallel"] for e in extra)
    return {"layers": layers, "replicated": rep, "tensor_parallel": spl, "per_rank": rep + spl // tp,
            "per_tp_group": tp * rep + spl}


def count(model, num_layers: int, tp: int, pp: int) -> dict:
    """Counts of a TP=1, PP=1 model chunk, and the per-rank split for (tp, pp)."""
    split = _tp_split_params(model)
    sides = {"vision": 0, "text": 0}
    parts = {k: {"replicated": 0, "tensor_parallel": 0} for k in ("first", "layer", "last")}
    for name, p in model.named_parameters():
        side, part = _group(name)
        sides[side] += p.numel()
        if part == "layer":                                  # per layer (all layers have the same shapes)
            if not name.startswith("decoder.layers.0."):
                continue
        if name in split and p.numel() % tp:
            raise ConfigError(f"parallel.tensor_model_parallel_size: TP={tp} does not divide {name}")
        parts[part]["tensor_parallel" if name in split else "replicated"] += p.numel()
    per_stage = num_layers // pp
    if pp == 1:
        only = _stage(parts, per_stage, tp, ("first", "last"))
        stages = {"first": only, "middle": None, "last": only}
    else:
        stages = {"first": _stage(parts, per_stage, tp, ("first",)),
                  "middle": _stage(parts, per_stage, tp, ()) if pp > 2 else None,
                  "last": _stage(parts, per_stage, tp, ("last",))}
    per_rank = {k: (v["per_rank"] if v is not None else None) for k, v in stages.items()}
    per_rank["max"] = max(v for v in per_rank.values() if v is not None)
    return {"total_params": sides["vision"] + sides["text"], "vision_params": sides["vision"],
            "text_params": sides["text"], "stages": stages, "params_per_rank": per_rank}


# ------------------------------------------------------------------------------------------------------------------
# The one-rank world and the meta build.
# ------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_world() -> bool:
    """Start a one-rank process group unless one exists. Returns True if this call started it."""
    import torch.distributed as dist

    from genlip_mcore.parallel import init_distributed

    if dist.is_initialized():
        return False
    # A standalone tool: never join a launcher's world that happens to be in the environment.
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    init_distributed()
    return True


def build_meta(cfg: Config):
    """The TP=1, PP=1 model chunk on the meta device (a few replicated nn.Linear/LayerScale tensors, which the
    model creates with an explicit device, are still materialised: about 4.5M values for g16)."""
    import torch

    from genlip_mcore.model import build_model_chunks

    with torch.device("meta"):
        return build_model_chunks(cfg, initialize=False)[0]


def model_info(cfg: Config, n_img: int, n_txt: int) -> dict:
    """Everything for one validated config (its parallel section gives the layout to split for). Needs Megatron's
    parallel state at TP=PP=1 (see `main`)."""
    m, p = cfg.model, cfg.parallel
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    flat = Config(model=cfg.model)                           # TP=PP=1: the world we are in
    validate(flat)
    counts = count(build_meta(flat), m.num_layers, tp, pp)
    flops = flops_per_token(m, n_img, n_txt)
    max_rank = counts["params_per_rank"]["max"]
    return {
        "variant": m.variant,
        "total_params": counts["total_params"],
        "vision_params": counts["vision_params"],
        "text_params": counts["text_params"],
        "n_eff": flops["n_eff"],
        "flops_per_token": flops["flops_per_token"],
        "dense_flops_per_token": flops["dense_flops_per_token"],
        "attention_flops_per_token": flops["attention_flops_per_token"],
        "sample": flops["sample"],
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp, "layers_per_stage": m.num_layers // pp,
                     "layers_per_virtual_chunk": m.num_layers // (pp * (vpp or 1))},
        "params_per_rank": counts["params_per_rank"],
        "stages": counts["stages"],
        "bytes_per_param_training_estimate": BYTES_PER_PARAM,
        "weights_grads_adam_gib_max_rank": {k: round(max_rank * b / 2**30, 3) for k, b in BYTES_PER_PARAM.items()},
    }


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="genlip-model-info", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", required=True, help="variant name, or a comma-separated list (one line each)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the per-rank split")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for the per-rank split")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per rank")
    ap.add_argument("--seq-img", type=int, default=DEFAULT_SAMPLE[0], help="image tokens of the reference sample")
    ap.add_argument("--seq-txt", type=int, default=DEFAULT_SAMPLE[1], help="text tokens of the reference sample")
    return ap.parse_args(argv)


def _configs(args: argparse.Namespace) -> list[Config]:
    if args.seq_img < 0:
        raise ConfigError(f"--seq-img: must be >= 0, got {args.seq_img}")
    if args.seq_txt < 1:
        raise ConfigError(f"--seq-txt: every sample has at least one text token, got {args.seq_txt}")
    par = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                         virtual_pipeline_model_parallel_size=args.vpp)
    cfgs = []
    for name in args.variant.split(","):
        cfg = Config(model=model_config(name.strip()), parallel=par)
        cfgs.append(validate(cfg))
    return cfgs


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    try:
        cfgs = _configs(args)                                # before any heavy import: bad input fails fast
    except ConfigError as e:
        print(f"genlip-model-info: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from megatron.core import parallel_state

    from genlip_mcore.parallel import setup_model_parallel

    # Megatron and our builders may print; stdout carries only the JSON lines. An existing world (a caller's) is
    # reused, but its Megatron parallel state is reset to TP=PP=1.
    with contextlib.redirect_stdout(sys.stderr):
        started = _one_rank_world()
        setup_model_parallel(ParallelConfig(), seed=0)
        try:
            infos = [model_info(cfg, args.seq_img, args.seq_txt) for cfg in cfgs]
        except ConfigError as e:
            print(f"genlip-model-info: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            if started:
                import torch.distributed as dist

                parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
    for info in infos:
        print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
