"""DALI decoder (CPU operators) against the Pillow reference path: same shapes, near-identical values, same skips.

Dimensions: B items per decode call; H, W target size per item.

Both sides decode JPEG with libjpeg-turbo (ISLOW IDCT, fancy upsampling), so un-resized JPEGs come out bit-equal;
the residual comes from the resize kernels (PIL's fixed-point bilinear vs DALI's float linear filter, both
antialiased), which round to a different uint8 now and then. Measured on the 20 images below (DALI 2.4.0, Pillow
13.0, x86-64), in normalised units where one 8-bit step (LSB) = 2/255 = 0.0078:

    stage 1 (224x224):       mean-abs <= 0.0015 per image, 99th percentile <= 1 LSB, max 8 LSB (0.063)
    stage 2 (smart_resize):  mean-abs <= 0.0016 per image, 99th percentile <= 1 LSB, max 7 LSB (0.055)
    no resize (224, 512):    0 (bit-identical decode)
    (the max is at the large downscales, 2000x3000 and 999x1001; it is a handful of pixels on sharp edges)

The bounds below leave headroom for other decoder builds (and are shared with tests/gpu/test_gpu_dali.py, where
nvJPEG's IDCT differs from libjpeg-turbo's by about 1 LSB on top of this).
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")

from genlip_mcore.data.dali import DaliDecoder  # noqa: E402
from genlip_mcore.data.errors import SkipSample  # noqa: E402
from genlip_mcore.data.images import ImageConfig, decode_pil, header_size, target_size  # noqa: E402
from tests.unit.test_images import encode, mode_images, photo  # noqa: E402

LSB = 2 / 255
MEAN_ABS = 0.005        # per image, mean |DALI - Pillow|        (measured <= 0.0016)
P99 = 2 * LSB + 1e-6    # per image, 99th percentile            (measured 1 LSB)
MAX_ABS = 12 * LSB      # per image, worst pixel                 (measured 8 LSB)

# (h, w): landscape, portrait, square, extreme aspect, tiny (upscaled), large (downscaled), exact sizes
SIZES = [(480, 640), (300, 300), (600, 400), (1000, 30), (40, 40), (2000, 3000), (224, 224), (333, 517),
         (512, 512), (90, 700), (700, 90), (123, 456), (250, 1000), (640, 480), (31, 33), (999, 1001), (16, 16),
         (64, 900), (1200, 800), (500, 120)]


def jpegs() -> list[bytes]:
    # quality and chroma subsampling vary too (4:2:0, 4:2:2, 4:4:4): both decoders must upsample chroma alike
    return [encode(photo(h, w, seed=i), "JPEG", quality=(75, 90, 95)[i % 3], subsampling=i % 3)
            for i, (h, w) in enumerate(SIZES)]


def stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    d = (a.cpu() - b.cpu()).abs().flatten()
    return d.mean().item(), d.quantile(0.99).item(), d.max().item()


def assert_agree(outs, datas, cfg, sizes, same_jpeg_decoder: bool = True):
    """Per-image bounds against decode_pil; returns the worst (mean-abs, p99, max) seen."""
    worst = [0.0, 0.0, 0.0]
    for o, d, hw in zip(outs, datas, sizes, strict=True):
        ref = decode_pil(d, cfg, hw)
        assert torch.is_tensor(o) and o.dtype == torch.float32
        assert tuple(o.shape) == tuple(ref.shape) == (3, *hw)
        s = stats(o, ref)
        worst = [max(w, v) for w, v in zip(worst, s, strict=True)]
        assert s[0] < MEAN_ABS and s[1] <= P99 and s[2] <= MAX_ABS, (hw, s)
        if same_jpeg_decoder and tuple(ref.shape[1:]) == header_size(d, cfg):  # no resize: libjpeg-turbo twice
            assert s[2] <= LSB + 1e-6, (hw, s)
    return worst


@pytest.fixture(scope="module")
def data():
    return jpegs()


@pytest.mark.parametrize("stage", [1, 2])
def test_dali_cpu_matches_pillow(stage, data):
    cfg = ImageConfig(stage=stage)
    sizes = [target_size(*header_size(d, cfg), cfg) for d in data]
    outs = DaliDecoder(cfg).decode(data, sizes)
    worst = assert_agree(outs, data, cfg, sizes)
    print(f"stage {stage}: worst mean-abs {worst[0]:.4f}, p99 {worst[1]:.4f}, max {worst[2]:.4f}")


def test_default_sizes_are_target_size(data):
    cfg = ImageConfig(stage=2)
    outs = DaliDecoder(cfg).decode(data[:4])
    assert [tuple(o.shape[1:]) for o in outs] == [target_size(*header_size(d, cfg), cfg) for d in data[:4]]


def test_modes_match_pillow():
    """Palette (with transparency), RGBA/LA (alpha dropped), CMYK, L, 1-bit and 16-bit PNG, as `images.to_rgb`."""
    cfg = ImageConfig(stage=1)
    items = mode_images()
    a16 = np.linspace(0, 65535, 48 * 80).round().astype(np.uint16).reshape(48, 80)
    items["I;16_ramp"] = (encode(Image.fromarray(a16), "PNG"), None)
    datas = [d for d, _ in items.values()]
    outs = DaliDecoder(cfg).decode(datas, [(224, 224)] * len(datas))
    for name, o, d in zip(items, outs, datas, strict=True):
        s = stats(o, decode_pil(d, cfg))
        assert s[2] <= 2 * LSB + 1e-6, (name, s)


def test_exif_orientation_is_ignored_like_pillow():
    """DALI rotates by EXIF by default; the reference does not, and the header size decided the token grid."""
    im = photo(96, 160)
    exif = Image.Exif()
    exif[0x0112] = 6                                        # "rotate 90 CW" on display
    data = encode(im, "JPEG", quality=95, exif=exif.tobytes())
    cfg = ImageConfig(stage=2)
    (o,) = DaliDecoder(cfg).decode([data])
    ref = decode_pil(data, cfg)
    assert o.shape == ref.shape == (3, 96, 160)
    assert stats(o, ref)[0] < MEAN_ABS


def test_gif_goes_through_pillow():
    """DALI has no GIF decoder: such items are decoded by Pillow inside the same call."""
    cfg = ImageConfig(stage=1)
    data = encode(photo(50, 70).convert("P"), "GIF")
    (o,) = DaliDecoder(cfg).decode([data], [(224, 224)])
    torch.testing.assert_close(o, decode_pil(data, cfg), atol=0, rtol=0)


def test_bad_item_skips_only_itself(data):
    cfg = ImageConfig(stage=2)
    bad = {
        1: (data[1][: len(data[1]) // 2], "truncated_image"),
        3: (b"\xff\xd8\xff" + bytes(range(256)) * 8, "undecodable_image"),
        4: (encode(Image.new("RGB", (1, 1)), "PNG"), "tiny_image"),
        5: (encode(photo(100, 150), "PNG")[:3000], "truncated_image"),   # the only one that reaches DALI
        6: (b"", "empty_image"),
    }
    batch = [bad[i][0] if i in bad else d for i, d in enumerate(data[:8])]
    sizes = [target_size(*header_size(d, cfg), cfg) if i not in bad else (64, 64) for i, d in enumerate(batch)]
    dec = DaliDecoder(cfg)
    build, rebuilds = dec._build, []
    dec._build = lambda: rebuilds.append(1) or build()
    outs = dec.decode(batch, sizes)
    assert rebuilds == [1, 1]                               # the batch failed once, then the cut PNG alone
    for i, o in enumerate(outs):
        if i in bad:
            assert isinstance(o, SkipSample) and o.reason == bad[i][1], (i, o)
        else:
            assert torch.is_tensor(o) and tuple(o.shape) == (3, *sizes[i])
    good = [i for i in range(8) if i not in bad]
    assert_agree([outs[i] for i in good], [batch[i] for i in good], cfg, [sizes[i] for i in good])
    # the pipeline was rebuilt after the failure: the decoder keeps working
    again = dec.decode([data[0]], [sizes[0]])[0]
    torch.testing.assert_close(again, outs[0], atol=0, rtol=0)


def test_cut_jpeg_is_caught_before_dali(data, monkeypatch):
    """A JPEG without its end marker is Pillow's truncated_image, found before any pipeline run."""
    cfg = ImageConfig(stage=1)
    dec = DaliDecoder(cfg)
    monkeypatch.setattr(dec, "_build", lambda: pytest.fail("the pipeline should not have failed"))
    outs = dec.decode([data[2], data[0][:-200], data[4], data[5][:-2]], [(224, 224)] * 4)
    assert [getattr(o, "reason", None) for o in outs] == [None, "truncated_image", None, "truncated_image"]


