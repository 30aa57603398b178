"""Pillow image path (genlip_mcore/data/images.py) against spec §6.4/§6.5: sizes, patch layout, modes, bad files.

Dimensions: h, w source; H, W target; p patch; gh, gw grid; P = 3*p*p.
"""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from genlip_mcore.data.errors import SkipSample
from genlip_mcore.data.images import ImageConfig, decode_pil, grid, header_size, patchify, smart_resize, target_size

S1, S2 = ImageConfig(stage=1), ImageConfig(stage=2)
LSB = 2 / 255  # one 8-bit step after normalising to [-1, 1]


# -- helpers (also used by test_dali.py and tests/gpu/test_gpu_dali.py) --------------------------------------------

def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


def photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """Photo-like RGB content: smooth colour fields, hard edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a = np.stack([np.sin(6 * x + seed) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x * y * 4) % 1], -1) * 200
    a += ((x * 13).astype(int) % 2)[..., None] * 40
    a += rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def png_header(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h (the pixel data is not valid for that size)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def mode_images(h: int = 40, w: int = 60) -> dict[str, tuple[bytes, tuple[float, float, float]]]:
    """One encoded pure-colour image per PIL mode, with the RGB value (in [-1, 1]) it must decode to."""
    red = Image.new("RGB", (w, h), (255, 0, 0))
    n = lambda v: v / 255 * 2 - 1
    p = red.convert("P")
    p_trans = red.convert("P")
    idx = p_trans.getpixel((0, 0))
    rgba = Image.new("RGBA", (w, h), (255, 0, 0, 0))       # fully transparent red: alpha dropped, not composited
    la = Image.new("LA", (w, h), (200, 0))
    i16 = Image.fromarray(np.full((h, w), 51400, np.uint16))  # 51400 / 257 = 200
    return {
        "RGB": (encode(red, "PNG"), (1, -1, -1)),
        "P": (encode(p, "PNG"), (1, -1, -1)),
        "P_transparency": (encode(p_trans, "PNG", transparency=idx), (1, -1, -1)),
        "RGBA": (encode(rgba, "PNG"), (1, -1, -1)),
        "LA": (encode(la, "PNG"), (n(200),) * 3),
        "CMYK": (encode(Image.new("CMYK", (w, h), (0, 255, 255, 0)), "JPEG", quality=95), (1, -1, -1)),
        "L": (encode(Image.new("L", (w, h), 200), "PNG"), (n(200),) * 3),
        "I;16": (encode(i16, "PNG"), (n(200),) * 3),
        "1": (encode(Image.new("1", (w, h), 1), "PNG"), (1, 1, 1)),
        "RGB_jpeg": (encode(red, "JPEG", quality=95), (1, -1, -1)),
    }


# -- sizes -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, want", [((480, 640), (432, 576)), ((40, 40), (64, 64)), ((2000, 3000), (416, 624)),
                                      ((1000, 30), (992, 32)), ((224, 224), (224, 224)), ((512, 512), (512, 512))])
def test_smart_resize_spec_examples(hw, want):
    assert smart_resize(*hw) == want
    assert target_size(*hw, S2) == want
    assert target_size(*hw, S1) == (224, 224)


def test_grid_480x640_is_27x36():
    assert grid(480, 640, S2) == (27, 36)
    assert grid(480, 640, S1) == (14, 14)


def test_smart_resize_aspect_ratio():
    assert smart_resize(1000, 5) == (912, 16)              # exactly 200: allowed, and the min_pixels branch fixes h
    for hw in [(1, 300), (300, 1), (3000, 10)]:
        with pytest.raises(SkipSample) as e:
            smart_resize(*hw)
        assert e.value.reason == "aspect_ratio"


def test_smart_resize_bounds():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(2, 5000, (500, 2)):
        if max(h, w) / min(h, w) > 200:
            continue
        H, W = smart_resize(int(h), int(w))
        assert H % 16 == 0 and W % 16 == 0 and 16 <= H * W // 256 <= 1024, (h, w, H, W)


# -- patchify ----------------------------------------------------------------------------------------------------

def test_patchify_order_by_hand():
    p, H, W = 2, 4, 6
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(H), torch.arange(W), indexing="ij")
    img = (c * 10000 + y * 100 + x).float()                  # each value names its (c, y, x)
    out = patchify(img, p)
    assert out.shape == (6, 12)
    gw = W // p
    for k in range(6):
        r, q = divmod(k, gw)                                # raster order: row r, column q
        want = [ci * 10000 + (r * p + i) * 100 + (q * p + j) for ci in range(3) for i in range(p) for j in range(p)]
        assert out[k].tolist() == want
    assert out[1, :4].tolist() == [2, 3, 102, 103]          # second patch, channel 0: columns 2..3


def test_patchify_matches_conv2d_weight_reshape():
    torch.manual_seed(0)
    img = torch.randn(3, 48, 64, dtype=torch.float64)
    w = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(img[None], w, stride=16)[0]       # [D, gh, gw]
    conv = conv.flatten(1).T                                            # [gh*gw, D], raster order
    lin = patchify(img, 16) @ w.reshape(8, 768).T
    torch.testing.assert_close(lin, conv)


def test_patchify_rejects_non_multiple():
    with pytest.raises(ValueError):
        patchify(torch.zeros(3, 20, 32), 16)


# -- decode: modes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(mode_images()))
def test_decode_pil_modes(mode):
    data, rgb = mode_images()[mode]
    x = decode_pil(data, S1)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    tol = 0.04 if mode in ("CMYK", "RGB_jpeg") else 1e-6   # lossy JPEG of a flat colour
    torch.testing.assert_close(x.mean((1, 2)), torch.tensor(rgb, dtype=torch.float32), atol=tol, rtol=0)
    assert (x - torch.tensor(rgb)[:, None, None]).abs().max() <= max(tol, 1e-6) * 3


def test_decode_16bit_is_scaled_not_clipped():
    a = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    x = decode_pil(encode(Image.fromarray(a), "PNG"), S1, (64, 64))
    assert x[0, 0, 0] == -1 and x[0, -1, -1] == 1
    assert abs(x.mean().item()) < 0.01                      # PIL's convert would clip nearly everything to white
    want = np.rint(a / 257) / 255 * 2 - 1
    np.testing.assert_allclose(x[0].numpy(), want, atol=1e-6)


def test_decode_sizes_and_range():
    data = encode(photo(120, 300), "JPEG", quality=90)
    assert header_size(data, S2) == (120, 300)
    x = decode_pil(data, S2)
    assert x.shape == (3, *smart_resize(120, 300))
    assert decode_pil(data, S2, (32, 48)).shape == (3, 32, 48)
    assert x.min() >= -1 and x.max() <= 1


def test_decode_matches_manual_pil_pipeline():
    """rescale 1/255 and mean/std 0.5 after a PIL bilinear resize, as the reference."""
    im = photo(90, 70)
    x = decode_pil(encode(im, "PNG"), S1)
    ref = np.asarray(im.resize((224, 224), resample=2), dtype=np.float32) * (1 / 255)
    ref = torch.from_numpy((ref - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)


# -- decode: bad files ---------------------------------------------------------------------------------------------

def _reason(fn, *args):
    with pytest.raises(SkipSample) as e:
        fn(*args)
    return e.value.reason


def bad_images() -> dict[str, tuple[bytes, str]]:
    jpg = encode(photo(64, 64), "JPEG", quality=90)
    return {
        "random": (np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "undecodable_image"),
        "truncated_jpeg": (jpg[: len(jpg) // 2], "truncated_image"),
        "zero_bytes": (b"", "empty_image"),
        "1x1": (encode(Image.new("RGB", (1, 1)), "PNG"), "tiny_image"),
        "bomb_header": (png_header(20000, 20000), "too_many_pixels"),
        "aspect_300": (encode(Image.new("RGB", (300, 1)), "PNG"), "aspect_ratio"),
    }


@pytest.mark.parametrize("kind", list(bad_images()))
def test_bad_images_raise_named_skip(kind):
    data, reason = bad_images()[kind]
    assert _reason(decode_pil, data, S1) == reason
    assert _reason(decode_pil, data, S2) == reason
    if kind != "truncated_jpeg":                            # the header of a cut file is fine
        assert _reason(header_size, data, S1) == reason


def test_truncated_header_is_fine():
    data, _ = bad_images()["truncated_jpeg"]
    assert header_size(data, S1) == (64, 64)


def test_pixel_limit_without_pil_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)   # our limit must not depend on PIL's global
    assert _reason(header_size, png_header(20000, 20000), S1) == "too_many_pixels"
    small = ImageConfig(stage=1, max_image_pixels=5000)
    assert _reason(header_size, encode(Image.new("RGB", (100, 100)), "PNG"), small) == "too_many_pixels"
    assert header_size(encode(Image.new("RGB", (50, 100)), "PNG"), small) == (100, 50)


def test_pil_bomb_warning_is_a_skip(monkeypatch):
    """Between PIL's limit and twice it PIL only warns; that is still a drop."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = ImageConfig(stage=1, max_image_pixels=10**9)
    assert _reason(header_size, encode(Image.new("RGB", (40, 40)), "PNG"), big) == "too_many_pixels"


def test_zero_sided_header_is_undecodable():
    assert _reason(header_size, png_header(0, 10), S1) == "undecodable_image"


def test_load_truncated_images_switch_is_refused(monkeypatch):
    data, _ = bad_images()["truncated_jpeg"]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_pil(data, S1)
