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
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from genlip_mcore.hf.configuration_genlip import GenLIPConfig

HF_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_genlip.py", "modeling_genlip.py")
AUTO_MAP = {"AutoConfig": "configuration_genlip.GenLIPConfig", "AutoModel": "modeling_genlip.GenLIPModel"}
# Fields of the released config.json that do not change the forward (spec §1.1), with their released values.
RELEASED_EXTRAS = dict(spatial_merge_size=1, temporal_patch_size=1, tokens_per_second=2, rms_norm_eps=1e-5,
                       initializer_factor=1.0, use_cache=True, use_llm_head=False, llm_decoder=None,
                       use_liger_kernel=True)
QWEN_VISION_IDS = dict(vision_start_token_id=151652, vision_end_token_id=151653)   # only with the Qwen vocabulary
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
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
def _copy_tokenizer(src: Optional[str | Path], dest: Path) -> list[str]:
    if src is None:
        return []
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if src.is_file() and src.name not in TOKENIZER_FILES:       # e.g. a SentencePiece model named spm.model
        shutil.copy2(src, dest / ("tokenizer.model" if src.suffix == ".model" else "tokenizer.json"))
        return [src.name]
    if not names:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}) in {folder}")
    for n in names:
        shutil.copy2(folder / n, dest / n)
    return names


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
    _copy_tokenizer(tokenizer, tmp)
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
def load_hf_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of an HF directory (single file or sharded with an index), as stored."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def load_hf_config(path: str | Path) -> GenLIPConfig:
    cj = json.loads((Path(path) / "config.json").read_text())
    if cj.get("model_type") != "genlip":
        raise ValueError(f"{path}/config.json: model_type is {cj.get('model_type')!r}, expected 'genlip'")
    for k in ("auto_map", "model_type", "transformers_version"):
        cj.pop(k, None)
    return GenLIPConfig(**cj)
