"""The HF model (genlip_mcore/hf/modeling_genlip.py) against the plain-PyTorch reference (tests/reference), plus
what the reference gets wrong (spec §11.2 batches, §11.4 positions), the KV-cache captioner, feature extraction, and
`caption.caption_files` with a SentencePiece tokenizer trained here.

Tolerance: 1e-5 absolute on fp32 logits. Weights are the reference's random, perturbed state dicts (norms, biases,
layer scales all non-trivial), loaded with strict=True, so every key of spec §8.1 is exercised.
"""

import ast
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from genlip_mcore.hf.configuration_genlip import GenLIPConfig, default_mrope_section
from genlip_mcore.hf.modeling_genlip import GenLIPModel, _strip_end, grid_positions, to_patches
from tests.reference.genlip_ref import (
    RefConfig,
    init_ref_state_dict,
    make_packed_row,
    ref_forward,
    ref_param_shapes,
    ref_token_mean_loss,
)

TOL = 1e-5
HF_DIR = Path(__file__).resolve().parents[2] / "genlip_mcore" / "hf"
TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)


def ref_cfg(E=32, section=(2, 3, 3), **kw) -> RefConfig:
    return RefConfig(**{**TINY, **kw}, text_embed_dim=E, mrope_section=tuple(section))


def hf_cfg(rc: RefConfig) -> GenLIPConfig:
    return GenLIPConfig(hidden_size=rc.hidden_size, intermediate_size=rc.intermediate_size,
                        num_hidden_layers=rc.num_hidden_layers, num_attention_heads=rc.num_attention_heads,
                        text_embed_dim=rc.text_embed_dim, vocab_size=rc.vocab_size,
                        rope_scaling={"type": "mrope", "mrope_section": list(rc.mrope_section)})


def loaded(rc: RefConfig, seed: int = 0):
    sd = init_ref_state_dict(rc, torch.Generator().manual_seed(seed))
    model = GenLIPModel(hf_cfg(rc)).eval()
    model.load_state_dict(sd, strict=True)
    return model, sd


@pytest.fixture(scope="module")
def tiny():
    rc = ref_cfg()
    model, sd = loaded(rc, seed=1)
    return rc, model, sd


def reference(rc, sd, row):
    return ref_forward(sd, rc, row["input_ids"], row["image_mask"], row["pixel_patches"], row["position_ids"],
                       row["sample_ids"])


def grids_of(samples):
    return [[1, gh, gw] for gh, gw, _ in samples]


# ------------------------------------------------------------------------------------------------------------------
# Layout: keys and shapes are exactly the reference's (spec §8.1)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, shape, n_keys", [
    ("l16", dict(num_hidden_layers=24, hidden_size=1152, intermediate_size=2752, text_embed_dim=1024,
                 mrope_section=(8, 12, 12)), 490),
    ("so16", dict(num_hidden_layers=27, hidden_size=1152, intermediate_size=3072, text_embed_dim=1152,
                  mrope_section=(12, 12, 12)), 546),
    ("g16", dict(num_hidden_layers=40, hidden_size=1536, intermediate_size=4096, text_embed_dim=1024,
                 mrope_section=(16, 16, 16)), 810),
])
def test_variant_keys_and_shapes_equal_reference(variant, shape, n_keys):
    rc = RefConfig(num_attention_heads=16, vocab_size=151936, **shape)
    with torch.device("meta"):
        model = GenLIPModel(hf_cfg(rc))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == ref_param_shapes(rc)
    assert len(got) == n_keys
    assert not list(model.buffers())                              # rotary inv_freq is not state (spec §8.1)


@pytest.mark.parametrize("E", [32, 48])                            # with and without in_proj / proj
def test_strict_load_of_every_reference_key(E):
    rc = ref_cfg(E=E)
    model, sd = loaded(rc)
    assert set(model.state_dict()) == set(sd)
    assert isinstance(model.in_proj, torch.nn.Identity) == (E == rc.hidden_size)


