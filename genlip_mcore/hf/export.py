"""Training config <-> HF config, and writing / reading an HF directory in the released layout (spec §8).

An export directory holds:
- `config.json`: `GenLIPConfig` with the released checkpoints' fields (§1.1, §8.2), our preprocessing metadata, and
  an `auto_map`, so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works without this package;
- `configuration_genlip.py`, `modeling_genlip.py`: the standalone HF code (imports only torch and transformers);
- `model.safetensors` (metadata {"format": "pt"}), or `model-0000k-of-0000n.safetensors` plus
  `model.safetensors.index.json` past `max_shard_size` (5 GB, as the reference);
- the tokenizer files (`tokenizer.model` for SentencePiece, `tokenizer.json` & co for HF tokenizers);
- `preprocessor_config.json`: the image processor of the checkpoint's stage (§6.4 Siglip-style fixed resize for
  stage 1, §6.5 Qwen2-VL-style native resolution for stage 2).

Everything is written to a temporary directory beside `out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from genlip_mcore.data.tokenizer import copy_tokenizer
from genlip_mcore.hf.configuration_genlip import GenLIPConfig

HF_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_genlip.py", "modeling_genlip.py")
AUTO_MAP = {"AutoConfig": "configuration_genlip.GenLIPConfig", "AutoModel": "modeling_genlip.GenLIPModel"}
# Fields of the released config.json that do not change the forward (spec §1.1), with their released values.
RELEASED_EXTRAS = dict(spatial_merge_size=1, temporal_patch_size=1, tokens_per_second=2, rms_norm_eps=1e-5,
                       initializer_factor=1.0, use_cache=True, use_llm_head=False, llm_decoder=None,
                       use_liger_kernel=True)
QWEN_VISION_IDS = dict(vision_start_token_id=151652, vision_end_token_id=151653)   # only with the Qwen vocabulary
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------------
def hf_config(cfg) -> GenLIPConfig:
    """Training `Config` -> the HF config of the same model (with its preprocessing, prompt and released extras)."""
    m, d = cfg.model, cfg.data
    extras = dict(RELEASED_EXTRAS, lm_head_hdsz=m.text_embed_dim)
    if m.vocab_size > max(QWEN_VISION_IDS.values()):
        extras.update(QWEN_VISION_IDS)
    if d.stage == 1:
        extras["num_patches"] = (d.image_size // m.patch_size) ** 2
    return GenLIPConfig(
        hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, patch_size=m.patch_size, num_channels=m.num_channels,
        ls_init_value=m.layer_scale_init, drop_path_rate=m.drop_path_rate, layer_norm_eps=m.layernorm_epsilon,
        text_embed_dim=m.text_embed_dim, vocab_size=m.vocab_size, rope_theta=m.rope_theta,
        mrope_section=list(m.mrope_section), initializer_range=m.init_std, image_size=d.image_size,
        image_stage=d.stage, min_pixels=d.min_pixels, max_pixels=d.max_pixels, prompt=d.prompt,
        end_text=d.end_text, jpeg_draft=d.jpeg_draft, architectures=["GenLIPModel"], **extras)


def training_tree(c: GenLIPConfig) -> dict:
    """HF config -> the `model` and `data` sections of a training config (the variant's name when it is one)."""
    from genlip_mcore.config import VARIANTS

    model = dict(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
                 num_attention_heads=c.num_attention_heads, text_embed_dim=c.text_embed_dim,
                 vocab_size=c.vocab_size, mrope_section=list(c.mrope_section), drop_path_rate=c.drop_path_rate,
                 patch_size=c.patch_size, num_channels=c.num_channels, rope_theta=float(c.rope_theta),
                 layer_scale_init=c.ls_init_value, layernorm_epsilon=c.layer_norm_eps,
                 init_std=c.initializer_range)
    shape = {k: v for k, v in model.items() if k != "drop_path_rate"}
    model["variant"] = next((name for name, v in VARIANTS.items()
                             if all(v.get(k, shape[k]) == shape[k] for k in shape)), "tiny")
    data = dict(stage=int(getattr(c, "image_stage", 1)), image_size=int(getattr(c, "image_size", 224)),
                min_pixels=int(getattr(c, "min_pixels", 4096)), max_pixels=int(getattr(c, "max_pixels", 262144)),
                prompt=getattr(c, "prompt", GenLIPConfig().prompt), end_text=getattr(c, "end_text", None),
                jpeg_draft=bool(getattr(c, "jpeg_draft", False)))
    return {"model": model, "data": data}


def image_processor_config(c: GenLIPConfig) -> dict:
    """preprocessor_config.json for the checkpoint's stage: both resize with bilinear (resample 2), rescale 1/255,
    normalise with the config's mean/std; stage 1 to a fixed square (spec §6.4), stage 2 with smart_resize (§6.5)."""
    common = dict(do_convert_rgb=True, do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, image_mean=list(c.image_mean), image_std=list(c.image_std))
    if int(getattr(c, "image_stage", 1)) == 1:
        s = int(getattr(c, "image_size", 224))
        return dict(image_processor_type="SiglipImageProcessor", size={"height": s, "width": s}, **common)
    return dict(image_processor_type="Qwen2VLImageProcessor", min_pixels=c.min_pixels, max_pixels=c.max_pixels,
                size={"shortest_edge": c.min_pixels, "longest_edge": c.max_pixels}, patch_size=c.patch_size,
                temporal_patch_size=1, merge_size=1, **common)


# ------------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------------
def save_hf(out: str | Path, tensors: dict[str, Tensor], config: GenLIPConfig, *, dtype: str = "bf16",
            tokenizer: Optional[str | Path] = None, max_shard_size: str | int = "5GB",
            overwrite: bool = False) -> Path:
    """Write an HF directory (layout in the module docstring). `tensors` are HF-keyed global tensors."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite / --overwrite to replace it)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(tmp / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.numel() * t.element_size()
                                                                   for t in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(tmp)
    cj = json.loads((tmp / "config.json").read_text())
    # the released spellings (spec §8.2) next to transformers 5's: rope_scaling beside rope_parameters,
    # torch_dtype beside dtype; and the released no-op fields transformers does not serialise itself. The dtype is
    # written here as a string, never set on the config: transformers < 4.56 has no `dtype` attribute and cannot
    # serialise a torch.dtype stored under that name.
    cj["rope_scaling"] = {"mrope_section": list(config.mrope_section), "rope_type": "default", "type": "default"}
    cj["torch_dtype"] = cj["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    for k, v in RELEASED_EXTRAS.items():
        cj.setdefault(k, getattr(config, k, v))
    (tmp / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
    for name in CODE_FILES:
        shutil.copy2(HF_DIR / name, tmp / name)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(image_processor_config(config), indent=2) + "\n")

    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def refresh_code(path: str | Path, *, check: bool = False) -> list[str]:
    """Replace an export's `configuration_genlip.py` / `modeling_genlip.py` with this package's, leaving every other
    file (weights, config.json, tokenizer) untouched. -> the names that were (check: would be) replaced.

    Exports carry their modeling code, so a transformers release that breaks it breaks every export already written
    (transformers 5.24 did, see GenLIPOutput); this is the repair. Refuses a directory that is not a GenLIP export:
    config.json with model_type "genlip" and our auto_map, and its weights. Each file is written beside its old one
    and renamed over it, so an interrupted refresh leaves every file either old or new, never partial."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a GenLIP export (no config.json)")
    try:
        cj = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cj, dict) or cj.get("model_type") != "genlip":
        found = cj.get("model_type") if isinstance(cj, dict) else None
        raise ValueError(f"{cfg_file}: model_type is {found!r}; refresh-code only rewrites GenLIP exports")
    if cj.get("auto_map", {}).get("AutoModel") != AUTO_MAP["AutoModel"]:
        raise ValueError(f"{cfg_file}: auto_map does not name {AUTO_MAP['AutoModel']}; not an export of genlip-convert")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json; not a GenLIP export")
    stale = [n for n in CODE_FILES if not (path / n).is_file() or (path / n).read_bytes() != (HF_DIR / n).read_bytes()]
    if not check:
        for name in stale:
            tmp = path / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(HF_DIR / name, tmp)
            os.replace(tmp, path / name)
    return stale


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"visual\.layers\.(\d+)\.")


