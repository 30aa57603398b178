"""The data pipeline as training runs it: shards -> samples -> packed rows -> micro-batch `Batch`es.

Dimensions: R = max_seq_len tokens per row, m = micro_batch_size rows per micro-batch, N_p patches, P patch values.

Stages, in order (one list, read top to bottom):
  worker process (one reader slot each):  read sample (shards.py) -> caption turns (sample.py)
      -> image header size -> grid (images.py) -> token layout and 3-axis positions (sample.py)
      -> pixels: decoded + patchified here with Pillow, or left as bytes for DALI
      -> greedy first-fit packing into rows of R tokens (packing.py)
  main process: m rows -> one THD stream (`Batch`); DALI decodes deferred images (on the GPU with "mixed").

Token counts come from the image *header*, so packing never waits for pixels, and DALI can decode a whole row
at once after packing. Every TP/PP rank of one data-parallel rank builds the same loader and reads the same rows.

Resume: each row carries its worker's state (reader position, the packer buffer as sample references, skip
counts). The loader keeps the state attached to the last row it handed out per worker, plus the row count; a
restored loader rotates its workers so the next row comes from the worker that was next.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Optional

import torch

from genlip_mcore.config import DataConfig
from genlip_mcore.data.batch import IGNORE_INDEX, Batch, concat
from genlip_mcore.data.errors import SkipSample
from genlip_mcore.data.packing import Packer, PackItem, row_to_batch
from genlip_mcore.data.shards import MixedReader, RawSample, SampleRef, read_sample
from genlip_mcore.data.sources import expand_shards

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DeferredImage:
    data: bytes
    size: tuple[int, int]          # target (H, W) in pixels, already decided from the header


class SampleProcessor:
    """RawSample -> PackItem, or SkipSample with a reason."""

    def __init__(self, d: DataConfig, patch_size: int):
        from genlip_mcore.data.images import ImageConfig
        from genlip_mcore.data.sample import LayoutConfig
        from genlip_mcore.data.tokenizer import load_tokenizer

        self.d, self.patch = d, patch_size
        self.image_cfg = ImageConfig(stage=d.stage, image_size=d.image_size, patch_size=patch_size,
                                     min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                                     max_image_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio,
                                     jpeg_draft=d.jpeg_draft)
        self.layout_cfg = LayoutConfig(prompt=d.prompt, max_caption_tokens=d.max_caption_tokens,
                                       max_sample_len=d.max_sample_len)
        self.tokenizer = load_tokenizer(d.tokenizer_kind, d.tokenizer_path, d.end_text)

    def __call__(self, data: dict[str, bytes], ref: Any = None) -> PackItem:
        from genlip_mcore.data.images import decode_pil, grid, header_size, patchify
        from genlip_mcore.data.sample import build_layout, parse_record

        image = next((data[e] for e in IMAGE_EXTS if e in data), None)
        if image is None:
            raise SkipSample("missing_image")
        turns = parse_record(data, self.d.stage)
        h, w = header_size(image, self.image_cfg)
        gh, gw = grid(h, w, self.image_cfg)
        layout = build_layout((gh, gw), turns, self.tokenizer, self.layout_cfg)
        if len(layout.tokens) > self.d.max_seq_len:
            raise SkipSample("too_long", f"{len(layout.tokens)} tokens > data.max_seq_len {self.d.max_seq_len}")
        size = (gh * self.patch, gw * self.patch)
        if self.d.decoder == "pil":
            pixels = patchify(decode_pil(image, self.image_cfg, size), self.patch)     # [gh*gw, P]
        else:
            pixels = DeferredImage(image, size)
        return PackItem(layout.tokens, layout.labels, layout.positions, layout.n_img, pixels, ref)


class SkipBudget:
    """Stops the run when more than `max_fraction` of a window of samples was bad: the data is clearly wrong."""

    def __init__(self, window: int, max_fraction: float):
        self.window, self.max_fraction = window, max_fraction
        self.recent: deque = deque(maxlen=window)

    def record(self, bad: bool, counts: Counter) -> None:
        self.recent.append(bad)
        if len(self.recent) == self.window and sum(self.recent) > self.max_fraction * self.window:
            raise RuntimeError(f"{sum(self.recent)} of the last {self.window} samples were skipped (limit "
                               f"data.max_skip_fraction={self.max_fraction}); skip reasons so far: {dict(counts)}")


class RowStream:
    """One reader slot: samples in, packed rows out, with a small resumable state."""

    def __init__(self, d: DataConfig, patch_size: int, *, seed: int, slot: int, num_slots: int):
        sources = [expand_shards(p) for p in d.sources]
        self.reader = MixedReader(sources, d.source_weights, seed=seed, slot=slot, num_slots=num_slots,
                                  shuffle_shards=d.shuffle_shards)
        self.process = SampleProcessor(d, patch_size)
        self.packer = Packer(d.max_seq_len, d.pack_buffer)
        self.budget = SkipBudget(d.skip_window, d.max_skip_fraction)
        self.skips: Counter = Counter()          # processing skips; reader skips live in the reader
        self.samples = 0                         # samples that made it into the packer

    def counts(self) -> Counter:
        return self.skips + self.reader.skips

    def _fill(self) -> None:
        while not self.packer.ready():
            before = sum(self.reader.skips.values())
            raw: RawSample = next(self.reader)
            for _ in range(sum(self.reader.skips.values()) - before):   # shard-level losses count as bad draws
                self.budget.record(True, self.counts())
            try:
                self.packer.add(self.process(raw.data, raw.ref))
                self.samples += 1
                self.budget.record(False, self.counts())
            except SkipSample as e:
                self.skips[e.reason] += 1
                self.budget.record(True, self.counts())

    def next_row(self) -> tuple[list[PackItem], dict]:
        self._fill()
        row = self.packer.pop_row()
        return row, self.state_dict()

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "buffer": [vars(i.ref) for i in self.packer.buffer],
                "skips": dict(self.counts()), "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.skips = Counter(state["skips"]) - self.reader.skips      # the reader restored its own share
        self.samples = state["samples"]
        self.packer.buffer = []
        handles: dict = {}
        lost: Counter = Counter()
        for saved in state["buffer"]:
            ref = SampleRef(**saved)
            try:
                self.packer.buffer.append(self.process(read_sample(ref, handles), ref))
                continue
            except OSError:              # its shard is gone or unreadable since the save: as during a run
                self.skips["unreadable_shard"] += 1
            except SkipSample as e:      # its shard was replaced: other bytes at the saved offsets
                self.skips[e.reason] += 1
            self.samples -= 1            # counted when it entered the packer; it never reaches a row now
            lost[ref.shard] += 1
        for f in handles.values():
            f.close()
        for shard, n in lost.items():
            log.warning(f"resume: {n} buffered samples of {shard} could not be read again; counted as skipped")


class PackedRows(torch.utils.data.IterableDataset):
    """Rows of one data-parallel rank; worker w serves local slot (w + rotation) % W."""

    def __init__(self, d: DataConfig, patch_size: int, *, seed: int, dp_rank: int, dp_size: int,
                 slot_states: Optional[dict] = None, rotation: int = 0):
        self.d, self.patch, self.seed = d, patch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.workers = max(1, d.num_workers)
        self.slot_states, self.rotation = slot_states or {}, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        local = ((info.id if info else 0) + self.rotation) % self.workers
        stream = RowStream(self.d, self.patch, seed=self.seed, slot=self.dp_rank * self.workers + local,
                           num_slots=self.dp_size * self.workers)
        if local in self.slot_states:
            stream.load_state_dict(self.slot_states[local])
        while True:
            row, state = stream.next_row()
            yield local, row_to_batch(row, self.d.max_seq_len), state


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    # A SIGKILLed trainer must not leave workers behind: they would block forever flushing into a result pipe
    # whose read end their siblings still hold. And a stop signal sent to the whole process group (slurm, torchrun)
    # must not kill them while the trainer finishes its step and saves.
    from genlip_mcore.procutil import serve_until_parent_dies

    serve_until_parent_dies()


class DataLoader:
    """Micro-batches of `micro_batch_size` rows for one data-parallel rank, resumable with state_dict()."""

    def __init__(self, d: DataConfig, *, patch_size: int, seed: int, dp_rank: int, dp_size: int,
                 micro_batch_size: int, state: Optional[dict] = None):
        self.d, self.patch, self.seed = d, patch_size, seed
        self.dp_rank, self.dp_size, self.mbs = dp_rank, dp_size, micro_batch_size
        self.workers = max(1, d.num_workers)
        state = state or {"rows": 0, "slots": {}, "late_skips": {}}
        self.rows = state["rows"]
        self.late_skips = Counter(state["late_skips"])     # images that failed in DALI after packing
        self.slot_states = {int(k): v for k, v in state["slots"].items()}
        rows = PackedRows(d, patch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
                          slot_states=self.slot_states, rotation=self.rows % self.workers)
        self._it = iter(torch.utils.data.DataLoader(
            rows, batch_size=None, num_workers=d.num_workers, collate_fn=_identity, worker_init_fn=_worker_init,
            persistent_workers=d.num_workers > 0, prefetch_factor=4 if d.num_workers > 0 else None))
        self._dali = None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        rows = []
        for _ in range(self.mbs):
            local, batch, st = next(self._it)
            self.slot_states[local] = st
            self.rows += 1
            rows.append(self._decode_deferred(batch))
        seed = zlib.crc32(f"{self.seed}/{self.dp_rank}/{self.rows}".encode())
        out = concat(rows, seed=seed)
        out.stats = self.stats()
        return out

    def stats(self) -> dict:
        skipped, samples = Counter(self.late_skips), 0
        for st in self.slot_states.values():
            skipped.update(st["skips"])
            samples += st["samples"]
        return {"samples": samples, "skipped": dict(skipped), "rows": self.rows}

    def state_dict(self) -> dict:
        return {"rows": self.rows, "slots": {str(k): v for k, v in self.slot_states.items()},
                "late_skips": dict(self.late_skips)}

    def _decode_deferred(self, batch: Batch) -> Batch:
        if torch.is_tensor(batch.patches):
            return batch
        from genlip_mcore.data.images import patchify

        if self._dali is None:
            from genlip_mcore.data.dali import DaliDecoder
            from genlip_mcore.data.images import ImageConfig

            d = self.d
            self._dali = DaliDecoder(ImageConfig(stage=d.stage, image_size=d.image_size, patch_size=self.patch,
                                                 min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                                                 max_image_pixels=d.max_image_pixels,
                                                 max_aspect_ratio=d.max_aspect_ratio), device=d.dali_device)
        images: list[DeferredImage] = batch.patches
        decoded = self._dali.decode([im.data for im in images], [im.size for im in images])
        # "mixed" decodes on the GPU: the patches stay there (Batch.to is then a no-op for them).
        device = next((o.device for o in decoded if torch.is_tensor(o)), torch.device("cpu"))
        patches, start = [], 0
        for i, out in enumerate(decoded):
            n = batch.img_lens[i]
            if isinstance(out, SkipSample):
                # Already packed: the sample keeps its slot but teaches nothing, and it is counted.
                patches.append(torch.zeros(n, 3 * self.patch ** 2, device=device))
                batch.targets[start:start + n + batch.txt_lens[i]] = IGNORE_INDEX
                self.late_skips[out.reason] += 1
            else:
                patches.append(patchify(out, self.patch).float())          # [n, P]
            start += n + batch.txt_lens[i]
        batch.patches = torch.cat(patches)
        return batch