def test_config_defaults_and_rope_spellings():
    c = GenLIPConfig()
    assert (c.hidden_act, c.use_swiglu_ffn, c.gated_attention, c.ls_init_value) == ("silu", True, True, 0.1)
    assert c.mrope_section == [12, 12, 12] and c.text_embed_dim == c.hidden_size == 1152
    assert default_mrope_section(96) == [16, 16, 16] and default_mrope_section(24) == [4, 4, 4]
    released = {"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"}   # spec §8.2
    assert GenLIPConfig(rope_scaling=released).mrope_section == [8, 12, 12]
    assert GenLIPConfig(rope_parameters={"type": "mrope", "mrope_section": [4, 4, 4]}).mrope_section == [4, 4, 4]
    with pytest.raises(ValueError, match="gated_attention"):
        GenLIPConfig(gated_attention=False)


# ------------------------------------------------------------------------------------------------------------------
# Numerics against the reference
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample", [(1, 1, 3), (2, 3, 4), (3, 2, 6), (4, 4, 5), (1, 5, 2)])
def test_single_sample_logits_match_reference(tiny, sample):
    rc, model, sd = tiny
    row = make_packed_row(rc, [sample], generator=torch.Generator().manual_seed(sum(sample)))
    ref = reference(rc, sd, row)
    with torch.no_grad():        # positions from the grid (none passed), as a user would call it
        out = model(row["input_ids"][None], row["image_mask"][None], row["pixel_patches"],
                    image_grid_thw=grids_of([sample]), labels=row["labels"][None])
    assert (out.logits[0] - ref["logits"]).abs().max() < TOL
    assert (out.hidden_states[0] - ref["hidden"]).abs().max() < TOL
    assert abs(out.loss.item() - ref_token_mean_loss(ref["logits"], row["labels"]).item()) < TOL


def test_packed_row_matches_reference(tiny):
    rc, model, sd = tiny
    samples = [(2, 3, 5), (3, 2, 9), (1, 5, 4)]
    row = make_packed_row(rc, samples, pad_to=56, generator=torch.Generator().manual_seed(5))
    ref = reference(rc, sd, row)
    real = row["sample_ids"] >= 0
    with torch.no_grad():
        out = model(row["input_ids"][None], row["image_mask"][None], row["pixel_patches"],
                    image_grid_thw=grids_of(samples), sample_ids=row["sample_ids"][None])
    assert (out.logits[0][real] - ref["logits"][real]).abs().max() < TOL


def _pad_batch(rows, S):
    pad = lambda t, v: torch.nn.functional.pad(t, (0, S - t.shape[-1]), value=v)   # noqa: E731
    return dict(input_ids=torch.stack([pad(r["input_ids"], 0) for r in rows]),
                image_mask=torch.stack([pad(r["image_mask"], False) for r in rows]),
                attention_mask=torch.stack([pad(torch.ones_like(r["input_ids"]), 0) for r in rows]),
                labels=torch.stack([pad(r["labels"], -100) for r in rows]),
                pixel_values=torch.cat([r["pixel_patches"] for r in rows]))


def test_batch_of_different_lengths_equals_each_sample_alone(tiny):
    """The reference's dense mask broadcasts onto the head axis for B > 1 (spec §11.2); ours is per sample."""
    rc, model, sd = tiny
    samples = [(2, 3, 4), (4, 4, 7), (1, 2, 3)]
    rows = [make_packed_row(rc, [s], generator=torch.Generator().manual_seed(i)) for i, s in enumerate(samples)]
    S = max(r["input_ids"].numel() for r in rows)
    batch = _pad_batch(rows, S)
    with torch.no_grad():
        out = model(**batch, image_grid_thw=grids_of(samples))
        total, count = 0.0, 0
        for b, (row, s) in enumerate(zip(rows, samples, strict=True)):
            n = row["input_ids"].numel()
            alone = model(row["input_ids"][None], row["image_mask"][None], row["pixel_patches"],
                          image_grid_thw=grids_of([s]))
            assert (out.logits[b, :n] - alone.logits[0]).abs().max() < TOL
            assert (out.logits[b, :n] - reference(rc, sd, row)["logits"]).abs().max() < TOL
            assert torch.isfinite(out.logits[b]).all()              # padding rows stay finite
            k = int((row["labels"][1:] != -100).sum())
            total, count = total + ref_token_mean_loss(alone.logits[0], row["labels"]).item() * k, count + k
    assert abs(out.loss.item() - total / count) < TOL              # one token mean over the whole batch