def first_few(names, n: int = 3) -> str:
    names = list(names)
    return ", ".join(map(str, names[:n])) + (f" and {len(names) - n} more" if len(names) > n else "")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of an HF directory: model.safetensors, or the files its index names."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        for n in names:
            if not (path / n).is_file():
                raise FileNotFoundError(f"{path / n}: named in {INDEX} but missing")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or {INDEX}")


def load_hf_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of an HF directory (single file or sharded with an index), as stored."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    for f in weight_files(path):
        try:
            out.update(load_file(str(f)))
        except SafetensorError as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def expected_shapes(config: GenLIPConfig) -> dict[str, tuple[int, ...]]:
    """The key -> shape list of the HF model this config describes (built on the meta device: no weight memory)."""
    from genlip_mcore.hf.modeling_genlip import GenLIPModel

    with torch.device("meta"):
        model = GenLIPModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_hf_weights(path: str | Path, config: GenLIPConfig) -> None:
    """Refuse an export whose tensors are not exactly those its config.json describes: a layer count that disagrees
    with num_hidden_layers, missing or unexpected tensors, wrong shapes, NaN or Inf. One ValueError naming the file
    and the first few tensors. Reads one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    files = weight_files(path)
    src = files[0] if len(files) == 1 else path / INDEX
    file_of, shapes, nonfinite = {}, {}, []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    t = sf.get_tensor(k)
                    file_of[k], shapes[k] = f, tuple(t.shape)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        nonfinite.append(k)
        except SafetensorError as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    L = config.num_hidden_layers
    layers = sorted({int(m.group(1)) for k in shapes if (m := _LAYER.match(k))})
    if layers and layers[-1] + 1 != L:
        raise ValueError(f"{src}: holds tensors for {layers[-1] + 1} layers (visual.layers.0-{layers[-1]}) but "
                         f"config.json says num_hidden_layers={L}")
    try:
        want = expected_shapes(config)
    except KeyError:                        # the one field looked up by name when the model is built
        raise ValueError(f"{path / 'config.json'}: hidden_act {config.hidden_act!r} is not an activation "
                         "transformers knows") from None
    missing = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    problems = [f"{len(names)} {what} tensors ({first_few(names)})"
                for what, names in (("missing", missing), ("unexpected", extra)) if names]
    if problems:
        raise ValueError(f"{src}: {'; '.join(problems)} for the model config.json describes")
    wrong = [k for k in want if shapes[k] != want[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{file_of[k]}: {len(wrong)} tensors have the wrong shape for config.json "
                         f"({first_few(wrong)}): {k} is {list(shapes[k])}, config.json implies {list(want[k])}")
    if nonfinite:
        raise ValueError(f"{file_of[nonfinite[0]]}: {len(nonfinite)} tensors hold NaN or Inf ({first_few(nonfinite)})")


def read_config_json(path: str | Path) -> dict:
    """config.json of a GenLIP export, as written (one-line errors for a missing, unreadable or foreign file)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not an HF export)")
    try:
        cj = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    found = cj.get("model_type") if isinstance(cj, dict) else None
    if found != "genlip":
        raise ValueError(f"{f}: model_type is {found!r}, expected 'genlip'")
    return cj


