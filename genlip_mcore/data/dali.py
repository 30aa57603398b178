"""Batched image decode + resize + normalise with NVIDIA DALI, with the output contract of `images.decode_pil`.

Dimensions: B items per call (<= max_batch per pipeline run); h, w source size; H, W target size per item.

`DaliDecoder.decode(datas, sizes)` -> one [3, H, W] float32 tensor in [-1, 1] per item, or the `SkipSample` that
explains why the item was dropped (returned, not raised, so one bad image never costs the batch). device="cpu"
runs DALI's CPU operators (libjpeg-turbo, works without a GPU); device="mixed" decodes JPEGs with nvJPEG and
returns CUDA tensors.

How the outputs are kept equal to Pillow's (tests/unit/test_dali.py measures the residual):
- `adjust_orientation=False`: DALI applies EXIF rotation by default; the reference (PIL) does not.
- `jpeg_fancy_upsampling=True` (mixed only): nvJPEG's default chroma upsampling differs from libjpeg-turbo's.
- resize: linear with antialias, i.e. a triangle filter widened on downscale, as PIL's BILINEAR; the result is
  rounded to uint8 before normalising, as PIL's resize output is.
- modes: DALI decodes palette (P, also with transparency), RGBA/LA (alpha dropped), L, 1-bit, and Adobe CMYK
  JPEGs to the same RGB as `images.to_rgb`. 16-bit PNGs are scaled x/257 to 8 bits (rounded), which is what
  `images.to_rgb` does too (PIL's own convert would clip at 255).
- formats DALI cannot decode (GIF, TGA, ICO, ...) and any item DALI fails on are decoded by `decode_pil`, whose
  verdict (an image, or a SkipSample with its reason) is final.

DALI is imported lazily so that this module imports without it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from genlip_mcore.data.errors import SkipSample
from genlip_mcore.data.images import ImageConfig, decode_pil, open_header, target_size

# Formats routed to DALI (PIL's format names). Everything else goes to Pillow: DALI rejects GIF outright, and
# TIFF/JPEG 2000 carry modes (float, 32-bit int) whose conversion we only define in `images.to_rgb`.
DALI_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})


class DaliDecoder:
    def __init__(self, cfg: ImageConfig, device: str = "cpu", num_threads: int = 2, device_id: int | None = None,
                 max_batch: int = 64):
        try:
            from nvidia.dali import fn, pipeline_def, types
        except ImportError as e:
            raise ImportError("data.decoder='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda120, or "
                              "-cuda130 on CUDA 13); install it or set data.decoder='pil'") from e
        if device not in ("cpu", "mixed"):
            raise ValueError(f"DALI decoder device must be 'cpu' or 'mixed', got {device!r}")
        if device == "mixed" and device_id is None:
            device_id = torch.cuda.current_device()
        self.cfg, self.device, self.device_id, self.max_batch = cfg, device, device_id, max_batch
        self._fn, self._types, self._pipeline_def = fn, types, pipeline_def
        self._num_threads = num_threads
        self.pil_fallbacks = 0  # items DALI failed on but Pillow decoded: should stay ~0, else something is off
        self._pipe = self._build()

    # -- pipeline -------------------------------------------------------------------------------------------------

    def _build(self):
        fn, types = self._fn, self._types
        # Synchronous, no prefetch: each decode() call feeds exactly one batch and waits for it. A DALI pipeline is
        # dead after any operator error, so _run_safe rebuilds it (about 10-20 ms on CPU).
        @self._pipeline_def(batch_size=self.max_batch, num_threads=self._num_threads, device_id=self.device_id,
                            exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            out_h = fn.external_source(name="out_h", dtype=types.FLOAT, ndim=0)   # per-sample H
            out_w = fn.external_source(name="out_w", dtype=types.FLOAT, ndim=0)   # per-sample W
            extra = {"jpeg_fancy_upsampling": True} if self.device == "mixed" else {}
            img = fn.decoders.image(encoded, device=self.device, output_type=types.RGB, adjust_orientation=False,
                                    **extra)
            img = fn.resize(img, resize_x=out_w, resize_y=out_h, interp_type=types.INTERP_LINEAR, antialias=True)
            # (x - 127.5) / 127.5 == (x / 255 - 0.5) / 0.5, in CHW like decode_pil
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[127.5] * 3, std=[127.5] * 3)

        p = pipe()
        p.build()
        return p

    def _run(self, datas: list[bytes], sizes: list[tuple[int, int]]) -> list[Tensor]:
        p = self._pipe
        p.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        p.feed_input("out_h", [np.float32(h) for h, _ in sizes])
        p.feed_input("out_w", [np.float32(w) for _, w in sizes])
        (out,) = p.run()
        if self.device == "cpu":
            return [torch.from_numpy(out.at(i)) for i in range(len(datas))]  # at() returns an owning copy
        return [self._to_torch_cuda(out[i]) for i in range(len(datas))]

    def _to_torch_cuda(self, t) -> Tensor:
        # The pipeline reuses its output buffers on the next run, so copy out (DALI's documented torch interop).
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dst = torch.empty(t.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device_id))
        return dst

    def _run_safe(self, datas, sizes) -> list[Tensor] | None:
        """One pipeline run; None (and a fresh pipeline) if DALI raised."""
        try:
            return self._run(datas, sizes)
        except Exception:
            self._pipe = self._build()
            return None

    # -- public ---------------------------------------------------------------------------------------------------

    def decode(self, datas: list[bytes], sizes: list[tuple[int, int]] | None = None) -> list[Tensor | SkipSample]:
        """Encoded images and target (H, W) per item (default `target_size`) -> tensor or SkipSample per item."""
        results: list[Tensor | SkipSample | None] = [None] * len(datas)
        todo = []  # indices for DALI
        targets = list(sizes) if sizes is not None else [None] * len(datas)
        for i, d in enumerate(datas):
            try:
                im = open_header(d, self.cfg)  # header checks first: DALI never sees an image we would drop anyway
            except SkipSample as e:
                results[i] = e
                continue
            targets[i] = targets[i] or target_size(im.height, im.width, self.cfg)
            if im.format == "JPEG" and _jpeg_cut_short(d):
                results[i] = SkipSample("truncated_image", "no JPEG end marker after the scan data")
            elif im.format in DALI_FORMATS:
                todo.append(i)
            else:
                results[i] = self._pil(d, targets[i])
        for s in range(0, len(todo), self.max_batch):
            chunk = todo[s:s + self.max_batch]
            decoded = self._decode_chunk([datas[i] for i in chunk], [targets[i] for i in chunk])
            for i, r in zip(chunk, decoded, strict=True):
                results[i] = r
        return results

    def _decode_chunk(self, datas, sizes) -> list[Tensor | SkipSample]:
        out = self._run_safe(datas, sizes)
        if out is not None:
            return out
        # Some item broke the batch: find it by decoding one at a time. Bad items are rare, so this costs one
        # batch decoded serially plus a pipeline rebuild per bad item.
        res = []
        for d, hw in zip(datas, sizes, strict=True):
            one = self._run_safe([d], [hw])
            if one is None:
                one = [self._pil(d, hw)]
                self.pil_fallbacks += torch.is_tensor(one[0])
            res.append(one[0])
        return res

    def _pil(self, data: bytes, hw: tuple[int, int]) -> Tensor | SkipSample:
        """Pillow's verdict for an item DALI does not (or could not) decode."""
        try:
            x = decode_pil(data, self.cfg, hw)
        except SkipSample as e:
            return e
        return x if self.device == "cpu" else x.to(f"cuda:{self.device_id}")


def _jpeg_cut_short(data: bytes) -> bool:
    """True if no EOI marker (FF D9) follows the first SOS marker (FF DA): the file was cut.

    Pillow rejects such files as truncated and libjpeg-turbo (DALI cpu) fails on them, but what nvJPEG does with a
    cut file is not something to rely on; this check gives both DALI backends Pillow's verdict without a failed
    run (and a pipeline rebuild). No false positives: a complete file's EOI ends its main image, after every
    earlier FF DA (entropy-coded data cannot hold FF D9: FF is byte-stuffed), and bytes appended after the EOI
    (camera trailers, motion photos) do not matter. It can miss a cut (an EXIF thumbnail's own EOI follows the
    first SOS); the decoder then decides.
    """
    sos = data.find(b"\xff\xda")
    return sos < 0 or data.find(b"\xff\xd9", sos) < 0
