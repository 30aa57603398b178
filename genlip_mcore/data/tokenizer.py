"""Tokenizers: a SentencePiece model trained on the caption corpus, or an HF `tokenizer.json` (e.g. Qwen3's).

Both expose the same small interface. `encode` never adds special tokens: the sample layout (spec §6.3) decides
where every token goes, and the only special tokens in a sample are the end ids appended once at its very end.

Ids of a model trained by `train_sentencepiece` (written to its tokenizer_config.json as well):
    0 <pad>   never produced by encode; also the dummy id the model sees at image and row-padding positions,
              so a 0 in `tokens` can never be mistaken for text
    1 <unk>   never produced either: byte fallback spells any UTF-8 text as <0xNN> pieces instead
    2 <s>     unused by the layout (no BOS, as in the reference)
    3 </s>    the end id: appended to every sample and labelled (the Qwen3 vocabulary uses "<|im_end|>\\n")
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from genlip_mcore.config import ConfigError

QWEN_END_TEXT = "<|im_end|>\n"   # spec §6.3: encode("<|im_end|>\n") = [151645, 198] with the Qwen3 vocabulary
SP_SPECIAL = dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>",
                  eos_piece="</s>")
KINDS = ("sentencepiece", "hf")
# What a tokenizer folder may hold: the model (tokenizer.model or tokenizer.json), then the companions.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int            # ids are in [0, vocab_size); the model's vocab must be at least this
    end_ids: list[int]         # appended to every sample and labelled

    def encode(self, text: str) -> list[int]:
        """Text ids, no special tokens added (special-token strings inside `text` may still map to their ids)."""

    def decode(self, ids: Sequence[int]) -> str: ...


def _nonempty_end(end_ids: list[int], end_text) -> list[int]:
    # every sample's text must end with at least one labelled token (the packer relies on txt_len >= 1)
    if not end_ids:
        raise ValueError(f"tokenizer end text {end_text!r} encodes to no tokens")
    return end_ids


class SentencePieceTokenizer:
    def __init__(self, model_path: str | Path, end_text: str | None = None):
        import sentencepiece as spm

        self.name = f"sentencepiece:{model_path}"
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = int(self._sp.get_piece_size())
        if end_text is None:
            if self._sp.eos_id() < 0:
                raise ValueError(f"{model_path} has no eos piece; pass an end text")
            self.end_ids = [int(self._sp.eos_id())]
        else:   # plain text: SentencePiece does not match control pieces such as "</s>" inside text
            self.end_ids = _nonempty_end(self.encode(end_text), end_text)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    def __init__(self, path: str | Path, end_text: str = QWEN_END_TEXT):
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        self.name = f"hf:{file}"
        self._tok = _HF.from_file(str(file))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        # Added special tokens are matched inside the text even with add_special_tokens=False (that flag only
        # controls the post-processor template), so "<|im_end|>\n" -> [id(<|im_end|>), id("\n")] as in the reference.
        if end_text == QWEN_END_TEXT and self._tok.token_to_id("<|im_end|>") is None:
            raise ValueError(f"{file} has no <|im_end|> token; pass the end text this vocabulary uses")
        self.end_ids = _nonempty_end(self.encode(end_text), end_text)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        # keep special tokens visible: decode(encode(x)) == x, and a generated <|im_end|> shows where it stopped
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_kind(path: str | Path) -> str:
    """'sentencepiece' or 'hf', from the files: tokenizer.model / *.model vs tokenizer.json / *.json."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.model").is_file():
            return "sentencepiece"
        if (p / "tokenizer.json").is_file():
            return "hf"
        raise FileNotFoundError(f"{p} holds neither tokenizer.model nor tokenizer.json")
    return "hf" if p.suffix == ".json" else "sentencepiece"


def copy_tokenizer(src: str | Path, dest: str | Path) -> Path:
    """Copy a tokenizer into the folder `dest` (checkpoints and HF exports both carry one) under the standard
    names, so `tokenizer_kind(dest)` and `load_tokenizer(kind, dest)` find it. -> the path to load it from.

    src is a folder (its TOKENIZER_FILES are copied; -> dest), or a model file of any name (copied as
    tokenizer.model, or tokenizer.json for *.json, with the companion files beside it; -> that copy)."""
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        tokenizer_kind(src)                                 # refuses a folder without a tokenizer model
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
        return dest
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer {src} does not exist")
    main = dest / ("tokenizer.json" if tokenizer_kind(src) == "hf" else "tokenizer.model")
    shutil.copy2(src, main)
    for name in TOKENIZER_FILES[2:]:         # never a second model: a sibling tokenizer.model may be another one
        if (src.parent / name).is_file():
            shutil.copy2(src.parent / name, dest / name)
    return main


def load_tokenizer(kind: str, path: str | Path, end_text: str | None = None) -> Tokenizer:
    """`path` is the model file or a directory holding tokenizer.model (sentencepiece) / tokenizer.json (hf)."""
    if kind not in KINDS:
        raise ConfigError(f"data.tokenizer_kind: {kind!r} is not one of {KINDS}")
    if not path:
        raise ConfigError("data.tokenizer_path: not set")
    p = Path(path)
    file = p / ("tokenizer.model" if kind == "sentencepiece" else "tokenizer.json") if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"data.tokenizer_path: {file} does not exist (data.tokenizer_kind={kind!r})")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(file, end_text)
    return HFTokenizer(file, QWEN_END_TEXT if end_text is None else end_text)


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int, model_type: str = "bpe",
                        **options) -> Path:
    """Train on `texts` in memory; writes out_dir/tokenizer.model and tokenizer_config.json; returns the model path.

    `vocab_size` is an upper bound (hard_vocab_limit off, so tiny corpora still train); it includes the 4 special
    and 256 byte pieces. `options` go to SentencePieceTrainer.train and override the defaults below.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    args = dict(
        vocab_size=vocab_size, model_type=model_type, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0,   # rare characters become bytes, never <unk>
        # lossless: decode(encode(x)) == x; the layout strips each content itself
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        max_sentence_length=1 << 16,                  # stage-2 captions run to thousands of tokens
        minloglevel=2, **SP_SPECIAL)
    args.update(options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, **args)
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(path)
    sp = tok._sp
    meta = dict(kind="sentencepiece", model_file=path.name, model_type=model_type, vocab_size=tok.vocab_size,
                end_ids=tok.end_ids, pad_id=sp.pad_id(), unk_id=sp.unk_id(), bos_id=sp.bos_id(), eos_id=sp.eos_id())
    (out / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
