"""The HF export layout (genlip_mcore/hf/export.py, genlip-convert keys): key list and shapes of spec §8.1 for the
released sizes without allocating weights, config.json fields (§1.1, §8.2), sharded safetensors with an index
past the shard size, the image processor config against our own preprocessing, and the config round trip.
The TP=2 x PP=2 conversion itself is tests/distributed/test_hf_convert.py."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlip_mcore import config as C
from genlip_mcore.hf.configuration_genlip import GenLIPConfig
from genlip_mcore.hf.export import (
    hf_config,
    image_processor_config,
    load_hf_config,
    load_hf_tensors,
    save_hf,
    training_tree,
)
from tests.reference.genlip_ref import RefConfig, init_ref_state_dict

ROOT = Path(__file__).resolve().parents[2]
# spec §1.2 / §8.1, written out here: (L, D, F, E, V)
SPEC = {"l16": (24, 1152, 2752, 1024, 151936), "so16": (27, 1152, 3072, 1152, 151936),
        "g16": (40, 1536, 4096, 1024, 151936)}
COUNTS = {"l16": 490, "so16": 546, "g16": 810}


def spec_shapes(L, D, F, E, V) -> dict:
    """The table of spec §8.1 for one size."""
    out = {"vision_embeddings.patch_embedding.weight": (D, 3, 16, 16), "vision_embeddings.patch_embedding.bias": (D,),
           "ln_post.weight": (D,), "ln_post.bias": (D,), "embeddings.weight": (V, E), "lm_head.weight": (V, E)}
    if E != D:
        out.update({"in_proj.weight": (D, E), "in_proj.bias": (D,), "proj.weight": (E, D), "proj.bias": (E,)})
    for i in range(L):
        p = f"visual.layers.{i}."
        out.update({p + "layer_norm1.weight": (D,), p + "layer_norm1.bias": (D,),
                    p + "self_attn.q_proj.weight": (2 * D, D), p + "self_attn.q_proj.bias": (2 * D,),
                    p + "self_attn.k_proj.weight": (D, D), p + "self_attn.k_proj.bias": (D,),
                    p + "self_attn.v_proj.weight": (D, D), p + "self_attn.v_proj.bias": (D,),
                    p + "self_attn.out_proj.weight": (D, D), p + "self_attn.out_proj.bias": (D,),
                    p + "layer_norm2.weight": (D,), p + "layer_norm2.bias": (D,),
                    p + "mlp.fc1.weight": (F, D), p + "mlp.fc1.bias": (F,),
                    p + "mlp.gate_fc.weight": (F, D), p + "mlp.gate_fc.bias": (F,),
                    p + "mlp.fc2.weight": (D, F), p + "mlp.fc2.bias": (D,),
                    p + "layer_scale1.lambda1": (D,), p + "layer_scale2.lambda1": (D,)})
    return out


def test_export_keys_and_shapes_of_released_sizes_on_meta():
    """One subprocess (its own one-rank world), the way a user runs `genlip-convert keys`."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MASTER_PORT", None)
    res = subprocess.run([sys.executable, "-m", "genlip_mcore.convert", "keys", "--variant", "l16,so16,g16"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    got = {d["variant"]: d for d in map(json.loads, res.stdout.strip().splitlines())}
    for name, dims in SPEC.items():
        shapes = {k: tuple(v) for k, v in got[name]["shapes"].items()}
        assert got[name]["num_tensors"] == len(shapes) == COUNTS[name]
        assert shapes == spec_shapes(*dims)


def test_keys_are_computed_without_weight_memory(tp1):
    from genlip_mcore.convert import export_shapes
    from genlip_mcore.info import build_meta

    cfg = C.load(None, ["model.variant=g16"])
    big = [t for t in build_meta(cfg).state_dict().values() if torch.is_tensor(t) and t.numel() > 1 << 20]
    assert big and all(t.is_meta for t in big)                # every large tensor lives on the meta device
    assert len(export_shapes(cfg)) == 810


# ------------------------------------------------------------------------------------------------------------------
# Writing and reading a directory
# ------------------------------------------------------------------------------------------------------------------
def _tiny(tmp_path, vocab_size=97, **save_kw):
    rc = RefConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=vocab_size, text_embed_dim=32, mrope_section=(2, 2, 2))
    sd = init_ref_state_dict(rc, torch.Generator().manual_seed(3))
    cfg = C.load(None, ["model.num_layers=2", "model.hidden_size=48", "model.ffn_hidden_size=96",
                        "model.text_embed_dim=32", f"model.vocab_size={vocab_size}", "model.mrope_section=[2,2,2]",
                        "data.image_size=64"])
    out = save_hf(tmp_path / "hf", sd, hf_config(cfg), **save_kw)
    return sd, cfg, out


def test_config_json_has_released_fields_and_auto_map(tmp_path):
    _, cfg, out = _tiny(tmp_path)
    cj = json.loads((out / "config.json").read_text())
    assert cj["model_type"] == "genlip" and cj["architectures"] == ["GenLIPModel"]
    assert cj["auto_map"]["AutoModel"] == "modeling_genlip.GenLIPModel"
    assert cj["rope_scaling"] == {"mrope_section": [2, 2, 2], "rope_type": "default", "type": "default"}
    for k, v in dict(hidden_act="silu", use_swiglu_ffn=True, gated_attention=True, ls_init_value=0.1,
                     mrope_interleaved=True, tie_word_embeddings=False, num_key_value_heads=4, layer_norm_eps=1e-6,
                     rms_norm_eps=1e-5, lm_head_hdsz=32, initializer_factor=1.0, use_cache=True,
                     spatial_merge_size=1, temporal_patch_size=1, num_patches=16, torch_dtype="bfloat16").items():
        assert cj[k] == v, k
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "configuration_genlip.py", "model.safetensors",
                                                      "modeling_genlip.py", "preprocessor_config.json"]