def load_hf_config(path: str | Path) -> GenLIPConfig:
    cj = read_config_json(path)
    for k in ("auto_map", "model_type", "transformers_version"):
        cj.pop(k, None)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
              "num_channels", "vocab_size", "text_embed_dim"):
        v = cj.get(k, 1)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{Path(path) / 'config.json'}: {k}: {v!r} is not a positive integer")
    try:
        return GenLIPConfig(**cj)
    except Exception as e:          # any field of the wrong kind: transformers 5 wraps those in its own errors
        raise ValueError(f"{Path(path) / 'config.json'}: {' '.join(str(e).split())}") from None


# How `genlip-convert from-hf` treats each config.json field. Mapped into the training config by `training_tree`;
# fixed: the one value our Megatron model and data pipeline compute (RGB pixels normalised with 0.5/0.5, SwiGLU with
# a SiLU gate, gated attention, LayerScale, interleaved M-RoPE, untied head, no dropout); inert: no effect on the
# forward (spec §1.1) or transformers' own bookkeeping. Anything else is refused: it may ask for a computation
# we cannot reproduce, and training it as something else would be silent.
MAPPED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                 "drop_path_rate", "layer_norm_eps", "text_embed_dim", "vocab_size", "rope_theta", "mrope_section",
                 "initializer_range", "image_size", "image_stage", "min_pixels", "max_pixels", "prompt", "end_text",
                 "jpeg_draft", "ls_init_value", "num_key_value_heads", "rope_scaling", "rope_parameters")
