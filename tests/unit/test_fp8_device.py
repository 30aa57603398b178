"""genlip_mcore.model.fp8.device.check_device: a recipe the device cannot run fails before any work, in one line
naming the field; emulate runs anywhere; torchao runs on CPU. The GPU is faked by patching torch.cuda."""

import importlib.util

import pytest
import torch

from genlip_mcore import config as C
from genlip_mcore.model.fp8.device import check_device

H100, L40, A100, B200 = (9, 0), (8, 9), (8, 0), (10, 0)


def cfg(backend, recipe, fp8="hybrid", stats=0):
    impl = "transformer_engine" if backend in ("te", "auto") else "local"
    return C.Config(model=C.model_config("tiny", transformer_impl=impl),
                    precision=C.PrecisionConfig(bf16=True, fp8=fp8, fp8_recipe=recipe, fp8_backend=backend),
                    logging=C.LoggingConfig(fp8_stats_interval=stats))


@pytest.fixture
def gpu(monkeypatch):
    """fake(capability) makes torch.cuda report one GPU of that compute capability; fake(None) no GPU."""
    def fake(cap):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cap is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm{cap[0]}{cap[1]}")
    return fake


def fails(field, c, *words):
    with pytest.raises(C.ConfigError) as err:
        check_device(c)
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("recipe,cap,ok", [
    ("delayed", L40, True), ("delayed", A100, False), ("tensorwise", L40, True), ("tensorwise", A100, False),
    ("blockwise", H100, True), ("blockwise", L40, False), ("blockwise", B200, True),
    ("mxfp8", B200, True), ("mxfp8", H100, False),
])
@pytest.mark.parametrize("backend", ["te", "auto"])
def test_te_recipes_need_their_architecture(gpu, backend, recipe, cap, ok):
    gpu(cap)
    c = cfg(backend, recipe, fp8="e4m3" if recipe in ("blockwise", "mxfp8") else "hybrid")
    if ok:
        check_device(c)
    else:
        fails("precision.fp8_recipe", c, recipe, f"{cap[0]}.{cap[1]}", "fp8_backend=emulate")


def test_te_needs_cuda(gpu):
    gpu(None)
    fails("precision.fp8_backend", cfg("te", "tensorwise"), "CUDA")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_needs_sm89_on_cuda_and_runs_on_cpu(gpu, recipe):
    gpu(A100)
    fails("precision.fp8_recipe", cfg("torchao", recipe), "8.9", "Ada")
    gpu(H100)
    check_device(cfg("torchao", recipe))
    gpu(None)
    check_device(cfg("torchao", recipe))


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8", "rowwise"])
@pytest.mark.parametrize("cap", [None, A100, B200])
def test_emulate_and_bf16_run_anywhere(gpu, recipe, cap):
    gpu(cap)
    check_device(cfg("emulate", recipe))
    check_device(cfg("te", recipe, fp8=None))


@pytest.mark.skipif(importlib.util.find_spec("nvdlfw_inspect") is not None, reason="nvdlfw-inspect is installed")
def test_te_statistics_need_nvdlfw_inspect(gpu):
    gpu(H100)
    fails("logging.fp8_stats_interval", cfg("te", "tensorwise", stats=10), "nvdlfw-inspect")
    check_device(cfg("emulate", "tensorwise", stats=10))          # the emulator computes its own
