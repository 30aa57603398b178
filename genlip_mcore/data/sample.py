"""One sample: its text turns (from a webdataset record), token layout and labels (spec §6.3), positions (§4.1).

Dimensions: n_img = gh*gw image patches, n_txt text tokens, L = n_img + n_txt.

Layout: [image: n_img x IMAGE_ID][user turn][assistant turn]...[end ids]. Each content is stripped and tokenized on
its own and the pieces are concatenated with no role markers; user turns (the prompt included) are unlabelled,
assistant turns and the end ids are labelled with their own ids. Labels are NOT shifted here (the packer does it).
A bare caption is the turn list [("assistant", caption)]; `build_layout` puts `LayoutConfig.prompt` in front of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from genlip_mcore.data.batch import IGNORE_INDEX
from genlip_mcore.data.errors import SkipSample
from genlip_mcore.data.tokenizer import Tokenizer

IMAGE_ID = 0   # dummy id at image positions: the model splices patch embeddings there (spec §6.3 rewrites -200 -> 0)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
Turns = list[tuple[str, str]]   # (role in {"user", "assistant"}, text)


@dataclass
class LayoutConfig:
    prompt: str = "Describe the image in detail."
    max_caption_tokens: int | None = None   # labelled (assistant) tokens kept; the end ids come on top
    max_sample_len: int | None = None       # image + text + end tokens of one sample

    def __post_init__(self):
        for name in ("max_caption_tokens", "max_sample_len"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")


@dataclass
class SampleLayout:
    tokens: list[int]     # [L]: IMAGE_ID on the image, then text ids
    labels: list[int]     # [L]: unshifted; IGNORE_INDEX on image and user turns, own id on assistant + end
    positions: Tensor     # [3, L] long (t, h, w)
    n_img: int
    n_txt: int
    truncated: bool = False   # text was cut by max_caption_tokens or max_sample_len


# ---------------------------------------------------------------------------------------------------------------
# Record -> turns
# ---------------------------------------------------------------------------------------------------------------
def _utf8(raw, member: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("bad_caption_encoding", f"{member}: {e}") from None


def _caption(text: str) -> Turns:
    if not text.strip():
        raise SkipSample("empty_caption")
    return [("assistant", text.strip())]


def _conversation(conv) -> Turns:
    """ShareGPT-style list of {"from"|"role": ..., "value"|"content": str}; `<image>` markers leave the user text
    (the image always goes first, spec §6.3)."""
    if not isinstance(conv, list):
        raise SkipSample("malformed_json", f"conversations is a {type(conv).__name__}, not a list")
    turns = []
    for turn in conv:
        t = turn if isinstance(turn, dict) else {}
        role, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
        role = ROLES.get(role) if isinstance(role, str) else None
        if role is None or not isinstance(text, str):
            raise SkipSample("malformed_json", f"bad conversation turn {str(turn)[:80]!r}")
        # an empty user turn (just "<image>") stays: it marks the conversation as having its own prompt (none),
        # so build_layout does not insert the caption prompt
        turns.append((role, (text.replace("<image>", "") if role == "user" else text).strip()))
    if not any(role == "assistant" for role, _ in turns):
        raise SkipSample("missing_caption", "conversation without an assistant turn")
    if not any(role == "assistant" and text for role, text in turns):
        raise SkipSample("empty_caption", "every assistant turn is blank")
    # trailing questions (and blank answers) are never trained on; dropping them puts the end ids right after the
    # last answer
    while turns[-1][0] == "user" or not turns[-1][1]:
        turns.pop()
    return turns


def parse_record(record: dict[str, bytes], stage: int) -> Turns:
    """A webdataset record's members (keys without the dot: "json", "txt", "jpg", ...) -> its text turns.

    Stage 1: json {"caption": str}. Stage 2: json "conversations" (or "conversation", the README's spelling, §11.10),
    else "caption". Both stages: a txt member is the caption when there is no json or the json has no usable key
    (img2dataset-style shards carry metadata json next to the txt caption).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if "json" in record:
        try:
            obj = json.loads(_utf8(record["json"], "json"))
        except json.JSONDecodeError as e:
            raise SkipSample("malformed_json", str(e)) from None
        if not isinstance(obj, dict):
            raise SkipSample("malformed_json", f"top level is a {type(obj).__name__}")
        for key in (("conversations", "conversation") if stage == 2 else ()) + ("caption",):
            value = obj.get(key)
            if value is None:
                continue
            if key != "caption":
                return _conversation(value)
            if not isinstance(value, str):
                raise SkipSample("malformed_json", f"caption is a {type(value).__name__}")
            return _caption(value)
    if "txt" in record:
        return _caption(_utf8(record["txt"], "txt"))
    raise SkipSample("missing_caption", "no caption in json" if "json" in record else "no json or txt member")


# ---------------------------------------------------------------------------------------------------------------
# Turns -> layout
# ---------------------------------------------------------------------------------------------------------------
def sample_positions(grid: tuple[int, int], n_txt: int) -> Tensor:
    """[3, gh*gw + n_txt] long: image (0, r, c) in raster order; text t = h = w = max(gh, gw) + j (spec §4.1)."""
    gh, gw = grid
    if gh < 1 or gw < 1:
        raise ValueError(f"image grid must be at least 1x1, got {grid}")
    k = torch.arange(gh * gw)
    image = torch.stack([torch.zeros_like(k), k // gw, k % gw])
    start = max(gh, gw)
    return torch.cat([image, torch.arange(start, start + n_txt).expand(3, -1)], 1)


def build_layout(grid: tuple[int, int], turns: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                 cfg: LayoutConfig) -> SampleLayout:
    n_img = grid[0] * grid[1]
    turns = list(turns)
    if turns and turns[0][0] == "assistant":   # a bare caption: the prompt is the (unlabelled) user turn
        turns.insert(0, ("user", cfg.prompt))
    text, labelled = [], []                    # [n_text] ids and their labelled flags, end ids excluded
    for role, content in turns:
        ids = tokenizer.encode(content.strip())
        text += ids
        labelled += [role == "assistant"] * len(ids)
    if not any(labelled):
        raise SkipSample("empty_caption", "no assistant tokens")
    end = list(tokenizer.end_ids)
    keep = len(text)
    if cfg.max_caption_tokens is not None:     # cut at the first labelled token over the limit (later turns go too)
        seen = 0
        for i, lab in enumerate(labelled):
            seen += lab
            if seen > cfg.max_caption_tokens:
                keep = i
                break
    if cfg.max_sample_len is not None:
        # Unlike the reference (which can cut the end pair, §6.3) the end ids always stay, so every sample
        # still teaches where a caption stops. Keep at least one caption token, else the sample says nothing.
        budget = cfg.max_sample_len - n_img - len(end)
        first = labelled.index(True)
        if budget < first + 1:
            raise SkipSample("too_long", f"{n_img} image + {first} prompt + {len(end)} end tokens "
                                         f"leave no caption token within {cfg.max_sample_len}")
        keep = min(keep, budget)
    truncated = keep < len(text)
    while truncated and not labelled[keep - 1]:   # a cut question: the end ids must follow an answer token
        keep -= 1
    text, labelled = text[:keep], labelled[:keep]
    tokens = [IMAGE_ID] * n_img + text + end
    labels = [IGNORE_INDEX] * n_img + [t if lab else IGNORE_INDEX for t, lab in zip(text, labelled, strict=True)] + end
    return SampleLayout(tokens=tokens, labels=labels, positions=sample_positions(grid, len(text) + len(end)),
                        n_img=n_img, n_txt=len(text) + len(end), truncated=truncated)