def test_positions_from_grid_equal_explicit_positions(tiny):
    rc, model, sd = tiny
    samples = [(3, 5, 4), (2, 2, 6)]
    row = make_packed_row(rc, samples, pad_to=40, generator=torch.Generator().manual_seed(2))
    derived = grid_positions(row["image_mask"][None], row["sample_ids"][None], [(3, 5), (2, 2)])[0]
    real = row["sample_ids"] >= 0
    assert torch.equal(derived[:, real], row["position_ids"][:, real])
    from genlip_mcore.data.sample import sample_positions  # the data pipeline's own rule agrees
    assert torch.equal(derived[:, :19], sample_positions((3, 5), 4))
    common = (row["input_ids"][None], row["image_mask"][None], row["pixel_patches"])
    with torch.no_grad():
        a = model(*common, image_grid_thw=grids_of(samples), sample_ids=row["sample_ids"][None]).logits
        b = model(*common, position_ids=row["position_ids"][None], sample_ids=row["sample_ids"][None]).logits
    assert torch.equal(a[0][real], b[0][real])
    with pytest.raises(ValueError, match="image_grid_thw"):              # never a silent 1-D fallback (§11.4)
        model(*common, sample_ids=row["sample_ids"][None])


def test_pixel_input_forms_agree(tiny):
    """Images [n, C, H, W], a list of images, and patches [N, C*P*P] (data.images.patchify) or [N, C, P, P]."""
    from genlip_mcore.data.images import patchify

    rc, model, _ = tiny
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    flat = torch.cat([patchify(im) for im in images])                    # [12, 768]
    ids = torch.randint(1, rc.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    image_mask = torch.arange(10)[None].expand(2, -1) < 6
    grids = [[1, 2, 3]] * 2
    with torch.no_grad():
        outs = [model(ids, image_mask, images).logits,
                model(ids, image_mask, list(images)).logits,
                model(ids, image_mask, flat, image_grid_thw=grids).logits,
                model(ids, image_mask, flat.view(-1, 3, 16, 16), image_grid_thw=torch.tensor(grids)).logits]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() < 1e-6
    p, g = to_patches(images, None, 16, 3)
    assert p.shape == (12, 3, 16, 16) and g == [(2, 3), (2, 3)]


# ------------------------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------------------------
def test_encode_images_layers_and_independence_from_text(tiny):
    rc, model, _ = tiny
    gen = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 32, 48, generator=gen) * 2 - 1, torch.rand(3, 64, 16, generator=gen) * 2 - 1]
    D, E, L = rc.hidden_size, rc.text_embed_dim, rc.num_hidden_layers
    with torch.no_grad():
        feats = {layer: model.encode_images(images, layer=layer) for layer in
                 ("post_proj", "post_norm", "pre_norm", 0, 1, L, -1)}
        for layer, f in feats.items():
            assert [tuple(t.shape) for t in f] == [(6, E if layer == "post_proj" else D), (4, E if layer ==
                                                                                          "post_proj" else D)]
        assert all(torch.equal(a, b) for a, b in zip(feats["pre_norm"], feats[L], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(feats["pre_norm"], feats[-1], strict=True))
        p0, _ = to_patches(images[0], None, 16, 3)
        assert torch.allclose(feats[0][0], model.vision_embeddings(p0), atol=1e-6)
        # batched (padded) == alone == with text after it
        for im, f in zip(images, feats["post_proj"], strict=True):
            assert (model.encode_images([im])[0] - f).abs().max() < TOL
            n = f.shape[0]
            ids = torch.cat([torch.zeros(n, dtype=torch.long), torch.arange(1, 8)])[None]
            out = model(ids, torch.arange(n + 7)[None] < n, [im])
            assert (out.hidden_states[0, :n] - f).abs().max() < TOL
        one_by_one = model.encode_images(images, layer="post_norm", batch_size=1)
        assert all((a - b).abs().max() < TOL for a, b in zip(one_by_one, feats["post_norm"], strict=True))


# ------------------------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------------------------
def greedy_recompute(model, image, prompt, n):
    """Greedy decoding without a cache: the whole sequence again at every step, positions from the grid."""
    n_img = (image.shape[1] // 16) * (image.shape[2] // 16)
    out = []
    for _ in range(n):
        ids = torch.tensor([[0] * n_img + prompt + out])
        logits = model(ids, torch.arange(ids.shape[1])[None] < n_img, [image]).logits
        out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_batched_generation_equals_recompute(seed):
    rc = ref_cfg(E=32 if seed != 1 else 48, num_hidden_layers=2 + seed % 2)
    model, _ = loaded(rc, seed=10 + seed)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=gen) * 2 - 1 for h, w in ((32, 48), (48, 48), (16, 64))]
    prompt = [5, 9, 11]
    with torch.no_grad():
        batched = model.generate_captions(images, prompt_ids=prompt, max_new_tokens=8, end_ids=[])
        alone = [model.generate_captions([im], prompt_ids=prompt, max_new_tokens=8, end_ids=[])[0] for im in images]
        slow = [greedy_recompute(model, im, prompt, 8) for im in images]
    assert batched == alone == slow
    assert all(len(o) == 8 for o in batched)
    # the cache through the public forward: prefix with use_cache, then one token, == the full sequence at once
    n_img = 6
    ids = torch.tensor([[0] * n_img + prompt + batched[0][:3]])
    image_mask = torch.arange(ids.shape[1])[None] < n_img
    with torch.no_grad():
        full = model(ids, image_mask, images[:1]).logits
        head = model(ids[:, :-1], image_mask[:, :-1], images[:1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=head.past_key_values).logits
    assert (step[0, -1] - full[0, -1]).abs().max() < TOL
    assert (head.logits[0] - full[0, :-1]).abs().max() < TOL


def test_generation_stops_at_the_end_sequence(tiny):
    rc, model, _ = tiny
    gen = torch.Generator().manual_seed(9)
    images = [torch.rand(3, 32, 32, generator=gen) * 2 - 1, torch.rand(3, 16, 48, generator=gen) * 2 - 1]
    free = model.generate_captions(images, prompt_ids=[3], max_new_tokens=10, end_ids=[])
    a = free[0]
    k = next(i for i in range(2, 10) if a[i] not in a[:i])       # first occurrence of a fresh token
    end = a[k - 1:k + 1]                                          # a 2-token end sequence ending at step k
    got = model.generate_captions(images, prompt_ids=[3], max_new_tokens=10, end_ids=end)
    assert got[0] == a[:k - 1]
    first = model.generate_captions(images, prompt_ids=[3], max_new_tokens=10, end_ids=[a[k], 10 ** 6],
                                    stop_at_first_end_id=True)
    assert first[0] == a[:k]
    # the other image is unaffected unless it produced the same sequence itself
    assert got[1] == free[1] or free[1][:len(got[1]) + 2][-2:] == end
    assert _strip_end([4, 5, 7], [7, 8], done=False, first_only=False) == [4, 5]      # cut inside the end
    assert _strip_end([4, 7, 8], [7, 8], done=True, first_only=False) == [4]


def test_save_and_from_pretrained_round_trip(tiny, tmp_path):
    from safetensors import safe_open

    rc, model, sd = tiny
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd)
    back, info = GenLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info                          # nothing missing, unexpected or mismatched
    assert not back.training and back.config.mrope_section == list(rc.mrope_section)
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())
    ids = torch.randint(1, rc.vocab_size, (1, 9))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(ids, torch.arange(9)[None] < 4, image).logits,
                           back(ids, torch.arange(9)[None] < 4, image).logits)


