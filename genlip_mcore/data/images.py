"""Image preprocessing with Pillow: header checks, decode, resize, normalise, patchify (spec §6.4, §6.5).

Dimensions: h, w source image (rows, columns); H, W target size in pixels; p patch side; gh = H/p, gw = W/p the
patch grid; P = 3*p*p the length of one flattened patch.

Stage 1 resizes every image to image_size x image_size; stage 2 keeps the aspect ratio with `smart_resize`
(NaViT). Both use PIL bilinear (resample 2), rescale by 1/255 and normalise with mean 0.5 and std 0.5, so pixels
lie in [-1, 1]. `dali.DaliDecoder` follows the same contract; this module is the reference it is tested against.

Every bad image becomes a `SkipSample` with a named reason; nothing here raises anything else for bad data.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor

from genlip_mcore.data.errors import SkipSample

BILINEAR = Image.Resampling.BILINEAR  # == 2, the reference's `resample`
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class ImageConfig:
    stage: int = 1                       # 1: fixed image_size square; 2: NaViT smart_resize
    image_size: int = 224
    patch_size: int = 16
    min_pixels: int = 4096               # stage 2: at least 16 patches
    max_pixels: int = 262144             # stage 2: at most 1024 patches
    max_image_pixels: int = 89_478_485   # decompression-bomb limit on the *source* image (PIL's default)
    max_aspect_ratio: float = 200.0
    jpeg_draft: bool = False             # JPEG: decode at a reduced DCT scale before resizing (faster)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"image stage must be 1 or 2, got {self.stage}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


# ---------------------------------------------------------------------------------------------------------------
# Sizes


def smart_resize(h: int, w: int, factor: int = 16, min_pixels: int = 4096, max_pixels: int = 262144,
                 max_ratio: float = 200.0) -> tuple[int, int]:
    """NaViT target size (spec §6.5): sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    if min(h, w) <= 0:
        raise SkipSample("empty_image", f"{h}x{w}")
    if max(h, w) / min(h, w) > max_ratio:
        raise SkipSample("aspect_ratio", f"{h}x{w}")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor   # Python round: half to even, as the reference
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def target_size(h: int, w: int, cfg: ImageConfig) -> tuple[int, int]:
    """(H, W) in pixels for a source of h x w."""
    if cfg.stage == 1:
        return cfg.image_size, cfg.image_size
    return smart_resize(h, w, cfg.patch_size, cfg.min_pixels, cfg.max_pixels, cfg.max_aspect_ratio)


def grid(h: int, w: int, cfg: ImageConfig) -> tuple[int, int]:
    """(gh, gw) patches for a source of h x w."""
    H, W = target_size(h, w, cfg)
    return H // cfg.patch_size, W // cfg.patch_size


# ---------------------------------------------------------------------------------------------------------------
# Header checks (no pixel decode)


def open_header(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Parse the header only, and apply every check that needs no pixels."""
    if len(data) == 0:
        raise SkipSample("empty_image", "0 bytes")  # a zero-length member (failed download), not a corrupt file
    try:
        # PIL's own bomb check depends on a process-global limit, so it is only a second line of defence: its
        # warning is made an error here and both map to the same reason as our explicit check below.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_many_pixels", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct.error, ...: not a parseable image
        raise SkipSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    _check_size(im.height, im.width, cfg)
    return im


def _check_size(h: int, w: int, cfg: ImageConfig) -> None:
    if h <= 0 or w <= 0:  # PIL refuses zero-sided headers itself (undecodable_image); a guard, not a path
        raise SkipSample("empty_image", f"{h}x{w}")
    if h == 1 and w == 1:
        raise SkipSample("tiny_image", "1x1")  # the reference drops exactly these
    if h * w > cfg.max_image_pixels:
        raise SkipSample("too_many_pixels", f"{h}x{w} > {cfg.max_image_pixels}")
    if max(h, w) / min(h, w) > cfg.max_aspect_ratio:
        raise SkipSample("aspect_ratio", f"{h}x{w}")


def header_size(data: bytes, cfg: ImageConfig) -> tuple[int, int]:
    """(h, w) of an encoded image, read from its header; raises SkipSample for any image we would drop."""
    im = open_header(data, cfg)
    return im.height, im.width


# ---------------------------------------------------------------------------------------------------------------
# Decode


def _load(im: Image.Image) -> Image.Image:
    """Decode the pixels; a file cut short must fail, not come back padded with grey."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global switch someone else may have flipped: with it on, truncated files decode "successfully".
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would be trained on; "
                           "unset it")
    try:
        im.load()
    except Exception as e:  # the header parsed, so this is bad pixel data (usually a cut-short file)
        raise SkipSample("truncated_image", f"{type(e).__name__}: {e}") from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, as the reference's `convert` except where that loses the image."""
    if im.mode == "RGB":
        return im
    if im.mode in ("P", "PA"):
        # The reference goes P -> RGBA -> RGB (same colours as P -> RGB, but no warning for byte transparency).
        return im.convert("RGBA").convert("RGB")
    if im.mode in _SIXTEEN_BIT:
        # PIL's convert clips 16-bit values at 255 (nearly all white). Scale 0..65535 -> 0..255 instead, with the
        # rounding DALI's decoder uses (x / 257, nearest), so both decoders agree exactly on 16-bit PNGs.
        a = np.asarray(im).astype(np.float64)
        a = np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    return im.convert("RGB")  # RGBA/LA: alpha dropped (no compositing), CMYK, L, 1, YCbCr, ...


def to_tensor(rgb: Image.Image | np.ndarray) -> Tensor:
    """uint8 HWC RGB -> [3, H, W] float32, rescaled by 1/255 and normalised with mean 0.5, std 0.5."""
    x = torch.from_numpy(np.array(rgb, dtype=np.float32, copy=True)).permute(2, 0, 1).contiguous()
    return x.mul_(1 / 255).sub_(0.5).div_(0.5)


def decode_pil(data: bytes, cfg: ImageConfig, size: tuple[int, int] | None = None) -> Tensor:
    """Encoded image -> [3, H, W] float32 in [-1, 1]; `size` = (H, W), default `target_size`."""
    im = open_header(data, cfg)
    H, W = size if size is not None else target_size(im.height, im.width, cfg)
    if cfg.jpeg_draft and im.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale (never below the target), so less to decode and to resize;
        # the pixels differ slightly from the reference's full decode + bilinear resize.
        im.draft(im.mode, (W, H))
    im = _load(im)
    try:
        rgb = to_rgb(im)
    except Exception as e:  # a mode with no RGB conversion (e.g. LAB): as good as unreadable
        raise SkipSample("undecodable_image", f"{im.mode}: {e}") from None
    if rgb.size != (W, H):
        rgb = rgb.resize((W, H), resample=BILINEAR)  # PIL sizes are (width, height)
    return to_tensor(rgb)


# ---------------------------------------------------------------------------------------------------------------
# Patches


def patchify(pixels: Tensor, patch: int = 16) -> Tensor:
    """[3, H, W] -> [gh*gw, 3*p*p]: raster patch order, (c, i, j) inside a patch (spec §6.5).

    This is the layout for which the patch embedding's Linear weight is Conv2d.weight.reshape(D, 3*p*p).
    """
    c, H, W = pixels.shape
    if H % patch or W % patch:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {patch}")
    gh, gw = H // patch, W // patch
    x = pixels.reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4)   # (gh, gw, c, i, j)
    return x.reshape(gh * gw, c * patch * patch)
