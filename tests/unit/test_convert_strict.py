"""Strict conversion and captioning, at the level users see (exit code, one line on stderr): `genlip-convert from-hf`
refuses config.json fields our model cannot honour and does not take over a save dir; `genlip-caption --shards`
counts what it leaves out; one tokenizer copy for checkpoints and exports. Refusals of wrong tensors (missing,
unexpected, non-finite, layer counts) are in test_hf_export.py, which CI also runs under the oldest transformers."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from genlip_mcore import caption, convert
from genlip_mcore import config as C
from genlip_mcore.data.tokenizer import copy_tokenizer, load_tokenizer, tokenizer_kind, train_sentencepiece
from genlip_mcore.hf.export import hf_config, load_hf_tensors, save_hf
from tests.reference.genlip_ref import RefConfig, init_ref_state_dict

TEXTS = ["a red square on a blue field", "a green circle in the middle", "two yellow stripes"] * 20


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny fp32 export with a SentencePiece tokenizer, and its tensors."""
    w = tmp_path_factory.mktemp("strict")
    tok = train_sentencepiece(TEXTS, w / "tok", vocab_size=300)
    rc = RefConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=300, text_embed_dim=32, mrope_section=(2, 2, 2))
    sd = init_ref_state_dict(rc, torch.Generator().manual_seed(3))
    cfg = C.load(None, ["model.num_layers=2", "model.hidden_size=48", "model.ffn_hidden_size=96",
                        "model.text_embed_dim=32", "model.vocab_size=300", "model.mrope_section=[2,2,2]",
                        "data.image_size=64"])
    return save_hf(w / "hf", sd, hf_config(cfg), dtype="fp32", tokenizer=tok), sd