def test_transformers_api_surface_on_this_version(tiny, tmp_path):
    """What drifts between transformers releases, checked on whichever one runs this (CI: 4.53 and the lock's 5.x):
    _from_config, loading in bf16 through this version's dtype keyword, attn_implementation, return_dict=False, and
    the KV cache under every spelling (kv_cache, past_key_values, cache; 5.24 renames the last two)."""
    import transformers
    from packaging.version import Version

    rc, model, sd = tiny
    fresh = GenLIPModel._from_config(model.config)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    model.save_pretrained(tmp_path)
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    for impl in ("eager", "sdpa"):
        m = GenLIPModel.from_pretrained(tmp_path, attn_implementation=impl, **{dtype_kw: torch.bfloat16})
        assert m.config._attn_implementation == impl
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    ids = torch.randint(1, rc.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    image_mask, image = torch.arange(9)[None] < 4, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(ids, image_mask, image, use_cache=True)
        assert out.kv_cache is out.past_key_values is out.cache and out.kv_cache.seq_len == 9
        as_tuple = model(ids, image_mask, image, use_cache=True, return_dict=False)
        assert torch.equal(as_tuple[0], out.logits) and type(as_tuple[-1]) is type(out.kv_cache)
        nxt = torch.tensor([[5]])
        a = model(nxt, past_key_values=model(ids, image_mask, image, use_cache=True).kv_cache).logits
        b = model(nxt, cache=model(ids, image_mask, image, use_cache=True).kv_cache).logits
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="not both"):
            model(nxt, past_key_values=out.kv_cache, cache=out.kv_cache)


