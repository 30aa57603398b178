"""genlip_mcore.data.sample: record parsing (every skip reason), the §6.3 layout and labels, §4.1/§4.5 positions."""

import json

import pytest
import torch

from genlip_mcore.data.batch import IGNORE_INDEX as IG
from genlip_mcore.data.errors import SkipSample
from genlip_mcore.data.sample import IMAGE_ID, LayoutConfig, build_layout, parse_record, sample_positions


class Words:
    """One id per whitespace-separated word (ids from 10 on, in order of first sight); end ids [2, 3]."""
    name, vocab_size, end_ids = "words", 1000, [2, 3]

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv.get(i, "?") for i in ids)


def js(obj) -> bytes:
    return json.dumps(obj).encode()


# ---------------------------------------------------------------------------------------------------------------
# Positions (spec §4.1, worked example §4.5)
# ---------------------------------------------------------------------------------------------------------------
def test_worked_example_positions():
    pos = sample_positions((2, 3), 4)
    assert pos.dtype == torch.long and pos.shape == (3, 10)
    assert pos.tolist() == [[0, 0, 0, 0, 0, 0, 3, 4, 5, 6],    # t
                            [0, 0, 0, 1, 1, 1, 3, 4, 5, 6],    # h
                            [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]    # w


def test_positions_tall_image():
    pos = sample_positions((3, 1), 2)
    assert pos.tolist() == [[0, 0, 0, 3, 4], [0, 1, 2, 3, 4], [0, 0, 0, 3, 4]]


# ---------------------------------------------------------------------------------------------------------------
# Layout and labels (spec §6.3)
# ---------------------------------------------------------------------------------------------------------------
def test_caption_layout():
    tok = Words()
    lay = build_layout((2, 3), [("assistant", "  a small dog  ")], tok, LayoutConfig())
    prompt = tok.encode("Describe the image in detail.")
    cap = tok.encode("a small dog")
    assert lay.n_img == 6 and lay.n_txt == len(prompt) + 3 + 2 and not lay.truncated
    assert lay.tokens == [IMAGE_ID] * 6 + prompt + cap + [2, 3]
    assert lay.labels == [IG] * (6 + len(prompt)) + cap + [2, 3]   # unshifted: own ids on caption and end
    assert lay.positions.tolist() == sample_positions((2, 3), lay.n_txt).tolist()
    assert lay.positions.shape == (3, len(lay.tokens))


def test_custom_prompt():
    tok = Words()
    lay = build_layout((1, 1), [("assistant", "x")], tok, LayoutConfig(prompt="  what is it?  "))
    assert lay.tokens == [IMAGE_ID, 10, 11, 12, 13, 2, 3] and lay.labels == [IG] * 4 + [13, 2, 3]


def test_multi_turn_labels():
    tok = Words()
    turns = [("user", "q1 q1b"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2 a2b")]
    lay = build_layout((1, 2), turns, tok, LayoutConfig())
    q1, a1, q2, a2 = (tok.encode(t) for _, t in turns)
    assert lay.tokens == [0, 0] + q1 + a1 + q2 + a2 + [2, 3]         # no role markers, one end pair at the end
    assert lay.labels == [IG, IG] + [IG] * 2 + a1 + [IG] + a2 + [2, 3]


def test_empty_user_turn_means_no_prompt():
    tok = Words()
    lay = build_layout((1, 1), [("user", ""), ("assistant", "cap")], tok, LayoutConfig())
    assert lay.tokens == [0, 10, 2, 3] and lay.labels == [IG, 10, 2, 3]


def test_no_caption_tokens_is_skipped():
    with pytest.raises(SkipSample) as e:
        build_layout((1, 1), [("user", "q"), ("assistant", "   ")], Words(), LayoutConfig())
    assert e.value.reason == "empty_caption"


def test_caption_truncation_keeps_end():
    tok = Words()
    lay = build_layout((1, 1), [("user", "p"), ("assistant", "c1 c2 c3 c4")], tok, LayoutConfig(max_caption_tokens=2))
    assert lay.truncated and lay.tokens == [0, 10, 11, 12, 2, 3] and lay.labels == [IG, IG, 11, 12, 2, 3]
    full = build_layout((1, 1), [("user", "p"), ("assistant", "c1 c2")], tok, LayoutConfig(max_caption_tokens=2))
    assert not full.truncated and full.tokens == lay.tokens


def test_caption_truncation_counts_all_answers():
    tok = Words()
    turns = [("user", "q1"), ("assistant", "a b"), ("user", "q2"), ("assistant", "c d")]
    lay = build_layout((1, 1), turns, tok, LayoutConfig(max_caption_tokens=3))
    assert [tok.decode([t]) for t in lay.tokens[1:-2]] == ["q1", "a", "b", "q2", "c"]
    assert lay.labels[-2:] == [2, 3]
    # a cut that lands in a question drops the partial question: the end ids follow the last answer token
    lay = build_layout((1, 1), turns, tok, LayoutConfig(max_sample_len=1 + 4 + 2))
    assert lay.truncated and [tok.decode([t]) for t in lay.tokens[1:-2]] == ["q1", "a", "b"]


def test_sample_cap_truncates_text_keeps_end():
    tok = Words()
    cfg = LayoutConfig(prompt="p", max_sample_len=4 + 1 + 2 + 2)    # 2x2 image, prompt, 2 caption tokens, end
    lay = build_layout((2, 2), [("assistant", "c1 c2 c3 c4")], tok, cfg)
    assert len(lay.tokens) == 9 and lay.truncated
    assert lay.tokens[4:] == [10, 11, 12, 2, 3] and lay.labels[4:] == [IG, 11, 12, 2, 3]
    assert lay.positions.shape == (3, 9) and lay.positions[0, -1].item() == 2 + 4


def test_sample_cap_exact_fit_is_not_truncated():
    cfg = LayoutConfig(prompt="p", max_sample_len=4 + 1 + 2 + 2)
    assert not build_layout((2, 2), [("assistant", "c1 c2")], Words(), cfg).truncated


def test_too_long():
    cfg = LayoutConfig(prompt="p q", max_sample_len=4 + 2 + 2 + 1)   # room for exactly one caption token
    lay = build_layout((2, 2), [("assistant", "c1 c2")], Words(), cfg)
    assert lay.labels[-3:] == [12, 2, 3] and len(lay.tokens) == 9
    for max_len in (8, 4, 1):   # image + prompt + end fit but no caption token / the image alone does not fit
        with pytest.raises(SkipSample) as e:
            build_layout((2, 2), [("assistant", "c1 c2")], Words(),
                         LayoutConfig(prompt="p q", max_sample_len=max_len))
        assert e.value.reason == "too_long"


def test_bad_layout_config():
    with pytest.raises(ValueError):
        LayoutConfig(max_caption_tokens=0)
    with pytest.raises(ValueError):
        LayoutConfig(max_sample_len=0)


def test_with_trained_sentencepiece(tmp_path):
    from genlip_mcore.data.tokenizer import load_tokenizer, train_sentencepiece

    caps = ["A cat sitting on a red mat.", "Two dogs playing in the snow.", "Un café très chaud ☕"] * 10
    train_sentencepiece(caps, tmp_path, vocab_size=350)
    tok = load_tokenizer("sentencepiece", tmp_path, None)
    turns = parse_record({"json": js({"caption": " Un café très chaud ☕ "}), "jpg": b"..."}, stage=1)
    lay = build_layout((14, 14), turns, tok, LayoutConfig())
    labelled = [t for t in lay.labels if t != IG]
    assert labelled[-1:] == tok.end_ids == [3]
    assert tok.decode(labelled[:-1]) == "Un café très chaud ☕"
    # parts are tokenized apart: SentencePiece's dummy prefix starts the caption as a new word
    assert tok.decode(lay.tokens[196:]) == "Describe the image in detail. Un café très chaud ☕"
    assert lay.positions[:, 196].tolist() == [14, 14, 14]


# ---------------------------------------------------------------------------------------------------------------
# Records -> turns
# ---------------------------------------------------------------------------------------------------------------
def test_stage1_json_and_txt():
    assert parse_record({"json": js({"caption": " a dog\n"}), "jpg": b""}, 1) == [("assistant", "a dog")]
    assert parse_record({"txt": "a cat".encode(), "jpg": b""}, 1) == [("assistant", "a cat")]
    # img2dataset-style: metadata json without a caption, caption in txt
    assert parse_record({"json": js({"url": "x", "width": 3}), "txt": b"a cow"}, 1) == [("assistant", "a cow")]
    # json wins over txt
    assert parse_record({"json": js({"caption": "j"}), "txt": b"t"}, 2) == [("assistant", "j")]


def test_stage2_conversations():
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": " A dog. "},
            {"from": "user", "value": "Colour?"}, {"from": "assistant", "value": "Brown."},
            {"from": "human", "value": "unanswered"}]
    want = [("user", "What is shown?"), ("assistant", "A dog."), ("user", "Colour?"), ("assistant", "Brown.")]
    assert parse_record({"json": js({"conversations": conv})}, 2) == want
    assert parse_record({"json": js({"conversation": conv})}, 2) == want          # the README's key
    roles = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "cap"}]
    assert parse_record({"json": js({"conversations": roles})}, 2) == [("user", ""), ("assistant", "cap")]
    assert parse_record({"json": js({"caption": "c"})}, 2) == [("assistant", "c")]
    # stage 1 reads only captions
    assert parse_record({"json": js({"conversations": conv}), "txt": b"t"}, 1) == [("assistant", "t")]


