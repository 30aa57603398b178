"""DALI "mixed" decode (nvJPEG on the GPU) against the Pillow reference, with the bounds of tests/unit/test_dali.py.

Dimensions: B items per decode call; H, W target size per item.

nvJPEG's IDCT is not libjpeg-turbo's, so unlike the CPU operators the un-resized images are not bit-equal; the
per-image bounds (mean-abs, 99th percentile, max) are the same as on CPU. The outputs must stay on the GPU.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")

from genlip_mcore.data.dali import DaliDecoder  # noqa: E402
from genlip_mcore.data.errors import SkipSample  # noqa: E402
from genlip_mcore.data.images import ImageConfig, header_size, target_size  # noqa: E402
from tests.unit.test_dali import assert_agree, jpegs  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return jpegs()


@pytest.mark.parametrize("stage", [1, 2])
def test_dali_mixed_matches_pillow(stage, data):
    cfg = ImageConfig(stage=stage)
    sizes = [target_size(*header_size(d, cfg), cfg) for d in data]
    outs = DaliDecoder(cfg, device="mixed").decode(data, sizes)
    assert all(o.is_cuda for o in outs)
    worst = assert_agree(outs, data, cfg, sizes, same_jpeg_decoder=False)
    print(f"mixed stage {stage}: worst mean-abs {worst[0]:.4f}, p99 {worst[1]:.4f}, max {worst[2]:.4f}")


def test_dali_mixed_bad_item_skips_only_itself(data):
    cfg = ImageConfig(stage=1)
    batch = [data[0], data[1][: len(data[1]) // 2], data[2]]
    outs = DaliDecoder(cfg, device="mixed").decode(batch, [(224, 224)] * 3)
    assert isinstance(outs[1], SkipSample) and outs[1].reason == "truncated_image"
    assert outs[0].is_cuda and outs[2].is_cuda
    assert_agree([outs[0], outs[2]], [batch[0], batch[2]], cfg, [(224, 224)] * 2, same_jpeg_decoder=False)