def test_bf16_export_and_training_config_round_trip(tmp_path):
    sd, cfg, out = _tiny(tmp_path)
    back = load_hf_tensors(out)
    assert back.keys() == sd.keys() and all(back[k].dtype == torch.bfloat16 for k in back)
    assert all(torch.equal(back[k], sd[k].to(torch.bfloat16)) for k in sd)
    tree = training_tree(load_hf_config(out))
    m = C.from_dict({"model": tree["model"], "data": tree["data"]}).model
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "text_embed_dim",
              "vocab_size", "mrope_section", "drop_path_rate", "rope_theta", "layer_scale_init"):
        assert getattr(m, f) == getattr(cfg.model, f), f
    assert tree["data"]["image_size"] == 64


def test_training_tree_names_the_released_variant():
    for name in SPEC:
        cfg = C.load(None, [f"model.variant={name}"])
        assert training_tree(hf_config(cfg))["model"]["variant"] == name


def test_sharded_export_has_an_index_and_loads_with_automodel(tmp_path):
    from transformers import AutoModel

    sd, _, out = _tiny(tmp_path, dtype="fp32", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True).float()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_existing_output_is_not_clobbered(tmp_path):
    _tiny(tmp_path)
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        _tiny(tmp_path)
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")]


@pytest.mark.parametrize("stage", [1, 2])
def test_image_processor_config_matches_our_preprocessing(tmp_path, stage):
    """AutoImageProcessor on the exported preprocessor_config.json produces our training pixels (1e-6)."""
    from transformers import AutoImageProcessor

    from genlip_mcore.data.images import ImageConfig, decode_pil, patchify

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        image_processor_config(GenLIPConfig(image_stage=stage, image_size=64))))
    proc = AutoImageProcessor.from_pretrained(str(tmp_path))
    img = Image.fromarray((np.random.default_rng(stage).random((130, 200, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    ours = decode_pil(buf.getvalue(), ImageConfig(stage=stage, image_size=64))
    pv = proc(images=img, return_tensors="pt")
    if stage == 1:
        assert pv["pixel_values"].shape == (1, 3, 64, 64)
        assert (pv["pixel_values"][0] - ours).abs().max() < 1e-6
    else:
        gh, gw = ours.shape[1] // 16, ours.shape[2] // 16
        assert pv["image_grid_thw"].tolist() == [[1, gh, gw]]
        assert (pv["pixel_values"] - patchify(ours).reshape(gh * gw, -1)).abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------------------------
# An export, captioned through genlip-caption --hf (CI runs this file under the oldest and the locked transformers)
# ------------------------------------------------------------------------------------------------------------------
def test_export_with_tokenizer_captions_like_the_model_it_came_from(tmp_path, capsys):
    from PIL import Image

    from genlip_mcore import caption
    from genlip_mcore.data.tokenizer import train_sentencepiece
    from genlip_mcore.hf.modeling_genlip import GenLIPModel

    texts = ["a red square on a blue field", "a green circle in the middle", "two yellow stripes"] * 20
    train_sentencepiece(texts, tmp_path / "tok", vocab_size=300)
    sd, cfg, out = _tiny(tmp_path, vocab_size=300, dtype="fp32", tokenizer=tmp_path / "tok" / "tokenizer.model")
    assert (out / "tokenizer.model").is_file()
    paths = []
    for i, colour in enumerate(((200, 20, 20), (20, 200, 40), (30, 30, 220))):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (48 + 16 * i, 40), colour).save(paths[-1])
    model, tok, image_cfg, prompt = caption.load_captioner(hf=out, device="cpu")
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    ref = GenLIPModel(hf_config(cfg)).eval()                      # the in-memory model the export was written from
    ref.load_state_dict(sd, strict=True)
    want = caption.caption_files(ref, tok, image_cfg, paths, prompt, max_new_tokens=5, batch_size=2)
    assert caption.main(["--hf", str(out), "--max-new-tokens", "5", "--batch-size", "2", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[1] for line in lines] == [" ".join(c.split()) for c in want]


# ------------------------------------------------------------------------------------------------------------------
# genlip-convert refresh-code: exports written before a modeling fix
# ------------------------------------------------------------------------------------------------------------------
# tests/data/modeling_genlip_d0c3848.py is modeling_genlip.py exactly as commit d0c3848 exported it: its output class
# has a `past_key_values` field, which transformers >= 5.24 renames to `cache` in every ModelOutput __init__.
OLD_MODELING = ROOT / "tests" / "data" / "modeling_genlip_d0c3848.py"


def _digests(path: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_refresh_code_repairs_an_export_written_with_the_broken_modeling_file(tmp_path):
    import transformers
    from packaging.version import Version
    from transformers import AutoModel

    sd, _, out = _tiny(tmp_path, dtype="fp32")
    (out / "modeling_genlip.py").write_bytes(OLD_MODELING.read_bytes())
    before = _digests(out)
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    image_mask = torch.arange(10)[None] < 4
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    # the broken file fails on the transformers that broke it, and worked before it. In a subprocess: transformers
    # keeps a remote-code module in sys.modules, and this process must import the repaired one below.
    probe = ("import sys, torch; from transformers import AutoModel; "
             "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); "
             "m(torch.ones(1, 10, dtype=torch.long), torch.arange(10)[None] < 4, torch.zeros(1, 3, 32, 32))")
    res = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, env=env,
                         timeout=120)
    if Version(transformers.__version__) >= Version("5.24"):
        assert res.returncode != 0 and "unexpected keyword argument 'cache'" in res.stderr, res.stderr[-2000:]
    else:
        assert res.returncode == 0, res.stderr[-2000:]

    cli = [sys.executable, "-m", "genlip_mcore.convert", "refresh-code", str(out)]
    check = subprocess.run(cli + ["--check"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert check.returncode == 1 and "out of date: modeling_genlip.py" in check.stdout, check.stdout + check.stderr
    assert _digests(out) == before                                # --check writes nothing
    res = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "replaced: modeling_genlip.py" in res.stdout, res.stdout + res.stderr
    after = _digests(out)
    assert after.pop("modeling_genlip.py") != before.pop("modeling_genlip.py")
    assert after == before                                        # weights, config, other code: byte for byte
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    new = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    from genlip_mcore.hf.modeling_genlip import GenLIPModel

    ref = GenLIPModel(new.config).eval()
    ref.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got, want = new(ids, image_mask, image, use_cache=True), ref(ids, image_mask, image)
    assert (got.logits - want.logits).abs().max() <= 1e-5
    assert got.past_key_values is got.kv_cache is got.cache and got.kv_cache.seq_len == 10
    again = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "other_model", "bad_json", "no_auto_map", "no_weights"])
def test_refresh_code_refuses_what_is_not_a_genlip_export(tmp_path, case):
    from genlip_mcore.convert import main

    target = tmp_path / "d"
    if case != "missing":
        target.mkdir()
    cj = {"model_type": "genlip", "auto_map": {"AutoModel": "modeling_genlip.GenLIPModel"}}
    if case == "other_model":
        cj["model_type"] = "siglip"
    if case == "no_auto_map":
        cj.pop("auto_map")
    if case not in ("missing", "empty"):
        (target / "config.json").write_text("{not json" if case == "bad_json" else json.dumps(cj))
    if case != "no_weights" and target.exists():
        (target / "model.safetensors").write_bytes(b"weights")
    before = sorted(p.name for p in target.iterdir()) if target.exists() else None
    assert main(["refresh-code", str(target)]) == 2
    assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == before


# ------------------------------------------------------------------------------------------------------------------
# Strict loading: an export whose tensors are not exactly those config.json describes is refused, in one line, by
# both `genlip-caption --hf` and `genlip-convert from-hf` (before either builds a model)
# ------------------------------------------------------------------------------------------------------------------
def _rewrite(out: Path, edit_tensors=None, edit_config=None) -> None:
    from safetensors.torch import load_file, save_file

    if edit_tensors is not None:
        sd = load_file(str(out / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        cj = json.loads((out / "config.json").read_text())
        edit_config(cj)
        (out / "config.json").write_text(json.dumps(cj))


def _nan_and_inf(sd):
    sd["visual.layers.0.mlp.fc1.weight"][3, 4] = float("nan")
    sd["ln_post.bias"][0] = float("inf")


WEIGHT_PROBES = {   # probe -> (tensor edit, config edit, what the one line must say)
    "missing": (lambda sd: sd.pop("visual.layers.1.mlp.fc2.bias"), None,
                "1 missing tensors (visual.layers.1.mlp.fc2.bias)"),
    "unexpected": (lambda sd: sd.update({"visual.extra.weight": torch.ones(2), "pooler.bias": torch.ones(2)}), None,
                   "2 unexpected tensors (pooler.bias, visual.extra.weight)"),
    "nonfinite": (_nan_and_inf, None, "2 tensors hold NaN or Inf (ln_post.bias, visual.layers.0.mlp.fc1.weight)"),
    "shape": (lambda sd: sd.update({"visual.layers.0.mlp.fc1.bias": torch.zeros(95)}), None,
              "visual.layers.0.mlp.fc1.bias is [95], config.json implies [96]"),
    "layers_beyond_config": (None, lambda cj: cj.update(num_hidden_layers=1),
                             "tensors for 2 layers (visual.layers.0-1) but config.json says num_hidden_layers=1"),
    "fewer_layers_than_config": (None, lambda cj: cj.update(num_hidden_layers=3),
                                 "tensors for 2 layers (visual.layers.0-1) but config.json says num_hidden_layers=3"),
}


@pytest.mark.parametrize("probe", sorted(WEIGHT_PROBES))
@pytest.mark.parametrize("cli", ["caption", "from-hf"])
def test_export_with_wrong_tensors_is_refused_in_one_line(tmp_path, capsys, probe, cli):
    from genlip_mcore import caption, convert

    _, _, out = _tiny(tmp_path, dtype="fp32")
    edit_tensors, edit_config, want = WEIGHT_PROBES[probe]
    _rewrite(out, edit_tensors, edit_config)
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (200, 20, 20)).save(image)
    capsys.readouterr()
    if cli == "caption":
        rc = caption.main(["--hf", str(out), "--device", "cpu", str(image)])
    else:
        rc = convert.main(["from-hf", "--hf", str(out), "--out", str(tmp_path / "ckpt")])
        assert not (tmp_path / "ckpt").exists()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert want in err and str(out / "model.safetensors") in err, err


def test_nonfinite_tensor_of_a_sharded_export_names_its_shard(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from genlip_mcore import caption

    _, _, out = _tiny(tmp_path, dtype="fp32", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["visual.layers.1.self_attn.k_proj.weight"]
    sd = load_file(str(out / shard))
    sd["visual.layers.1.self_attn.k_proj.weight"][0, 0] = float("-inf")
    save_file(sd, str(out / shard), metadata={"format": "pt"})
    assert caption.main(["--hf", str(out), "--device", "cpu", str(out / "config.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"genlip-caption: {out / shard}: 1 tensors hold NaN or Inf "
                   "(visual.layers.1.self_attn.k_proj.weight)")


def test_caption_refuses_an_activation_transformers_does_not_know(tmp_path, capsys):
    from genlip_mcore import caption

    _, _, out = _tiny(tmp_path, dtype="fp32")
    _rewrite(out, edit_config=lambda cj: cj.update(hidden_act="swish_bogus"))
    assert caption.main(["--hf", str(out), "--device", "cpu", str(out / "config.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"genlip-caption: {out / 'config.json'}: hidden_act 'swish_bogus' is not an activation "
                   "transformers knows")
