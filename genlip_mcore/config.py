"""Typed configuration for genlip_mcore: one tree of dataclasses, variants as data, YAML + key=value overrides.

Nothing in here imports the rest of the package. Every cross-field rule lives in `validate()`, and every error it
raises names the offending field with its dotted path (`parallel.tensor_model_parallel_size`, ...), so a wrong
launch fails at start-up instead of an hour into a job.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the field's dotted path."""


# ------------------------------------------------------------------------------------------------------------------
# Variants: the spec's numbers (spec §1.2), one row each. `tiny` is ours: small enough for CPU tests and quickstart.
# ------------------------------------------------------------------------------------------------------------------
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, hidden_size=96, ffn_hidden_size=256, num_attention_heads=4, text_embed_dim=64,
                 vocab_size=512, mrope_section=[4, 4, 4], drop_path_rate=0.0),
    "l16": dict(num_layers=24, hidden_size=1152, ffn_hidden_size=2752, num_attention_heads=16, text_embed_dim=1024,
                vocab_size=151936, mrope_section=[8, 12, 12], drop_path_rate=0.1),
    "so16": dict(num_layers=27, hidden_size=1152, ffn_hidden_size=3072, num_attention_heads=16, text_embed_dim=1152,
                 vocab_size=151936, mrope_section=[12, 12, 12], drop_path_rate=0.1),
    "g16": dict(num_layers=40, hidden_size=1536, ffn_hidden_size=4096, num_attention_heads=16, text_embed_dim=1024,
                vocab_size=151936, mrope_section=[16, 16, 16], drop_path_rate=0.2),
}

ATTENTION_BACKENDS = ("auto", "local", "flex", "te")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
FP8_FORMATS = (None, "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8", "rowwise")
# Where FP8 GEMMs run (precision.fp8_backend). "auto": "te" with the Transformer Engine layer spec, else "emulate".
FP8_BACKENDS = ("auto", "te", "torchao", "emulate")
# What each backend can run. TE has no "rowwise" (torchao's per-row scales); torchao 0.18 has neither delayed
# scaling nor a CPU blockwise path, and its MXFP8 training linear needs SM100.
FP8_BACKEND_RECIPES = {"te": ("delayed", "tensorwise", "blockwise", "mxfp8"),
                       "torchao": ("tensorwise", "rowwise"),
                       "emulate": ("delayed", "tensorwise", "blockwise", "mxfp8", "rowwise")}
# The block that a recipe's scales cover along each GEMM dimension (tokens, K and N of every block linear).
FP8_RECIPE_BLOCK = {"blockwise": 128, "mxfp8": 32}
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
FP8_AMAX_ALGOS = ("max", "most_recent")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")   # what train/optim.build_scheduler runs


@dataclass
class ModelConfig:
    """Architecture. Field names follow Megatron's TransformerConfig where one exists."""

    variant: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 96
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    text_embed_dim: int = 64          # E: width of the token embedding and LM head (spec §2.2, §2.7)
    vocab_size: int = 512
    patch_size: int = 16
    num_channels: int = 3
    rope_theta: float = 10000.0
    mrope_section: list[int] = field(default_factory=lambda: [4, 4, 4])   # interleaved: only [1], [2] matter
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0       # same rate in every layer, as the reference (spec §2.4)
    layernorm_epsilon: float = 1e-6
    init_std: float = 0.02
    transformer_impl: str = "local"   # layer spec: "local" (torch) or "transformer_engine"
    attention_backend: str = "auto"   # prefix-LM kernel: auto | local (exact, CPU) | flex (torch GPU) | te
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None       # "uniform" | "block" with granularity "full"
    recompute_num_layers: Optional[int] = None
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    # torch.compile the per-layer elementwise chain (bias + LayerScale + DropPath + residual: four passes over the
    # [T, D] stream become one fused kernel). Off by default: compiling costs start-up time, and in bf16 the fused
    # kernel rounds once instead of after each op, so losses differ from eager in the last bits.
    compile: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # gloo pairs "next" and "prev" messages by (peer, tag); with PP=2 both are the same peer and batched p2p
    # silently mixes microbatches (stack notes §1.3.7). None = batched on NCCL, unbatched on gloo.
    batch_p2p_comm: Optional[bool] = None


