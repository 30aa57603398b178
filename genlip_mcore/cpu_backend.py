"""Run Megatron-Core on CPU with gloo, for development and CI only.

Megatron-Core 0.16.1 assumes CUDA in a few dozen places: RNG-state capture, buffers allocated with
`device="cuda"` or `torch.cuda.current_device()`, `torch.cuda.synchronize()`, and string checks on
`tensor.type()` in the distributed optimizer. `activate()` redirects those to the CPU. It is a no-op when CUDA is
present, so it can never change a GPU run. It touches private Megatron names, which is why CI pins
megatron-core==0.16.1 exactly. Background and the traps found: shared/notes/cpu-and-gpu-stack.md §1.3.

The CUDA RNG and the CPU RNG become one CPU stream here: fine for tests, not bit-compatible with GPU dropout.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_FACTORIES = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.arange, torch.rand, torch.randn,
    torch.randint, torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.as_tensor,
    torch.empty_strided, torch.linspace,
}


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` (or an int device) to CPU in factory calls and `Tensor.to`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES or func is torch.Tensor.new_empty or func is torch.Tensor.new_zeros:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
        elif func is torch.Tensor.to:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
               torch.bfloat16: "torch.cuda.BFloat16Tensor"}


def _patched_type(orig):
    def type_(self, dtype=None, non_blocking=False, **kw):
        # The distributed optimizer checks `param.type()` against torch.cuda.* names (distrib_optimizer.py).
        if dtype is None and not kw and self.dtype in _TYPE_NAMES and self.device.type == "cpu":
            return _TYPE_NAMES[self.dtype]
        return orig(self, dtype, non_blocking, **kw) if dtype is not None else orig(self)

    return type_


def activate() -> bool:
    """Make Megatron-Core usable on this CPU-only process. Returns True when the backend is (now) active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    tc = torch.cuda
    # Each patched name gets its own function object: torch.compile's rule table rejects one object that is
    # reachable under two names with different tracing rules.
    tc.get_rng_state = lambda device="cuda": torch.get_rng_state()
    tc.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    tc.random.get_rng_state = lambda device="cuda": torch.get_rng_state()
    tc.random.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which would recurse.
    tc.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    tc.manual_seed_all = lambda seed: None
    # Must be a torch.device: it is also read inside autograd backward, where no TorchFunctionMode is active.
    tc.current_device = lambda: torch.device("cpu")
    for name in ("synchronize", "set_device", "empty_cache"):
        setattr(tc, name, lambda *a, **k: None)
    tc.Stream = tc.Event = _Dummy
    tc.current_stream = lambda *a, **k: _Dummy()
    tc.default_stream = lambda *a, **k: _Dummy()
    tc.stream = lambda *a, **k: contextlib.nullcontext()
    tc.nvtx.range_push = lambda *a, **k: None
    tc.nvtx.range_pop = lambda *a, **k: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        setattr(tc, name, lambda *a, **k: 0)
    # Megatron wraps small fusions in torch.compile; on CPU they would compile C++ at first call for no gain.
    import megatron.core.jit as mjit
    import torch._dynamo as dynamo

    mjit.disable_jit_fuser()
    dynamo.config.disable = True
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _patched_type(torch.Tensor.type)

    import megatron.core.tensor_parallel.random as mrand

    mrand._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrand._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    logging.getLogger(mrand.__name__).setLevel(logging.ERROR)   # "CPU RNG state changed within GPU RNG context"
    _CudaToCpu().__enter__()
    _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE
