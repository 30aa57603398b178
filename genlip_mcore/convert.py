"""`genlip-convert`: training checkpoints <-> the HuggingFace layout of the released GenLIP models (spec §8).

  genlip-convert to-hf   --checkpoint DIR --out DIR [--dtype bf16|fp32] [--tokenizer PATH] [--max-shard-size 5GB]
  genlip-convert from-hf --hf DIR --out DIR [--overwrite] [section.key=value ...]
  genlip-convert keys --variant g16            (the key/shape list an export writes, from a meta-device model)
  genlip-convert refresh-code DIR [--check]    (replace an export's modeling/configuration code with this version's)

to-hf reads a checkpoint of any TP/PP/VPP layout in ONE process: the model is rebuilt at TP=PP=1 and
dist_checkpointing reassembles every tensor from its shards (TP slices, pipeline stages, virtual chunks). The
global tensors then go through the one declarative key map (`genlip_mcore.hf.keymap`), which splits the fused
query/gate/key/value and SwiGLU gate/up weights, and `genlip_mcore.hf.export.save_hf` writes the directory.

from-hf is the reverse: the HF tensors through the same key map into a TP=PP=1 model, saved as a model-only
checkpoint in the training layout (`latest`, `iter_0000000/`, genlip.json, tokenizer copy). dist_checkpointing
stores global tensors with their offsets, so that checkpoint loads into any TP/PP/VPP/DP layout: give the target
layout as overrides (`parallel.tensor_model_parallel_size=2 ...`); it is validated here and recorded, and stage-2
training starts from it with `training.init_from=DIR`.

from-hf is strict, because whatever it accepts is trained: every config.json field is mapped, holds the one value
our model computes, or has no effect (`hf.export.untrainable_fields` names any other), and the tensors must be
exactly those config.json describes, all finite (`hf.export.check_hf_weights`). It does not take over a save dir
that already holds checkpoints (`latest`, iter_*) unless --overwrite, and then says what it replaces.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("genlip_mcore.convert")


def to_hf(checkpoint: str, out: str, *, dtype: str = "bf16", tokenizer: Optional[str] = None,
          max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    from genlip_mcore.hf.export import hf_config, save_hf
    from genlip_mcore.inference import load_for_inference

    cfg, tensors, tok = load_for_inference(checkpoint)
    return save_hf(out, tensors, hf_config(cfg), dtype=dtype, tokenizer=tokenizer or tok,
                   max_shard_size=max_shard_size, overwrite=overwrite)


def hf_training_config(hf: str, overrides: Sequence[str] = ()):
    """The training Config of an HF directory's model (its preprocessing, its tokenizer), plus `overrides`.
    Refuses, naming them, the config.json fields our model cannot honour."""
    import yaml

    from genlip_mcore import config as C
    from genlip_mcore.data.tokenizer import tokenizer_kind
    from genlip_mcore.hf.export import load_hf_config, read_config_json, training_tree, untrainable_fields

    config = load_hf_config(hf)
    bad = untrainable_fields(read_config_json(hf), config)
    if bad:
        raise ValueError(f"{Path(hf) / 'config.json'}: our model cannot honour {'; '.join(bad)}")
    tree = training_tree(config)
    try:
        tree["data"].update(tokenizer_kind=tokenizer_kind(hf), tokenizer_path=str(Path(hf).resolve()))
    except FileNotFoundError:
        log.warning(f"{hf} has no tokenizer files; set data.tokenizer_path before training")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(tree, f)
    try:
        return C.load(f.name, list(overrides))
    finally:
        Path(f.name).unlink()


def _checkpoints_in(out: Path) -> list[str]:
    """What `out` holds of a save dir: `latest` (with its target), iter_* and leftover .tmp_iter_* entries."""
    from genlip_mcore.ckpt import LATEST

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir() if p.name.startswith(("iter_", ".tmp_iter_")))
    if (out / LATEST).is_file():
        names.insert(0, f"{LATEST} -> {(out / LATEST).read_text().strip()}")
    return names


def from_hf(hf: str, out: str, overrides: Sequence[str] = (), *, overwrite: bool = False) -> Path:
    import copy
    import shutil

    from genlip_mcore import config as C
    from genlip_mcore.ckpt import save_weights_checkpoint
    from genlip_mcore.hf.export import check_hf_weights, first_few, load_hf_config, load_hf_tensors
    from genlip_mcore.hf.keymap import hf_to_megatron, load_megatron_tp1
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import init_distributed, setup_model_parallel

    old = _checkpoints_in(Path(out))
    if old and not overwrite:
        raise FileExistsError(f"--out {out} holds checkpoints ({first_few(old)}); pass --overwrite to replace them")
    cfg = hf_training_config(hf, overrides)
    check_hf_weights(hf, load_hf_config(hf))
    if old:
        log.warning(f"--overwrite: replacing {len(old)} entries of {out} ({first_few(old, 6)}) "
                    "with the converted weights")
    local = copy.deepcopy(cfg)                     # built and saved at TP=PP=1; loads into any layout
    local.parallel, local.precision = C.ParallelConfig(), C.PrecisionConfig()
    local.model.transformer_impl, local.model.attention_backend = "local", "auto"
    init_distributed()
    setup_model_parallel(local.parallel, local.training.seed)
    model = build_model_chunks(local, initialize=False)[0]
    m = cfg.model
    tensors = {k: v.float() for k, v in load_hf_tensors(hf).items()}
    load_megatron_tp1(model, hf_to_megatron(tensors, m.num_layers, m.num_attention_heads,
                                            m.text_embed_dim != m.hidden_size))
    tok = cfg.data.tokenizer_path or None
    final = save_weights_checkpoint(cfg, [model], out, tokenizer=tok, source=str(Path(hf).resolve()))
    for stale in Path(out).glob("iter_*"):        # the replaced run's checkpoints; `latest` already points here
        if stale != final:
            shutil.rmtree(stale)
    return final


def export_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The HF key -> shape list an export of this model writes, computed on the meta device (no weight memory):
    the TP=PP=1 model's state dict through the same key map as `to_hf`."""
    from genlip_mcore import config as C
    from genlip_mcore.hf.keymap import megatron_to_hf
    from genlip_mcore.info import _one_rank_world, build_meta
    from genlip_mcore.parallel import setup_model_parallel

    _one_rank_world()
    setup_model_parallel(C.ParallelConfig(), seed=0)
    m = cfg.model
    tensors = {k: v for k, v in build_meta(cfg).state_dict().items() if not k.endswith("_extra_state")}
    hf = megatron_to_hf(tensors, m.num_layers, m.num_attention_heads, m.text_embed_dim != m.hidden_size,
                        m.patch_size, m.num_channels)
    return {k: tuple(v.shape) for k, v in hf.items()}


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genlip-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="training checkpoint (any layout) -> HF directory")
    a.add_argument("--checkpoint", required=True, help="save dir (follows `latest`) or one iter_* checkpoint")
    a.add_argument("--out", required=True, help="HF directory to write")
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="tensor dtype (released: bf16)")
    a.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the checkpoint's copy)")
    a.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB, as released)")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("from-hf", help="HF directory -> model-only training checkpoint (any layout loads it)")
    b.add_argument("--hf", required=True, help="HF directory (config.json, safetensors, tokenizer files)")
    b.add_argument("--out", required=True, help="save dir to write (iter_0000000 and `latest`)")
    b.add_argument("--overwrite", action="store_true", help="replace the checkpoints of an existing save dir")
    b.add_argument("overrides", nargs="*", help="training config overrides, e.g. the target layout "
                   "parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2")
    c = sub.add_parser("keys", help="print the key -> shape list an export writes (meta device, no weights)")
    c.add_argument("--variant", required=True, help="tiny, l16, so16 or g16 (comma-separated for several)")
    r = sub.add_parser("refresh-code", help="rewrite an export's configuration_genlip.py and modeling_genlip.py "
                       "with this version's (weights, config.json and tokenizer untouched)")
    r.add_argument("dir", help="an HF directory written by genlip-convert to-hf")
    r.add_argument("--check", action="store_true", help="only report; exit 1 if the code is out of date")
    return p