@dataclass
class PrecisionConfig:
    bf16: bool = False
    fp8: Optional[str] = None         # format: None | "e4m3" | "hybrid" (Megatron's meaning of `fp8`)
    fp8_recipe: str = "delayed"       # delayed | tensorwise (current scaling) | blockwise | mxfp8 | rowwise
    fp8_backend: str = "auto"         # auto | te (Transformer Engine) | torchao (real FP8 GEMMs) | emulate (any device)
    fp8_amax_history_len: int = 1024  # delayed scaling (TE's defaults, not Megatron's 1 / most_recent)
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0               # scale = (FP8_MAX / amax) / 2**margin (delayed and tensorwise)
    # tensorwise: scales rounded down to a power of two; results then do not depend on the TP layout (emulate only)
    fp8_power_2_scales: bool = False
    # false: the weight-gradient GEMM runs on high-precision operands. emulate only: megatron-core's fp8_wgrad is a
    # silent no-op with Transformer Engine >= 2.0, so the te backend refuses it.
    fp8_wgrad: bool = True
    fp8_param: bool = False
    # Keep the first/last transformer layers in high precision (Megatron's --first-last-layers-bf16).
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    # megatron-core quantization recipe (YAML: glob matchers -> per-module recipes; `--te-precision-config-file`)
    quant_recipe_file: Optional[str] = None
    # emulate only, a layout check: GEMMs accumulate in float64 and every sum that TP splits (row-parallel outputs,
    # column-parallel and LM-head dX, the vocabulary softmax) is reduced in float64 before one rounding, so TP=1 and
    # TP=k runs give the same numbers. Slower (float64 GEMMs, twice the TP traffic); false accumulates in fp32 as TE.
    fp8_tp_invariant: bool = False


@dataclass
class DataConfig:
    # Webdataset shards: each entry a path, glob or brace pattern ("/data/cc/{00000..00999}.tar"). Empty: the
    # generated colour-patch packs of data/synthetic.py (smoke runs and tests).
    sources: list[str] = field(default_factory=list)
    source_weights: list[float] = field(default_factory=list)   # mixing weights, one per source (default equal)
    stage: int = 1                    # 1: fixed image_size (spec §6.4); 2: native resolution, smart_resize (§6.5)
    image_size: int = 224
    min_pixels: int = 4096
    max_pixels: int = 262144
    max_image_pixels: int = 89_478_485   # decompression-bomb limit (PIL's default)
    max_aspect_ratio: float = 200.0
    # Pillow JPEG decode at a reduced DCT scale (1/2..1/8, never below the target size) before the bilinear
    # resize: about 2x faster on large sources; pixels differ slightly from the reference's full-size decode.
    jpeg_draft: bool = False
    decoder: str = "pil"              # "pil" (in loader workers) or "dali" (after packing; GPU "mixed" or CPU)
    dali_device: str = "cpu"          # "cpu" | "mixed" (nvJPEG on the GPU)
    tokenizer_kind: str = "sentencepiece"   # "sentencepiece" | "hf" (a tokenizer.json, e.g. Qwen3's)
    tokenizer_path: str = ""
    end_text: Optional[str] = None    # labelled end of every sample; None: the tokenizer's default
    prompt: str = "Describe the image in detail."
    max_caption_tokens: Optional[int] = None
    max_sample_len: Optional[int] = None
    max_seq_len: int = 1024           # tokens per packed row (THD)
    # extra alignment of the packed length beyond what TP/SP and FP8 need (computed in `seq_len_multiple`)
    pad_to_multiple_of: int = 8
    pack_buffer: int = 200            # samples considered by the first-fit packer (the reference uses 200)
    shuffle_shards: int = 2           # shards whose samples are shuffled together (a window); more = more memory
    num_workers: int = 2              # loader processes per rank; each reads its own shards
    max_skip_fraction: float = 0.5    # stop the run when more than this fraction of a window of samples is bad
    skip_window: int = 2000
    # Brace patterns whose members are partly missing fail preflight; true: warn with the count and go on.
    allow_missing_shards: bool = False
    # Held-out webdataset shards for the validation loss (training.eval_interval, training.eval_iters).
    valid_sources: list[str] = field(default_factory=list)


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_fraction: float = 0.007
    lr_decay_style: str = "cosine"
    # "all" decays every parameter, like the reference (spec §5.3); "matrices" skips 1-D params (norms, biases,
    # layer scales), Megatron's default.
    weight_decay_params: str = "all"


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1         # packed rows per micro-batch (flattened into one THD stream)
    global_batch_size: int = 1        # packed rows per optimizer step, over all DP ranks and micro-batches
    train_iters: int = 10
    seed: int = 42
    run_dir: str = "runs/default"     # metrics.jsonl, tensorboard/, wandb/, and checkpoints/ unless save_dir is set
    save_dir: Optional[str] = None    # default: <run_dir>/checkpoints
    save_interval: int = 0            # iterations between checkpoints; 0: only at the end
    keep_last: int = 3                # checkpoints kept (older ones are deleted after a successful save)
    load_dir: Optional[str] = None    # resume everything (model, optimizer, schedule, data position, RNG)
    init_from: Optional[str] = None   # load model weights only (stage 2 from a stage-1 checkpoint)
    exit_interval: Optional[int] = None   # save and exit when iteration % exit_interval == 0 (Megatron's meaning)
    # Save and exit once this many minutes of wall clock have passed since start-up (Megatron's meaning): set it
    # below the slurm --time, leaving room for one step and one save.
    exit_duration_mins: Optional[float] = None
    # A stop signal (SIGTERM, SIGINT, SIGUSR1) saves at the next step boundary; a stop that takes longer than this
    # (or a second signal) exits without saving, leaving the previous checkpoint intact.
    stop_grace_secs: float = 600.0
    # Resume with the schedule of this config (train_iters, LR, warmup, decay) instead of failing when it differs
    # from the checkpoint's (Megatron's override_opt_param_scheduler).
    override_opt_param_scheduler: bool = False
    eval_interval: int = 0            # iterations between validation passes over data.valid_sources; 0: end only
    eval_iters: int = 10              # validation batches (global, forward only) per pass
    max_nonfinite_steps: int = 3      # consecutive non-finite steps (skipped) before the run stops
    log_interval: int = 1


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb_mode: str = "disabled"      # "disabled" (no network, no files) | "offline" (files only) | "online"
    wandb_project: str = "genlip"
    wandb_name: Optional[str] = None
    progress_bar: Optional[bool] = None   # None: only when stdout is a terminal
    peak_tflops: Optional[float] = None   # per device, for MFU; None: from the device name (H100/H200 989 bf16)
    # every N iterations, per layer x GEMM x tensor FP8 statistics to fp8_stats.jsonl in training.run_dir; 0: off
    fp8_stats_interval: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ------------------------------------------------------------------------------------------------------------------
