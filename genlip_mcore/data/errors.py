"""Skipped samples: every reason a sample can be dropped has a name, and every drop is counted by it.

A `SkipSample` raised anywhere in the data path drops that sample (never the run); the loader counts it under
`reason` and the counts reach the training log. A configurable ceiling on the skip fraction stops a run whose
data is clearly wrong (see `loader.SkipBudget`).
"""

from __future__ import annotations

REASONS = (
    "missing_image",        # no jpg/jpeg/png/webp member
    "undecodable_image",    # not an image, or a corrupt header
    "truncated_image",      # header fine, pixel data cut short
    "empty_image",          # zero width or height
    "tiny_image",           # 1x1 (the reference drops these), or below the minimum side
    "too_many_pixels",      # over the decompression-bomb limit
    "aspect_ratio",         # max/min side over the limit (200 in the reference's smart_resize)
    "missing_caption",      # no json/txt, or a json without caption/conversations
    "empty_caption",        # caption present but blank after strip
    "bad_caption_encoding",  # not UTF-8
    "malformed_json",
    "too_long",             # image tokens alone exceed the sample or row limit
    "truncated_tar",        # a shard that ends inside a member: the rest of it is lost and counted
    "unreadable_shard",     # a shard that cannot be opened at all
)


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