def test_training_forward_reaches_every_parameter():
    rc = ref_cfg()
    model, _ = loaded(rc, seed=5)
    model.train()
    row = make_packed_row(rc, [(2, 2, 6)], generator=torch.Generator().manual_seed(0))
    out = model(row["input_ids"][None], row["image_mask"][None], row["pixel_patches"], image_grid_thw=[[1, 2, 2]],
                labels=row["labels"][None])
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------------
# The two files are standalone remote code
# ------------------------------------------------------------------------------------------------------------------
def test_hf_files_import_only_torch_transformers_and_each_other(tmp_path):
    allowed = {"torch", "transformers", "math", "dataclasses", "typing"}
    for name in ("configuration_genlip.py", "modeling_genlip.py"):
        for node in ast.walk(ast.parse((HF_DIR / name).read_text())):
            if isinstance(node, ast.Import):
                assert {a.name.split(".")[0] for a in node.names} <= allowed, name
            elif isinstance(node, ast.ImportFrom):
                assert (node.level == 1 and node.module == "configuration_genlip") or \
                    (node.level == 0 and node.module.split(".")[0] in allowed), f"{name}: {node.module}"
    pkg = tmp_path / "standalone_genlip"                       # a copy outside the package still imports
    pkg.mkdir()
    for name in ("configuration_genlip.py", "modeling_genlip.py"):
        shutil.copy(HF_DIR / name, pkg / name)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("standalone_genlip.modeling_genlip")
        assert mod.GenLIPModel is not GenLIPModel and "genlip_mcore" not in mod.__name__
    finally:
        sys.path.remove(str(tmp_path))
        for m in [m for m in sys.modules if m.startswith("standalone_genlip")]:
            del sys.modules[m]


