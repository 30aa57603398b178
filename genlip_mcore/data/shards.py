"""Reading webdataset shards with an exact, cheap resume position.

A shard is a tar whose consecutive members sharing a key form a sample (`abc.jpg`, `abc.json` -> sample `abc`),
the webdataset convention. We scan each shard's tar headers once (no payload read) into an index of members and
byte offsets, then read samples by seeking. That makes the read position a few integers:

- epoch e of source s: shards are permuted with a seed per (s, e) and dealt round-robin to the S = DP x workers
  reader slots, so every shard of an epoch goes to exactly one slot;
- within a slot, the samples of `shuffle_shards` consecutive shards form a window, permuted with a seed per
  (s, e, slot, window): the sample shuffle;
- the position is (epoch, window, offset in window) per source, plus the draw counter of the source mixer.

Restoring re-indexes one window (header scan only) and continues at the exact sample. A shard that cannot be
opened, or that ends inside a member, is counted (`unreadable_shard`, `truncated_tar`) and the rest is read.
Why not webdataset's own iterators: their pipeline (shardshuffle, shuffle buffer, workers) has no resumable state.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import numpy as np


@dataclass
class SampleRef:
    """Where a sample's members live: enough to read it again (for resume of the packer's buffer)."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]]          # extension -> (data offset, size)
    epoch: int = 0                               # the pass over the data this draw belongs to


@dataclass
class RawSample:
    key: str
    data: dict[str, bytes]                       # extension without the dot -> payload
    ref: SampleRef
    source: int
    epoch: int


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename; the rest is the extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def index_shard(path: str, skips: Counter) -> list[SampleRef]:
    """Scan tar headers only. Counts `unreadable_shard` (nothing readable) or `truncated_tar` (cut short)."""
    refs: list[SampleRef] = []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:          # member promised more bytes than exist
                    skips["truncated_tar"] += 1
                    return refs
                key, ext = split_key(info.name)
                if refs and refs[-1].key == key:
                    refs[-1].members[ext] = (info.offset_data, info.size)
                else:
                    refs.append(SampleRef(path, key, {ext: (info.offset_data, info.size)}))
            end = tar.offset
        # tarfile stops silently at a header cut short; a complete archive ends with two zero blocks.
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(2 * tarfile.BLOCKSIZE)
        if len(tail) < 2 * tarfile.BLOCKSIZE or any(tail):
            skips["truncated_tar"] += 1
    except (tarfile.ReadError, EOFError):
        skips["truncated_tar" if refs else "unreadable_shard"] += 1
    except OSError:
        skips["unreadable_shard"] += 1
    return refs


def read_sample(ref: SampleRef, handles: Optional[dict] = None) -> dict[str, bytes]:
    f = (handles or {}).get(ref.shard)
    if f is None:
        f = open(ref.shard, "rb")
        if handles is not None:
            handles.clear()                      # keep one shard open at a time per reader
            handles[ref.shard] = f
    out = {}
    for ext, (offset, size) in ref.members.items():
        f.seek(offset)
        out[ext] = f.read(size)
    if handles is None:
        f.close()
    return out


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


@dataclass
class SourceCursor:
    epoch: int = 0
    window: int = 0
    offset: int = 0