# Building: variant -> YAML -> overrides, then validate.
# ------------------------------------------------------------------------------------------------------------------
def model_config(variant: str, **overrides: Any) -> ModelConfig:
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant: unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return ModelConfig(variant=variant, **{**VARIANTS[variant], **overrides})


def load(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None,
         *, world_size: Optional[int] = None) -> Config:
    """YAML file (optional) then `section.key=value` overrides; `model.variant` pulls in that row first."""
    tree: dict[str, Any] = {} if path is None else read_yaml(path)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        *parents, leaf = key.strip().split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p!r} is not a section")
        node[leaf] = _parse_scalar(raw)
    cfg = from_dict(tree)
    validate(cfg, world_size=world_size)
    return cfg


def read_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """The sections of a YAML config file; a missing or unreadable file, bad YAML or a top level that is not a
    mapping is one ConfigError naming the file."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def from_dict(tree: dict[str, Any]) -> Config:
    if not isinstance(tree.get("model") or {}, dict):
        raise ConfigError(f"model: expected a mapping, got {type(tree['model']).__name__}")
    model_tree = dict(tree.get("model") or {})
    variant = model_tree.get("variant", "tiny")
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant: unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    model_tree = {**VARIANTS[variant], **model_tree}
    sections = {f.name: f for f in fields(Config)}
    unknown = set(tree) - set(sections)
    if unknown:
        raise ConfigError(f"{sorted(map(str, unknown))[0]}: unknown section; sections are {sorted(sections)}")
    built = {}
    for name in sections:
        sub = model_tree if name == "model" else (tree.get(name) or {})
        built[name] = _build(get_type_hints(Config)[name], sub, name)
    return Config(**built)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _build(cls: type, values: dict[str, Any], path: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for k in values:
        if k not in known:
            raise ConfigError(f"{path}.{k}: unknown field; fields of {path} are {sorted(known)}")
    return cls(**{k: _coerce(v, hints[k], f"{path}.{k}") for k, v in values.items()})


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is list:
        if isinstance(value, str) and args[0] is str:   # `data.sources=/shards/{0..9}.tar` on a command line
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], path) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):   # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _parse_scalar(raw: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# ------------------------------------------------------------------------------------------------------------------
# Validation: impossible settings fail here, naming the field.
# ------------------------------------------------------------------------------------------------------------------
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:     # a missing parent package
        return False


def te_available() -> bool:
    return _has_module("transformer_engine")


def _check(ok: bool, path: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {msg}")


def validate(cfg: Config, *, world_size: Optional[int] = None) -> Config:
    """Every field's range and every cross-field rule; pure (no files, no machine probes beyond which optional
    packages are installed). Paths, disk space and the tokenizer are checked by `genlip_mcore.preflight`."""
    _check_finite(cfg)
    _validate_model(cfg.model)
    _validate_parallel(cfg)
    _validate_precision(cfg)
    _validate_data(cfg.data, cfg.model)
    mult = seq_len_multiple(cfg)
    _check(cfg.data.max_seq_len >= 1 and cfg.data.max_seq_len % mult == 0, "data.max_seq_len",
           f"{cfg.data.max_seq_len} must be a positive multiple of {mult} (TP/SP, FP8 and data.pad_to_multiple_of)")
    _validate_training(cfg, world_size)
    _validate_optimizer(cfg.optimizer)
    lg = cfg.logging
    _check(lg.wandb_mode in ("disabled", "offline", "online"), "logging.wandb_mode",
           "'disabled', 'offline' or 'online'")
    _check(lg.peak_tflops is None or lg.peak_tflops > 0, "logging.peak_tflops",
           f"must be > 0 or null (from the device name), got {lg.peak_tflops}")
    return cfg


def _check_finite(cfg: Config) -> None:
    """NaN or infinity in any number field (`optimizer.lr=.inf` parses) passes every range check below."""
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        for f in fields(sub):
            value = getattr(sub, f.name)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float):
                    _check(math.isfinite(v), f"{section.name}.{f.name}", f"must be a finite number, got {v}")


def _validate_model(m: ModelConfig) -> None:
    _check(m.variant in VARIANTS, "model.variant", f"unknown variant {m.variant!r}")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "text_embed_dim",
                 "vocab_size", "patch_size", "num_channels"):
        _check(getattr(m, name) >= 1, f"model.{name}", "must be >= 1")
    _check(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
           f"{m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    _check(m.head_dim % 2 == 0, "model.hidden_size", f"head_dim {m.head_dim} must be even for rotary embeddings")
    _check(len(m.mrope_section) == 3 and min(m.mrope_section) >= 0, "model.mrope_section",
           "needs three entries (T, H, W), each >= 0")
    _check(3 * max(m.mrope_section[1], m.mrope_section[2]) <= m.head_dim // 2, "model.mrope_section",
           f"H/W sections {m.mrope_section[1:]} reach past the {m.head_dim // 2} rotary frequencies")
    for name in ("rope_theta", "layernorm_epsilon", "init_std"):
        _check(getattr(m, name) > 0, f"model.{name}", f"must be > 0, got {getattr(m, name)}")
    _check(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    _check(m.transformer_impl in TRANSFORMER_IMPLS, "model.transformer_impl", f"choose one of {TRANSFORMER_IMPLS}")
    _check(m.attention_backend in ATTENTION_BACKENDS, "model.attention_backend",
           f"choose one of {ATTENTION_BACKENDS}")
    _check(m.recompute_granularity in RECOMPUTE_GRANULARITIES, "model.recompute_granularity",
           f"choose one of {RECOMPUTE_GRANULARITIES}")
    if m.recompute_granularity == "full":
        _check(m.recompute_method in ("uniform", "block"), "model.recompute_method",
               "must be 'uniform' or 'block' when recompute_granularity is 'full'")
        _check((m.recompute_num_layers or 0) >= 1, "model.recompute_num_layers", "must be >= 1 for full recompute")
    needs_te = m.transformer_impl == "transformer_engine" or m.attention_backend == "te"
    if needs_te:
        _check(te_available(), "model.transformer_impl",
               "Transformer Engine is not installed (pip install .[gpu] on a CUDA machine), or use 'local'")


def _validate_parallel(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        _check(getattr(p, name) >= 1, f"parallel.{name}", "must be >= 1")
    _check(p.context_parallel_size == 1, "parallel.context_parallel_size",
           "context parallelism is not supported (the prefix-LM bottom-right mask has no CP kernel)")
    _check(m.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
           f"TP={tp} does not divide model.num_attention_heads={m.num_attention_heads}")
    _check(m.ffn_hidden_size % tp == 0, "parallel.tensor_model_parallel_size",
           f"TP={tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    _check(m.vocab_size % tp == 0, "parallel.tensor_model_parallel_size",
           f"TP={tp} does not divide model.vocab_size={m.vocab_size}")
    _check(not p.sequence_parallel or tp > 1, "parallel.sequence_parallel", "needs tensor_model_parallel_size > 1")
    if vpp is not None:
        _check(vpp >= 2, "parallel.virtual_pipeline_model_parallel_size", "must be >= 2 or null")
        _check(pp >= 2, "parallel.virtual_pipeline_model_parallel_size", "needs pipeline_model_parallel_size >= 2")
    chunks = pp * (vpp or 1)
    _check(m.num_layers % chunks == 0, "model.num_layers",
           f"{m.num_layers} layers do not split evenly over PP={pp} x VPP={vpp or 1} = {chunks} chunks")
    _check(not p.overlap_param_gather or p.use_distributed_optimizer, "parallel.overlap_param_gather",
           "needs parallel.use_distributed_optimizer")


def fp8_backend(pr: PrecisionConfig, m: ModelConfig) -> str:
    """precision.fp8_backend with "auto" resolved: the Transformer Engine spec runs FP8 in TE, the local spec emulates."""
    if pr.fp8_backend != "auto":
        return pr.fp8_backend
    return "te" if m.transformer_impl == "transformer_engine" else "emulate"


def _validate_precision(cfg: Config) -> None:
    pr, m = cfg.precision, cfg.model
    _check(pr.fp8 in FP8_FORMATS, "precision.fp8", f"choose one of {FP8_FORMATS}")
    _check(pr.fp8_backend in FP8_BACKENDS, "precision.fp8_backend", f"choose one of {FP8_BACKENDS}")
    _check(not pr.fp8_param or pr.fp8 is not None, "precision.fp8_param", "needs precision.fp8")
    _check(cfg.logging.fp8_stats_interval >= 0, "logging.fp8_stats_interval", "must be >= 0 (0: off)")
    if pr.fp8 is None:
        _check(not cfg.logging.fp8_stats_interval, "logging.fp8_stats_interval", "needs precision.fp8")
        _check(not pr.fp8_tp_invariant, "precision.fp8_tp_invariant", "needs precision.fp8 on fp8_backend=emulate")
        return
    backend = fp8_backend(pr, m)
    _check(not pr.fp8_tp_invariant or backend == "emulate", "precision.fp8_tp_invariant",
           f"is an emulate option (float64 GEMMs and TP sums); fp8_backend resolves to {backend}")
    _check(pr.fp8_recipe in FP8_RECIPES, "precision.fp8_recipe", f"choose one of {FP8_RECIPES}")
    _check(pr.fp8_recipe in FP8_BACKEND_RECIPES[backend], "precision.fp8_recipe",
           f"{pr.fp8_recipe!r} does not run on precision.fp8_backend={backend}; it runs "
           f"{', '.join(FP8_BACKEND_RECIPES[backend])}")
    _check(pr.fp8_amax_history_len >= 1, "precision.fp8_amax_history_len", "must be >= 1")
    _check(pr.fp8_amax_compute_algo in FP8_AMAX_ALGOS, "precision.fp8_amax_compute_algo",
           f"choose one of {FP8_AMAX_ALGOS}")
    _check(0 <= pr.fp8_margin <= 16, "precision.fp8_margin", f"must be in [0, 16], got {pr.fp8_margin}")
    _check(not pr.fp8_power_2_scales or pr.fp8_recipe == "tensorwise", "precision.fp8_power_2_scales",
           "applies to fp8_recipe=tensorwise (blockwise and mxfp8 scales are powers of two already)")
    for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        _check(getattr(pr, name) >= 0, f"precision.{name}", "must be >= 0")
    if pr.first_last_layers_bf16:
        _check(pr.num_layers_at_start_in_bf16 + pr.num_layers_at_end_in_bf16 < m.num_layers,
               "precision.first_last_layers_bf16",
               f"{pr.num_layers_at_start_in_bf16} + {pr.num_layers_at_end_in_bf16} high-precision layers leave no FP8 "
               f"layer of model.num_layers={m.num_layers}")
    if backend == "te":
        _validate_fp8_te(cfg)
    else:
        _check(m.transformer_impl == "local", "precision.fp8_backend",
               f"{backend} replaces the local spec's linears; set model.transformer_impl=local (or fp8_backend=te)")
        needs_torchao = backend == "torchao" or pr.fp8_recipe in ("tensorwise", "mxfp8", "rowwise")
        _check(not needs_torchao or _has_module("torchao"), "precision.fp8_backend",
               f"{backend} with fp8_recipe={pr.fp8_recipe} uses torchao, which is not installed "
               f"(pip install -c constraints.txt '.[fp8]')")
        _check(backend != "torchao" or pr.fp8_wgrad or pr.fp8_recipe == "rowwise", "precision.fp8_wgrad",
               "false needs fp8_recipe=rowwise on the torchao backend (torchao's rowwise_with_gw_hp), or the emulate "
               "backend")
        _check(backend != "torchao" or not pr.fp8_power_2_scales, "precision.fp8_power_2_scales",
               "is an emulate option (torchao's tensorwise recipe uses fp32 scales)")
        _check(not pr.quant_recipe_file, "precision.quant_recipe_file",
               "per-module recipes go through Transformer Engine (fp8_backend=te); with emulate, keep layers in high "
               "precision with precision.first_last_layers_bf16")
    _check_fp8_alignment(cfg)


def _validate_fp8_te(cfg: Config) -> None:
    pr, m = cfg.precision, cfg.model
    _check(m.transformer_impl == "transformer_engine", "precision.fp8_backend",
           "te needs model.transformer_impl=transformer_engine (or fp8_backend=emulate on the local spec)")
    _check(te_available(), "precision.fp8", "FP8 on fp8_backend=te needs Transformer Engine, which is not installed")
    _check(pr.bf16, "precision.bf16", "FP8 training with Transformer Engine runs inside bf16; set precision.bf16=true")
    _check(pr.fp8_wgrad, "precision.fp8_wgrad",
           "false is not honoured by Transformer Engine >= 2.0 (megatron-core passes override_linear_precision, "
           "which TE removed and its recipes silently drop), so it would run FP8 wgrad anyway; use "
           "fp8_backend=emulate for a high-precision wgrad ablation")
    _check(not pr.fp8_power_2_scales, "precision.fp8_power_2_scales", "is an emulate option")
    _check(not (pr.first_last_layers_bf16 and pr.fp8_recipe == "delayed"), "precision.first_last_layers_bf16",
           "megatron-core runs delayed scaling in one autocast over all layers; use another recipe")
    _check(not (pr.quant_recipe_file and pr.fp8_recipe == "delayed"), "precision.quant_recipe_file",
           "megatron-core's per-module recipes do not allow delayed scaling")
    if pr.first_last_layers_bf16:
        pp, vpp = cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size
        per_stage = m.num_layers // (pp * (vpp or 1))
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            _check(getattr(pr, name) <= per_stage, f"precision.{name}",
                   f"must be <= the {per_stage} layers of a pipeline stage (megatron-core's rule)")


def _check_fp8_alignment(cfg: Config) -> None:
    """Every block linear's GEMM dimensions, per TP shard, must hold whole scaling blocks: TE refuses others, and a
    block that straddles two shards would make results depend on the TP layout. (Tokens: `seq_len_multiple`.)"""
    pr, m, tp = cfg.precision, cfg.model, cfg.parallel.tensor_model_parallel_size
    backend = fp8_backend(pr, m)
    block = FP8_RECIPE_BLOCK.get(pr.fp8_recipe, 16 if backend == "te" else 1)
    for name, dim in (("model.hidden_size", m.hidden_size), ("model.ffn_hidden_size", m.ffn_hidden_size)):
        _check(dim % (block * tp) == 0, name,
               f"{dim} / TP={tp} = {dim / tp:g} is not a multiple of {block}, the block of fp8_recipe="
               f"{pr.fp8_recipe} on {backend} (every GEMM dimension of a TP shard must hold whole blocks)")


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    _check(d.stage in (1, 2), "data.stage", "must be 1 (fixed 224) or 2 (native resolution)")
    _check(d.decoder in ("pil", "dali"), "data.decoder", "'pil' or 'dali'")
    _check(d.dali_device in ("cpu", "mixed"), "data.dali_device", "'cpu' or 'mixed'")
    if d.decoder == "dali":
        _check(not d.jpeg_draft, "data.jpeg_draft", "a Pillow option; DALI decodes at full size (set it false)")
        _check(_has_module("nvidia.dali"), "data.decoder",
               "DALI is not installed (pip install nvidia-dali-cuda120), use 'pil'")
    _check(d.tokenizer_kind in ("sentencepiece", "hf"), "data.tokenizer_kind", "'sentencepiece' or 'hf'")
    _check(d.end_text is None or d.end_text != "", "data.end_text",
           "an empty end text leaves samples without a labelled end; use null for the tokenizer's default")
    p = m.patch_size
    _check(d.image_size >= p and d.image_size % p == 0, "data.image_size",
           f"{d.image_size} must be a positive multiple of model.patch_size={p}")
    _check(d.min_pixels >= 1, "data.min_pixels", "must be >= 1")
    _check(d.max_pixels >= max(d.min_pixels, p * p), "data.max_pixels",
           f"{d.max_pixels} must be >= data.min_pixels={d.min_pixels} and >= one patch ({p * p} pixels)")
    _check(d.max_image_pixels >= 1, "data.max_image_pixels", "must be >= 1")
    _check(d.max_aspect_ratio >= 1.0, "data.max_aspect_ratio", "must be >= 1")
    for name in ("max_caption_tokens", "max_sample_len"):
        v = getattr(d, name)
        _check(v is None or v >= 1, f"data.{name}", f"must be >= 1 or null, got {v}")
    _check(d.max_sample_len is None or d.max_sample_len <= d.max_seq_len, "data.max_sample_len",
           f"{d.max_sample_len} is longer than a packed row (data.max_seq_len={d.max_seq_len})")
    _check(d.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", "must be >= 1")
    _check(d.pack_buffer >= 1, "data.pack_buffer", "must be >= 1")
    _check(d.shuffle_shards >= 1, "data.shuffle_shards", "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(0.0 < d.max_skip_fraction <= 1.0, "data.max_skip_fraction", "must be in (0, 1]")
    _check(d.skip_window >= 1, "data.skip_window", "must be >= 1 (it is the window the skip fraction is taken over)")
    _check(not d.source_weights or len(d.source_weights) == len(d.sources), "data.source_weights",
           f"{len(d.source_weights)} weights for {len(d.sources)} sources")
    _check(all(w > 0 for w in d.source_weights), "data.source_weights", "weights must be > 0")
    _check(not d.valid_sources or bool(d.sources), "data.valid_sources",
           "needs data.sources (generated data has no held-out shards)")
    for name in ("sources", "valid_sources"):
        for i, pattern in enumerate(getattr(d, name)):
            _check(bool(pattern.strip()), f"data.{name}[{i}]", "empty pattern")
    if d.sources or d.valid_sources:
        _check(bool(d.tokenizer_path), "data.tokenizer_path",
               "not set; shards need a tokenizer (train one with `genlip-data train-tokenizer`)")
        # The smallest image of the stage, plus one end token, must fit a row (and a sample), else every
        # sample is skipped as too long.
        patches = (d.image_size // p) ** 2 if d.stage == 1 else -(-d.min_pixels // (p * p))
        limit, name = d.max_seq_len, "data.max_seq_len"
        if d.max_sample_len is not None and d.max_sample_len < limit:
            limit, name = d.max_sample_len, "data.max_sample_len"
        _check(patches + 1 <= limit, name,
               f"{limit} tokens cannot hold the {patches} image tokens of the smallest stage-{d.stage} image "
               f"plus its end token")


def _validate_training(cfg: Config, world_size: Optional[int]) -> None:
    t, p = cfg.training, cfg.parallel
    tp, pp, vpp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    _check(t.micro_batch_size >= 1, "training.micro_batch_size", "must be >= 1")
    _check(t.global_batch_size >= 1 and t.global_batch_size % t.micro_batch_size == 0, "training.global_batch_size",
           f"{t.global_batch_size} must be a positive multiple of training.micro_batch_size={t.micro_batch_size}")
    if world_size is not None:
        model_par = tp * pp * p.context_parallel_size
        _check(world_size % model_par == 0, "parallel.tensor_model_parallel_size",
               f"TP x PP x CP = {model_par} does not divide the world size {world_size}")
        dp = world_size // model_par
        _check(t.global_batch_size % (t.micro_batch_size * dp) == 0, "training.global_batch_size",
               f"{t.global_batch_size} is not a multiple of micro_batch_size x DP = {t.micro_batch_size} x {dp}")
        if vpp is not None:
            n_mb = t.global_batch_size // (t.micro_batch_size * dp)
            _check(n_mb % pp == 0, "training.global_batch_size",
                   f"interleaved pipelining needs the {n_mb} micro-batches per step to be a multiple of PP={pp}")
    _check(t.train_iters >= 1, "training.train_iters", "must be >= 1")
    _check(0 <= t.seed < 2**31, "training.seed", "must be in [0, 2**31)")
    _check(bool(t.run_dir), "training.run_dir", "must be set")
    _check(t.save_interval >= 0, "training.save_interval", "must be >= 0 (0: only at the end)")
    _check(t.keep_last >= 1, "training.keep_last", "must be >= 1")
    _check(t.exit_interval is None or t.exit_interval >= 1, "training.exit_interval",
           f"must be >= 1 or null, got {t.exit_interval}")
    _check(t.exit_duration_mins is None or t.exit_duration_mins > 0, "training.exit_duration_mins",
           f"must be > 0 or null, got {t.exit_duration_mins}")
    _check(t.stop_grace_secs > 0, "training.stop_grace_secs", f"must be > 0, got {t.stop_grace_secs}")
    _check(t.eval_interval >= 0, "training.eval_interval", "must be >= 0 (0: only at the end)")
    _check(t.eval_iters >= 1, "training.eval_iters", "must be >= 1")
    _check(t.max_nonfinite_steps >= 1, "training.max_nonfinite_steps", "must be >= 1")
    _check(t.log_interval >= 1, "training.log_interval", "must be >= 1")
    _check(not (t.load_dir and t.init_from), "training.init_from",
           "set either training.load_dir (resume) or training.init_from (weights only), not both")


def _validate_optimizer(o: OptimizerConfig) -> None:
    _check(o.weight_decay_params in ("all", "matrices"), "optimizer.weight_decay_params", "'all' or 'matrices'")
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _check(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, optimizer.lr={o.lr}], got {o.min_lr}")
    _check(0.0 <= o.lr_warmup_fraction < 1.0, "optimizer.lr_warmup_fraction", "must be in [0, 1)")
    _check(o.lr_decay_style in LR_DECAY_STYLES, "optimizer.lr_decay_style",
           f"{o.lr_decay_style!r} is not one of {LR_DECAY_STYLES}")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(0 <= o.adam_beta1 < 1, "optimizer.adam_beta1", "must be in [0, 1)")
    _check(0 <= o.adam_beta2 < 1, "optimizer.adam_beta2", "must be in [0, 1)")
    _check(o.adam_eps > 0, "optimizer.adam_eps", "must be > 0")
    _check(o.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0 (0: no clipping)")


def seq_len_multiple(cfg: Config) -> int:
    """Packed length alignment: SP splits tokens over TP ranks; FP8 GEMMs want 16 tokens (TE), and block recipes
    whole blocks of tokens on every SP shard (the wgrad GEMM's operands are scaled in blocks along the tokens)."""
    tp = cfg.parallel.tensor_model_parallel_size
    need = cfg.data.pad_to_multiple_of
    if cfg.parallel.sequence_parallel:
        need = math.lcm(need, tp)
    if cfg.precision.fp8 is not None:
        block = 128 if cfg.precision.fp8_recipe in FP8_RECIPE_BLOCK else 16
        need = math.lcm(need, block * (tp if cfg.parallel.sequence_parallel else 1))
    return need
