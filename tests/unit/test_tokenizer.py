"""genlip_mcore.data.tokenizer: a SentencePiece model trained here, and an HF tokenizer.json built here (no network)."""

import json

import pytest

from genlip_mcore.config import ConfigError
from genlip_mcore.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

CAPTIONS = [
    "A brown dog runs across a green field.",
    "Two people ride bicycles along a river at sunset.",
    "A bowl of fresh fruit on a wooden kitchen table.",
    "A red car parked next to a tall white building.",
    "A cat sleeps on a blue sofa near the window.",
] * 10
UNICODE = ["Crème brûlée à Noël, ÆØÅ", "一只猫坐在垫子上", "emoji 🐱🚲🌅 and ZWJ 👩‍💻", "tab\tnew\nline"]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    train_sentencepiece(iter(CAPTIONS), out, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE like Qwen's, with <|im_end|> as an added special token."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CAPTIONS, trainer)
    out = tmp_path_factory.mktemp("hf")
    tok.save(str(out / "tokenizer.json"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------------------------
def test_sp_training_writes_model_and_config(sp_dir):
    tok = load_tokenizer("sentencepiece", sp_dir, None)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    meta = json.loads((sp_dir / "tokenizer_config.json").read_text())
    assert meta["kind"] == "sentencepiece" and meta["model_file"] == "tokenizer.model"
    assert (meta["pad_id"], meta["unk_id"], meta["bos_id"], meta["eos_id"]) == (0, 1, 2, 3)
    assert meta["end_ids"] == tok.end_ids == [3]
    assert meta["vocab_size"] == tok.vocab_size
    assert 4 + 256 < tok.vocab_size <= 400   # specials + byte pieces + merges; the limit is an upper bound


@pytest.mark.parametrize("text", CAPTIONS[:5] + UNICODE)
def test_sp_round_trip_without_unk(sp_dir, text):
    tok = load_tokenizer("sentencepiece", sp_dir / "tokenizer.model", None)
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert 1 not in ids and 0 not in ids      # never <unk> (byte fallback), never the pad/image dummy id
    assert 3 not in ids                       # no special tokens added
    assert tok.decode(ids) == text            # identity normalisation: lossless


def test_sp_common_words_are_pieces(sp_dir):
    tok = load_tokenizer("sentencepiece", sp_dir, None)
    assert len(tok.encode("A brown dog")) <= 4   # learned merges, not bytes


def test_sp_end_text_override(sp_dir):
    tok = SentencePieceTokenizer(sp_dir / "tokenizer.model", end_text=" end")
    assert tok.end_ids == tok.encode(" end") and 3 not in tok.end_ids


# ---------------------------------------------------------------------------------------------------------------
# HF tokenizer.json
# ---------------------------------------------------------------------------------------------------------------
def test_hf_end_ids_are_im_end_and_newline(hf_dir):
    from tokenizers import Tokenizer as HF

    raw = HF.from_file(str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer("hf", hf_dir, None)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    # spec §6.3: encode("<|im_end|>\n") = [id(<|im_end|>), id("\n")] (151645, 198 with Qwen3)
    assert tok.end_ids == [raw.token_to_id("<|im_end|>"), raw.token_to_id("Ċ")]
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)


@pytest.mark.parametrize("text", CAPTIONS[:3] + UNICODE)
def test_hf_round_trip(hf_dir, text):
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(tok.end_ids[:1]) & set(ids)   # no special tokens added


def test_hf_decode_keeps_special_tokens(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.decode(tok.encode("a dog") + tok.end_ids) == "a dog<|im_end|>\n"


def test_hf_without_im_end_needs_an_end_text(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    raw = HF(models.WordLevel({"[UNK]": 0, "a": 1, "stop": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="im_end"):
        HFTokenizer(tmp_path)
    assert load_tokenizer("hf", tmp_path, "stop").end_ids == [2]


# ---------------------------------------------------------------------------------------------------------------
# load_tokenizer errors name the config field
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_kind(sp_dir):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer_kind"):
        load_tokenizer("bpe", sp_dir, None)


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_missing_file(tmp_path, kind):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer_path"):
        load_tokenizer(kind, tmp_path, None)          # a directory without the model file
    with pytest.raises(ConfigError, match=r"^data\.tokenizer_path"):
        load_tokenizer(kind, tmp_path / "nope.model", None)
    with pytest.raises(ConfigError, match=r"^data\.tokenizer_path"):
        load_tokenizer(kind, "", None)