# ------------------------------------------------------------------------------------------------------------------
# caption.caption_files with a SentencePiece tokenizer trained here
# ------------------------------------------------------------------------------------------------------------------
def test_caption_files_with_a_trained_sentencepiece(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from genlip_mcore import caption
    from genlip_mcore.data.images import ImageConfig, decode_pil
    from genlip_mcore.data.tokenizer import load_tokenizer, train_sentencepiece

    texts = ["a red square on a blue field", "a green circle in the middle", "two yellow stripes"] * 20
    train_sentencepiece(texts, tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer("sentencepiece", tmp_path / "tok")
    rc = ref_cfg(vocab_size=tok.vocab_size)
    model, _ = loaded(rc, seed=3)
    paths = []
    for i, (size, colour) in enumerate((((40, 30), (200, 20, 20)), ((64, 64), (20, 200, 40)))):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", size, colour).save(paths[-1])
    image_cfg = ImageConfig(stage=2)                                  # native resolution: two different grids
    prompt = " Describe the image in detail. "
    got = caption.caption_files(model, tok, image_cfg, paths, prompt, max_new_tokens=6, batch_size=2)
    ids = tok.encode(prompt.strip())
    images = [decode_pil(p.read_bytes(), image_cfg) for p in paths]
    want = [tok.decode(o) for o in model.generate_captions(images, prompt_ids=ids, max_new_tokens=6,
                                                           end_ids=tok.end_ids)]
    assert got == want and len(got) == 2 and all(isinstance(c, str) for c in got)
    assert caption.caption_files(model, tok, image_cfg, paths, prompt, 6, batch_size=1) == got

    # the same model as an HF export: load_captioner and the CLI give the same captions
    export = tmp_path / "export"
    model.config.image_stage, model.config.prompt = 2, prompt.strip()
    model.save_pretrained(export)
    shutil.copy(tmp_path / "tok" / "tokenizer.model", export / "tokenizer.model")
    m2, tok2, cfg2, prompt2 = caption.load_captioner(hf=export, device="cpu")
    assert (cfg2.stage, prompt2) == (2, prompt.strip())
    assert caption.caption_files(m2, tok2, cfg2, paths, prompt2, 6, 2) == got
    assert caption.main(["--hf", str(export), "--max-new-tokens", "6", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert [line.split("\t")[1] for line in lines] == [" ".join(c.split()) for c in got]

    # a training checkpoint goes through inference.load_for_inference (stubbed here: its own tests cover dist checkpoints)
    from genlip_mcore import config as C
    from tests.packs import ref_config

    cfg = C.Config(model=C.model_config("tiny", vocab_size=tok.vocab_size))
    cfg.data.stage, cfg.data.tokenizer_path, cfg.data.prompt = 2, str(tmp_path / "tok"), prompt.strip()
    sd = init_ref_state_dict(ref_config(cfg.model), torch.Generator().manual_seed(8))
    import genlip_mcore.inference

    monkeypatch.setattr(genlip_mcore.inference, "load_for_inference", lambda path: (cfg, sd, None))
    m3, tok3, cfg3, prompt3 = caption.load_captioner(checkpoint="unused", device="cpu")
    assert m3.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in m3.state_dict().items())
    assert (m3.config.num_hidden_layers, m3.config.mrope_section, cfg3.stage, prompt3) == (4, [4, 4, 4], 2,
                                                                                         prompt.strip())
    ref_model = GenLIPModel(caption.hf_config(cfg)).eval()
    ref_model.load_state_dict(sd, strict=True)
    assert caption.caption_files(m3, tok3, cfg3, paths, prompt3, 6, 2) == \
        caption.caption_files(ref_model, tok, image_cfg, paths, prompt3, 6, 2)

    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        caption.caption_files(model, tok, image_cfg, [tmp_path / "bad.png"], prompt, 4, 1)