def _refresh_code(path: str, check: bool) -> int:
    from genlip_mcore.hf.export import refresh_code

    stale = refresh_code(path, check=check)
    if not stale:
        print(f"genlip-convert: {path}: code files are up to date")
        return 0
    verb = "out of date" if check else "replaced"
    print(f"genlip-convert: {path}: {verb}: {', '.join(stale)}")
    return 1 if check else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from genlip_mcore import logs

    logs.setup(stream="stderr" if args.cmd == "keys" else "stdout")
    from genlip_mcore.ckpt import CheckpointError
    from genlip_mcore.config import ConfigError

    try:
        if args.cmd == "keys":
            import contextlib
            import json

            from genlip_mcore import config as C

            with contextlib.redirect_stdout(sys.stderr):      # stdout carries only the JSON lines
                lists = {v: export_shapes(C.load(None, [f"model.variant={v}"])) for v in args.variant.split(",")}
            for v, shapes in lists.items():
                print(json.dumps({"variant": v, "num_tensors": len(shapes), "shapes": shapes}))
            return 0
        if args.cmd == "refresh-code":
            return _refresh_code(args.dir, args.check)
        if args.cmd == "to-hf":
            path = to_hf(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        else:
            path = from_hf(args.hf, args.out, args.overrides, overwrite=args.overwrite)
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"genlip-convert: {e}", file=sys.stderr)
        return 2
    print(f"genlip-convert: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