FIXED_FIELDS = {"hidden_act": "silu", "use_swiglu_ffn": True, "gated_attention": True, "mrope_interleaved": True,
                "tie_word_embeddings": False, "attention_dropout": 0.0, "num_channels": 3, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3, "use_llm_head": False, "llm_decoder": None, "pruned_heads": {}}
INERT_FIELDS = frozenset((
    "max_position_embeddings", "spatial_merge_size", "temporal_patch_size", "tokens_per_second",
    "vision_start_token_id", "vision_end_token_id", "rms_norm_eps", "lm_head_hdsz", "initializer_factor",
    "use_cache", "num_patches", "use_liger_kernel",
    # transformers' PretrainedConfig, 4.x and 5.x (generation defaults included)
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "return_dict", "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "id2label", "label2id", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens"))
ROPE_TYPES = ("default", "mrope")


def untrainable_fields(cj: dict, c: GenLIPConfig) -> list[str]:
    """The fields of config.json `cj` (read as `c`) our Megatron model cannot honour, each as "field: value (why)";
    [] if none."""
    out = [f"{k}: {cj[k]!r} (our model computes {v!r} only)" for k, v in FIXED_FIELDS.items()
           if k in cj and cj[k] != v]
    out += [f"{k}: {cj[k]!r} (unknown field)" for k in cj
            if k not in MAPPED_FIELDS and k not in FIXED_FIELDS and k not in INERT_FIELDS]
    ls = cj.get("ls_init_value", c.ls_init_value)
    if not isinstance(ls, (int, float)) or ls <= 1e-6:
        out.append(f"ls_init_value: {ls!r} (no LayerScale; our layers always have it, so it must be > 1e-6)")
    kv = cj.get("num_key_value_heads")
    if kv is not None and kv != c.num_attention_heads:
        out.append(f"num_key_value_heads: {kv!r} (grouped K/V is not implemented; must equal "
                   f"num_attention_heads={c.num_attention_heads})")
    for name in ("rope_scaling", "rope_parameters"):
        rope = cj.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            out.append(f"{name}: {rope!r} (expected a mapping)")
            continue
        for k, v in rope.items():
            if k in ("type", "rope_type") and v not in ROPE_TYPES:
                out.append(f"{name}.{k}: {v!r} (only {' / '.join(ROPE_TYPES)} rotary is implemented)")
            elif k == "mrope_section" and [int(x) for x in v] != c.mrope_section:
                out.append(f"{name}.mrope_section: {v!r} (disagrees with mrope_section {c.mrope_section})")
            elif k == "rope_theta" and float(v) != float(c.rope_theta):
                out.append(f"{name}.rope_theta: {v!r} (disagrees with rope_theta {c.rope_theta})")
            elif k not in ("type", "rope_type", "mrope_section", "rope_theta"):
                out.append(f"{name}.{k}: {v!r} (rope scaling is not implemented)")
    return out
