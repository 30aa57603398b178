"""Shard patterns -> shard files, with an account of what a pattern named but did not find.

A pattern is a path, a glob (`**` reaches into subfolders) or a brace pattern (`/d/{00000..00999}.tar`), and a
brace member may itself be a glob. A brace pattern names its shards one by one, so a member that matches nothing is
a missing shard: a deleted or never-copied file that a plain expansion would drop without a word. The preflight
reports those (or warns under `data.allow_missing_shards`); readers just take `expand_shards`.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

GLOB_CHARS = "*?["


@dataclass
class Expansion:
    pattern: str
    files: list[str]          # existing files, sorted within each member, de-duplicated, in member order
    members: int              # brace members (1 for a pattern without braces)
    missing: list[str]        # members that matched no file

    def describe_missing(self, limit: int = 5) -> str:
        """"3 of 10 shards of '/d/{0..9}.tar' are missing: /d/3.tar, /d/5.tar, /d/7.tar"."""
        shown = ", ".join(self.missing[:limit])
        more = f" and {len(self.missing) - limit} more" if len(self.missing) > limit else ""
        return f"{len(self.missing)} of {self.members} shards of {self.pattern!r} are missing: {shown}{more}"


def _member_files(member: str) -> list[str]:
    if any(c in member for c in GLOB_CHARS):
        return sorted(f for f in glob.glob(member, recursive=True) if Path(f).is_file())
    return [member] if Path(member).is_file() else []


def expand(pattern: str) -> Expansion:
    from braceexpand import braceexpand

    files: list[str] = []
    missing: list[str] = []
    members = list(braceexpand(pattern))
    for member in members:
        found = _member_files(member)
        files += found
        if not found:
            missing.append(member)
    return Expansion(pattern, list(dict.fromkeys(files)), len(members), missing)


def expand_shards(pattern: str) -> list[str]:
    """The existing shard files of one pattern (missing brace members are left out)."""
    return expand(pattern).files