def test_bad_stage():
    with pytest.raises(ValueError):
        parse_record({"txt": b"a"}, 3)


BAD = [
    ("missing_caption", {"jpg": b"x"}, 1),
    ("missing_caption", {"json": js({"url": "x"})}, 1),
    ("missing_caption", {"json": js({"conversations": [{"from": "human", "value": "hi"}]})}, 2),
    ("missing_caption", {"json": js({"conversations": []})}, 2),
    ("missing_caption", {"json": js({"conversations": [{"from": "gpt", "value": "c"}]})}, 1),
    ("bad_caption_encoding", {"txt": b"caf\xe9"}, 1),
    ("bad_caption_encoding", {"json": b'{"caption": "caf\xe9"}'}, 2),
    ("malformed_json", {"json": b'{"caption": '}, 1),
    ("malformed_json", {"json": js(["a dog"])}, 1),
    ("malformed_json", {"json": js({"caption": 3})}, 1),
    ("malformed_json", {"json": js({"conversations": "a dog"})}, 2),
    ("malformed_json", {"json": js({"conversations": ["a dog"]})}, 2),
    ("malformed_json", {"json": js({"conversations": [{"from": "system", "value": "s"}]})}, 2),
    ("malformed_json", {"json": js({"conversations": [{"from": "gpt", "value": None}]})}, 2),
    ("empty_caption", {"json": js({"caption": " \n\t"})}, 1),
    ("empty_caption", {"txt": b"   "}, 2),
    ("empty_caption", {"json": js({"conversations": [{"from": "human", "value": "q"},
                                                     {"from": "gpt", "value": "  "}]})}, 2),
]


@pytest.mark.parametrize("reason,record,stage", BAD, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_parse_errors(reason, record, stage):
    with pytest.raises(SkipSample) as e:
        parse_record(record, stage)
    assert e.value.reason == reason
