"""Start-up checks of paths and the machine, run on every rank after `config.validate` and before the model is built.

`validate()` only knows the config; whether a run can write its checkpoints, finds all its shards and can read its
tokenizer depends on the filesystem of the node it lands on. Checking those here, before torch.distributed and the
model, turns what used to surface at the first save (after a day of training) or as a traceback into one line
naming the field, within seconds. Each check raises `ConfigError`; the CLI prints it and exits 2.

No collectives: every rank checks what it will itself touch (nodes may mount different filesystems), and a
failing rank's exit ends the launch (torchrun and srun tear down the other ranks).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

from genlip_mcore import ckpt
from genlip_mcore.config import Config, ConfigError, DataConfig, ModelConfig, TrainingConfig

log = logging.getLogger(__name__)


def run(cfg: Config, *, rank: int = 0) -> None:
    """Every check, in the order a user would fix them."""
    t = cfg.training
    check_writable(Path(t.run_dir), "training.run_dir")
    check_writable(save_dir(t), "training.save_dir")
    check_disk(cfg)
    shards = check_sources(cfg.data)
    if cfg.data.sources or cfg.data.valid_sources:
        check_tokenizer(cfg.data, cfg.model)
    check_checkpoints(t)
    check_fp8(cfg)
    if rank == 0:
        found = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in shards.items() if n) or "generated data"
        log.info(f"preflight: {found}; checkpoints in {save_dir(t)}")


def save_dir(t: TrainingConfig) -> Path:
    return Path(t.save_dir) if t.save_dir else Path(t.run_dir) / "checkpoints"


# ------------------------------------------------------------------------------------------------------------------
# Directories and disk space
# ------------------------------------------------------------------------------------------------------------------
def check_writable(path: Path, field: str) -> None:
    """Create `path` and write then remove a probe file in it (named per host and process: ranks run this at once)."""
    probe = path / f".preflight-{socket.gethostname()}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"genlip preflight\n")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}: cannot write to {path} ({e.strerror or e})") from None


def parameter_count(m: ModelConfig) -> int:
    """Spec §1.3's closed form: equals the built model's count for every variant (tests/unit/test_config.py)."""
    L, D, F, E, V = m.num_layers, m.hidden_size, m.ffn_hidden_size, m.text_embed_dim, m.vocab_size
    per_layer = 5 * D * D + 3 * D * F + 12 * D + 2 * F
    patch = m.patch_dim * D + D
    text = 2 * V * E + ((E * D + D) + (D * E + E) if E != D else 0)
    return L * per_layer + patch + 2 * D + text


def checkpoint_bytes(cfg: Config) -> int:
    """One training checkpoint, all ranks together: the weights (bf16 or fp32), Adam's two fp32 moments, and the
    fp32 master weights under bf16. The distributed optimizer shards this over ranks but does not change the sum."""
    per_param = (2 + 4 + 8) if cfg.precision.bf16 else (4 + 8)
    return parameter_count(cfg.model) * per_param


def check_fp8(cfg: Config) -> None:
    """The FP8 recipe can run on this device (`model.fp8.device`), and a per-module recipe file exists."""
    pr = cfg.precision
    if pr.fp8 is None:
        return
    if pr.quant_recipe_file and not Path(pr.quant_recipe_file).is_file():
        raise ConfigError(f"precision.quant_recipe_file: {pr.quant_recipe_file} is not a file")
    from genlip_mcore.model.fp8.device import check_device  # imports torch: only for FP8 runs

    check_device(cfg)


def check_disk(cfg: Config) -> None:
    """Fails when the next checkpoint cannot fit; warns when keep_last + 1 (the peak: a new save lands before the
    oldest is pruned) cannot. Only the first is certain: other jobs free and take space on a shared disk meanwhile."""
    t = cfg.training
    where = save_dir(t)
    size = checkpoint_bytes(cfg)
    free = shutil.disk_usage(where).free
    gib = 2**30
    if free < size:
        raise ConfigError(f"training.save_dir: {where} has {free / gib:.2f} GiB free, less than one checkpoint "
                          f"(about {size / gib:.2f} GiB)")
    held = len(ckpt.checkpoints(where))
    need = max(1, t.keep_last + 1 - held) * size
    if free < need:
        log.warning(f"training.save_dir: {where} has {free / gib:.2f} GiB free; keeping training.keep_last="
                    f"{t.keep_last} checkpoints of about {size / gib:.2f} GiB needs {need / gib:.2f} GiB more")


# ------------------------------------------------------------------------------------------------------------------
# Shards and tokenizer
# ------------------------------------------------------------------------------------------------------------------
def check_sources(d: DataConfig) -> dict[str, int]:
    """Expand every pattern once; returns shard counts per list. A pattern that finds nothing fails; brace members
    that are missing fail unless data.allow_missing_shards, then they are a warning with the count."""
    from genlip_mcore.data.sources import expand

    counts = {}
    for name in ("sources", "valid_sources"):
        counts[name] = 0
        for i, pattern in enumerate(getattr(d, name)):
            e = expand(pattern)
            where = f"data.{name}[{i}]"
            if not e.files:
                raise ConfigError(f"{where}: {pattern!r} matches no file")
            if e.missing:
                if not d.allow_missing_shards:
                    raise ConfigError(f"{where}: {e.describe_missing()} (data.allow_missing_shards=true trains "
                                      "without them)")
                log.warning(f"{where}: {e.describe_missing()}; going on without them (data.allow_missing_shards)")
            counts[name] += len(e.files)
    return counts


def check_tokenizer(d: DataConfig, m: ModelConfig) -> None:
    """Load it as training will, and check that every id it produces has a row in the model's embedding."""
    from genlip_mcore.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(d.tokenizer_kind, d.tokenizer_path, d.end_text)
    except ConfigError:
        raise
    except ValueError as e:                 # the tokenizer loaded; its end text does not work with it
        raise ConfigError(f"data.end_text: {_first_line(e)}") from None
    except Exception as e:                  # sentencepiece and tokenizers raise their own types on a bad file
        raise ConfigError(f"data.tokenizer_path: {d.tokenizer_path} is not a {d.tokenizer_kind} tokenizer "
                          f"({_first_line(e)})") from None
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                          f"({d.tokenizer_path})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints to start from
# ------------------------------------------------------------------------------------------------------------------
def check_checkpoints(t: TrainingConfig) -> None:
    """training.load_dir / init_from must resolve to a checkpoint with readable metadata (`ckpt.resolve` names an
    HF export as such); resuming needs one with optimizer state. Shard files are checked when they are loaded."""
    for name in ("load_dir", "init_from"):
        value = getattr(t, name)
        if not value:
            continue
        field, path = f"training.{name}", Path(value)
        if not path.is_dir():
            raise ConfigError(f"{field}: {value} is not a directory")
        try:
            meta = ckpt.read_meta(ckpt.resolve(path))
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(f"{field}: {_first_line(e)}") from None
        if name == "load_dir" and isinstance(meta, dict) and meta.get("weights_only"):
            raise ConfigError(f"{field}: {value} holds model weights only (no optimizer or schedule, e.g. written "
                              "by genlip-convert from-hf): start from it with training.init_from")