def _copy(export, tmp_path, **config_edits) -> Path:
    out = tmp_path / "hf"
    shutil.copytree(export[0], out)
    cj = json.loads((out / "config.json").read_text())
    cj.update(config_edits)
    (out / "config.json").write_text(json.dumps(cj))
    return out


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------------------------
# config.json fields our model cannot honour
# ------------------------------------------------------------------------------------------------------------------
FIELD_PROBES = {   # config.json edits -> what the one line must name
    "gelu": (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act: 'gelu_pytorch_tanh' (our model computes 'silu'"),
    "no_layerscale": (dict(ls_init_value=0), "ls_init_value: 0 (no LayerScale"),
    "attention_dropout": (dict(attention_dropout=0.1), "attention_dropout: 0.1"),
    "channels": (dict(num_channels=1, image_mean=[0.5], image_std=[0.5]), "num_channels: 1"),
    "image_mean": (dict(image_mean=[0.485, 0.456, 0.406]), "image_mean: [0.485, 0.456, 0.406]"),
    "gqa": (dict(num_key_value_heads=2), "num_key_value_heads: 2 (grouped K/V is not implemented"),
    "rope_yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                  ("rope_scaling.rope_type: 'yarn' (only default / mrope", "rope_scaling.factor: 4.0")),
    "rope_section": (dict(rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]}),
                     "rope_scaling.mrope_section: [4, 4, 4] (disagrees with mrope_section [2, 2, 2])"),
    "unknown": (dict(use_qk_norm=True), "use_qk_norm: True (unknown field)"),
    "llm_head": (dict(use_llm_head=True), "use_llm_head: True"),
    "tied": (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    "swiglu": (dict(use_swiglu_ffn=False), "use_swiglu_ffn"),
    "bad_type": (dict(hidden_size="x"), "hidden_size: 'x' is not a positive integer"),
}


@pytest.mark.parametrize("probe", sorted(FIELD_PROBES))
def test_from_hf_refuses_config_fields_it_cannot_honour(export, tmp_path, capsys, probe):
    edits, want = FIELD_PROBES[probe]
    hf = _copy(export, tmp_path, **edits)
    assert convert.main(["from-hf", "--hf", str(hf), "--out", str(tmp_path / "ckpt")]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"genlip-convert: {hf / 'config.json'}: "), err
    assert all(w in err for w in ((want,) if isinstance(want, str) else want)), err
    assert not (tmp_path / "ckpt").exists()


def test_released_spellings_and_inert_fields_are_accepted(export):
    from genlip_mcore.hf.export import load_hf_config, read_config_json, untrainable_fields

    cj, c = read_config_json(export[0]), load_hf_config(export[0])
    assert untrainable_fields(cj, c) == []
    cj.update(rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}, num_patches=196, use_liger_kernel=True,
              vision_start_token_id=151652, max_position_embeddings=32768, eos_token_id=3, num_key_value_heads=None)
    assert untrainable_fields(cj, c) == []


# ------------------------------------------------------------------------------------------------------------------
# --out: a save dir is not taken over without --overwrite
# ------------------------------------------------------------------------------------------------------------------
def _training_save_dir(path: Path) -> Path:
    for it in (100, 200):
        (path / f"iter_{it:07d}").mkdir(parents=True)
        (path / f"iter_{it:07d}" / "genlip.json").write_text("{}")
    (path / "latest").write_text("iter_0000200\n")
    return path


def test_from_hf_refuses_an_existing_save_dir(export, tmp_path, capsys):
    save = _training_save_dir(tmp_path / "run" / "checkpoints")
    assert convert.main(["from-hf", "--hf", str(export[0]), "--out", str(save)]) == 2
    err = _one_line(capsys)
    assert f"--out {save} holds checkpoints (latest -> iter_0000200, iter_0000100, iter_0000200)" in err
    assert "--overwrite" in err
    assert (save / "latest").read_text() == "iter_0000200\n"
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000100", "iter_0000200", "latest"]


def test_from_hf_overwrite_says_what_it_replaces_and_round_trips(export, tmp_path, capsys, mcore_world):
    """--overwrite replaces the save dir's checkpoints with the converted weights (and says so); the result exports
    back (to-hf, one process, through inference.load_for_inference) to the same tensors, tokenizer included."""
    save = _training_save_dir(tmp_path / "checkpoints")
    capsys.readouterr()
    assert convert.main(["from-hf", "--hf", str(export[0]), "--out", str(save), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite: replacing 3 entries of" in out and "latest -> iter_0000200" in out, out
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000000", "latest"]
    assert (save / "latest").read_text().strip() == "iter_0000000"
    meta = json.loads((save / "iter_0000000" / "genlip.json").read_text())
    assert meta["weights_only"] and (save / "iter_0000000" / meta["tokenizer"] / "tokenizer.model").is_file()

    assert convert.main(["to-hf", "--checkpoint", str(save), "--out", str(tmp_path / "back"), "--dtype", "fp32"]) == 0
    back, sd = load_hf_tensors(tmp_path / "back"), export[1]
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (export[0] / "tokenizer.model").read_bytes()


# ------------------------------------------------------------------------------------------------------------------
# genlip-caption --shards: what is dropped is counted, by reason
# ------------------------------------------------------------------------------------------------------------------
def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path: Path, samples: dict) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_caption_shards_counts_what_it_drops(export, tmp_path, capsys):
    _shard(tmp_path / "a.tar", {
        "good0": {"png": _png((200, 20, 20)), "txt": b"a red square"},
        "noimage": {"txt": b"a caption without its image"},
        "badjson": {"png": _png((20, 200, 20)), "json": b"{not json"},
        "junkimage": {"jpg": b"\xff\xd8 not a jpeg at all", "txt": b"two yellow stripes"},
    })
    _shard(tmp_path / "b.tar", {"good1": {"png": _png((20, 20, 200)), "txt": b"a blue field"},
                                "nocaption": {"png": _png((9, 9, 9))}})
    pattern = str(tmp_path / "*.tar")
    capsys.readouterr()
    assert caption.main(["--hf", str(export[0]), "--device", "cpu", "--shards", pattern, "--max-new-tokens", "3"]) == 0
    res = capsys.readouterr()
    dropped = "4 dropped: malformed_json 1, missing_caption 1, missing_image 1, undecodable_image 1"
    assert f"of 2 held-out images ({dropped})" in res.out, res.out
    assert res.err.strip() == f"genlip-caption: {pattern}: {dropped} (not in the exact-match rate)"


def test_caption_shards_limit_spans_shards(export, tmp_path):
    from collections import Counter

    for s in range(3):
        _shard(tmp_path / f"s{s}.tar", {f"k{s}{i}": {"png": _png((9 * i, 50, 50)), "txt": b"x"} for i in range(2)})
    model, tok, image_cfg, prompt = caption.load_captioner(hf=export[0], device="cpu")
    skipped = Counter()
    rows = caption.caption_shards(model, tok, image_cfg, str(tmp_path / "*.tar"), prompt, 2, 8, limit=3,
                                  skipped=skipped)
    assert [r["key"] for r in rows] == ["k00", "k01", "k10"] and not skipped


def test_caption_shards_without_a_match_is_one_line(export, tmp_path, capsys):
    assert caption.main(["--hf", str(export[0]), "--device", "cpu", "--shards", str(tmp_path / "none-*.tar")]) == 2
    assert _one_line(capsys) == f"genlip-caption: --shards {tmp_path / 'none-*.tar'}: no shard file matches"


# ------------------------------------------------------------------------------------------------------------------
# One tokenizer copy for checkpoints (ckpt.publish) and exports (save_hf)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("hftok")
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"]))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text("{}")
    return out


def test_copy_tokenizer_sentencepiece_file_with_its_companions(tmp_path):
    model = train_sentencepiece(TEXTS, tmp_path / "src", vocab_size=300)
    got = copy_tokenizer(model, tmp_path / "dest")
    assert got == tmp_path / "dest" / "tokenizer.model"
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert load_tokenizer(tokenizer_kind(got), got).encode("a red square") == \
        load_tokenizer("sentencepiece", model).encode("a red square")


def test_copy_tokenizer_model_of_another_name_never_takes_its_neighbour(tmp_path):
    """spm.model beside an unrelated tokenizer.model: the copy is spm.model, under the standard name."""
    model = train_sentencepiece(TEXTS, tmp_path / "src", vocab_size=300)
    spm = tmp_path / "src" / "spm.model"
    model.rename(spm)
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"another model")
    got = copy_tokenizer(spm, tmp_path / "dest")
    assert got.name == "tokenizer.model" and got.read_bytes() == spm.read_bytes()
    assert tokenizer_kind(tmp_path / "dest") == "sentencepiece"
    out = save_hf(tmp_path / "hf", {}, hf_config(C.Config()), tokenizer=spm)        # the export takes the same copy
    assert (out / "tokenizer.model").read_bytes() == spm.read_bytes()


def test_copy_tokenizer_hf_folder(hf_tok_dir, tmp_path):
    got = copy_tokenizer(hf_tok_dir, tmp_path / "dest")
    assert got == tmp_path / "dest"
    assert sorted(p.name for p in got.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(tokenizer_kind(got), got)
    assert tok.encode("a red square") == load_tokenizer("hf", hf_tok_dir).encode("a red square")


def test_copy_tokenizer_refuses_what_is_not_one(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        copy_tokenizer(tmp_path / "empty", tmp_path / "dest")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        copy_tokenizer(tmp_path / "gone.model", tmp_path / "dest")


def test_key_map_uses_every_hf_tensor(export):
    from genlip_mcore.hf.keymap import hf_to_megatron

    sd = dict(export[1])
    assert len(hf_to_megatron(sd, 2, 4, True)) == len(sd) - 2 * 6     # per layer: q, k, v and gate, up fuse
    with pytest.raises(KeyError, match="have no place in a 1-layer model"):
        hf_to_megatron(sd, 1, 4, True)
    sd.pop("ln_post.bias")
    with pytest.raises(KeyError, match="ln_post.bias is missing"):
        hf_to_megatron(sd, 2, 4, True)


@pytest.mark.parametrize("cli", ["caption", "to-hf"])
def test_checkpoint_readers_refuse_what_is_not_a_checkpoint_in_one_line(export, tmp_path, capsys, cli):
    """Both inference readers go through inference.load_for_inference; an HF export given as a checkpoint is
    pointed at from-hf, and an empty dir named, each in one line."""
    for path, want in ((export[0], "genlip-convert from-hf"), (tmp_path, "is neither a checkpoint")):
        if cli == "caption":
            rc = caption.main(["--checkpoint", str(path), "--device", "cpu", str(tmp_path / "img.png")])
        else:
            rc = convert.main(["to-hf", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
        err = _one_line(capsys)
        assert rc == 2 and str(path) in err and want in err, err