def test_dali_failure_falls_back_to_pillow(data):
    """A cut PNG passes the header check and breaks the DALI batch: one-by-one runs find it, Pillow names it."""
    cfg = ImageConfig(stage=1)
    png = encode(photo(200, 300), "PNG")
    batch = [data[2], png[: len(png) // 2], data[4], png]
    outs = DaliDecoder(cfg).decode(batch, [(224, 224)] * 4)
    assert isinstance(outs[1], SkipSample) and outs[1].reason == "truncated_image"
    assert_agree([outs[i] for i in (0, 2, 3)], [batch[i] for i in (0, 2, 3)], cfg, [(224, 224)] * 3)


def test_item_only_pillow_can_decode_is_kept(data, monkeypatch):
    """If DALI fails on an item that Pillow decodes, the item is kept with Pillow's pixels."""
    cfg = ImageConfig(stage=1)
    dec = DaliDecoder(cfg)
    picky = data[3]
    run = dec._run

    def failing_run(datas, sizes):
        if any(d is picky for d in datas):
            raise RuntimeError("simulated DALI decode failure")
        return run(datas, sizes)

    monkeypatch.setattr(dec, "_run", failing_run)
    outs = dec.decode(data[:5], [(224, 224)] * 5)
    torch.testing.assert_close(outs[3], decode_pil(picky, cfg), atol=0, rtol=0)
    assert dec.pil_fallbacks == 1
    assert_agree(outs, data[:5], cfg, [(224, 224)] * 5)


def test_variable_batches_and_chunking(data):
    cfg = ImageConfig(stage=1)
    dec = DaliDecoder(cfg, max_batch=4)
    sizes = [(224, 224)] * 10
    outs = dec.decode(data[:10], sizes)                     # 4 + 4 + 2
    assert len(outs) == 10 and all(o.shape == (3, 224, 224) for o in outs)
    assert dec.decode([], []) == []
    assert len(dec.decode(data[:3], sizes[:3])) == 3


def test_module_imports_without_dali_and_names_the_setting():
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "import genlip_mcore.data.dali as m\n"
            "from genlip_mcore.data.images import ImageConfig\n"
            "try:\n    m.DaliDecoder(ImageConfig())\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "data.decoder" in out.stdout