@dataclass
class SourceReader:
    """One source's samples for one reader slot, epoch after epoch."""

    shards: list[str]
    index: int                                   # source number (seeds differ per source)
    seed: int
    slot: int
    num_slots: int
    shuffle_shards: int
    cursor: SourceCursor = field(default_factory=SourceCursor)
    skips: Counter = field(default_factory=Counter)
    _window: Optional[tuple] = None              # (epoch, window, refs in shuffled order)
    _handles: dict = field(default_factory=dict)
    _yielded_in_epoch: bool = False

    def __post_init__(self):
        if len(self.shards) < self.num_slots:
            raise ValueError(f"data.sources[{self.index}]: {len(self.shards)} shards for {self.num_slots} reader "
                             f"slots (DP ranks x data.num_workers); every slot needs at least one shard")

    def my_shards(self, epoch: int) -> list[str]:
        order = _rng("shards", self.seed, self.index, epoch).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.slot::self.num_slots]]

    def _load_window(self, epoch: int, window: int) -> Optional[list[SampleRef]]:
        mine = self.my_shards(epoch)
        start = window * self.shuffle_shards
        if start >= len(mine):
            return None
        refs = [r for shard in mine[start:start + self.shuffle_shards] for r in index_shard(shard, self.skips)]
        order = _rng("samples", self.seed, self.index, epoch, self.slot, window).permutation(len(refs))
        return [refs[i] for i in order]

    def next(self) -> RawSample:
        while True:
            c = self.cursor
            if self._window is None or self._window[:2] != (c.epoch, c.window):
                refs = self._load_window(c.epoch, c.window)
                if refs is None:                 # this slot's epoch is done
                    if not self._yielded_in_epoch:   # a whole epoch with nothing readable: stop, don't spin
                        raise RuntimeError(f"data.sources[{self.index}]: no readable sample in this slot's shards "
                                           f"for a whole epoch; skipped {dict(self.skips)}")
                    self.cursor, self._yielded_in_epoch = SourceCursor(c.epoch + 1, 0, 0), False
                    continue
                self._window = (c.epoch, c.window, refs)
            refs = self._window[2]
            if c.offset >= len(refs):
                self.cursor = SourceCursor(c.epoch, c.window + 1, 0)
                continue
            ref = replace(refs[c.offset], epoch=c.epoch)
            self.cursor = SourceCursor(c.epoch, c.window, c.offset + 1)
            try:
                data = read_sample(ref, self._handles)
            except OSError:
                self.skips["unreadable_shard"] += 1
                continue
            self._yielded_in_epoch = True
            return RawSample(ref.key, data, ref, self.index, c.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.cursor.epoch, "window": self.cursor.window, "offset": self.cursor.offset,
                "skips": dict(self.skips)}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = SourceCursor(state["epoch"], state["window"], state["offset"])
        self.skips = Counter(state["skips"])
        self._window = None
        self._yielded_in_epoch = state["window"] > 0 or state["offset"] > 0


class MixedReader:
    """Several sources mixed by weight; the choice of source for draw k is a pure function of (seed, slot, k)."""

    BLOCK = 4096

    def __init__(self, sources: list[list[str]], weights: list[float], *, seed: int, slot: int, num_slots: int,
                 shuffle_shards: int):
        self.readers = [SourceReader(shards, i, seed, slot, num_slots, shuffle_shards)
                        for i, shards in enumerate(sources)]
        w = np.asarray(weights or [1.0] * len(sources), dtype=np.float64)
        self.cdf = np.cumsum(w / w.sum())
        self.seed, self.slot, self.draws = seed, slot, 0
        self._block = (-1, None)

    @property
    def skips(self) -> Counter:
        total = Counter()
        for r in self.readers:
            total.update(r.skips)
        return total

    def _source_for(self, k: int) -> int:
        if len(self.readers) == 1:
            return 0
        b = k // self.BLOCK
        if self._block[0] != b:
            self._block = (b, _rng("mix", self.seed, self.slot, b).random(self.BLOCK))
        return int(np.searchsorted(self.cdf, self._block[1][k % self.BLOCK], side="right").clip(
            max=len(self.readers) - 1))

    def __iter__(self) -> Iterator[RawSample]:
        return self

    def __next__(self) -> RawSample:
        source = self._source_for(self.draws)
        self.draws += 1
        return self.readers[source].next()

    def state_dict(self) -> dict:
        return {"draws": self.draws, "sources": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.readers):
            raise ValueError(f"data.sources: the saved loader state has {len(state['sources'])} sources, the config "
                             f"{len(self.readers)}; resume with the sources the run was started with")
        self.draws = state["draws"]
        for r, s in zip(self.readers, state["sources"], strict=True):
            r.load_state_dict(s)
