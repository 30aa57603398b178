"""Where a training step's time goes: attention, GEMMs, the optimizer, other work and idle, from torch.profiler.

Every profiled op is charged to one category by its own name and the names of the ops that enclose it (its CPU
call chain, the autograd backward nodes included), first match wins:
- optimizer: anything inside the `OPTIMIZER_RANGE` record_function that train_step opens around the update;
- attention: the SDPA family (flash, memory-efficient, cuDNN, math), flex attention and its block mask, and
  torch.compile regions. The only compiled code on this path is flex attention (Megatron's fusions are off in our
  TransformerConfig), so a compiled region is attention;
- gemm: matrix products (mm, addmm, bmm, baddbmm, matmul, linear, scaled mm) outside attention;
- other: the rest (norms, activations, rotary, gathers, casts, the loss, gradient clipping outside the optimizer).

The time of an op is what the device spent in the kernels the op launched itself (on CUDA), or the op's self CPU
time (on CPU, where the smoke mode runs). `idle` is the step's wall time minus all attributed time: on a GPU the
time it waits for the host (launch overhead, synchronisations); on CPU the Python between ops.
"""

from __future__ import annotations

import re
from collections import defaultdict

# the range train/step.py opens around the update (the package may not import train; test_step_overhead.py
# checks that the two strings agree)
OPTIMIZER_RANGE = "genlip: optimizer"
ATTENTION = re.compile(r"scaled_dot_product|flash|efficient_attention|cudnn_attention|fmha|flex_attention|"
                       r"FlexAttention|create_block_mask|CompiledFunction|Torch-Compiled Region|CompiledFxGraph")
GEMM = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm|_addmm_activation)$|^(Mm|Addmm|Bmm)Backward")
STEP_RANGE = "gpu_check: step"
# Host synchronisations inside STEP_RANGE. On a GPU: the runtime's waits (an .item(), a device-to-host copy, a
# nonzero, torch.cuda.synchronize). On CPU, where nothing waits: the host reads of a tensor value (.item(), bool()),
# each of which would be a wait on a GPU.
SYNC_OPS = {True: ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
            False: ("aten::_local_scalar_dense",)}
CATEGORIES = ("attention", "gemm", "optimizer", "other")


def _chain(evt) -> list[str]:
    names = []
    while evt is not None:
        names.append(evt.name)
        evt = evt.cpu_parent
    return names


def category(names: list[str]) -> str:
    """Category of an op from its call chain (the op first, then its enclosing ops)."""
    if OPTIMIZER_RANGE in names:
        return "optimizer"
    if any(ATTENTION.search(n) for n in names):
        return "attention"
    if any(GEMM.search(n) for n in names):
        return "gemm"
    return "other"


def _op_name(names: list[str]) -> str:
    """The op a time is reported under: the nearest enclosing name that is not a CUDA runtime/driver call."""
    return next((n for n in names if not n.startswith("cu")), names[0])


def breakdown(prof, step_ms: float, on_device: bool, top: int = 12) -> dict:
    """Fractions of `step_ms` (the profiled step's wall time) per category, the heaviest ops, and counts of device
    operations (kernels, copies, memsets) and host synchronisations. `prof` is a finished torch.profiler.profile
    around one step that ran inside record_function(STEP_RANGE)."""
    from torch.autograd import DeviceType

    events = prof.events()
    # A record_function range also leaves a device-side annotation linked to it; it is a span, not work.
    annotations = {e.name for e in events
                   if e.device_type != DeviceType.CPU and getattr(e, "is_user_annotation", False)}
    times: dict[str, float] = defaultdict(float)        # microseconds
    ops: dict[tuple[str, str], float] = defaultdict(float)
    device_ops = syncs = 0
    for evt in events:
        if evt.device_type != DeviceType.CPU or evt.is_async:
            continue                                      # device work is counted through its launching op
        if evt.name in SYNC_OPS[on_device] and STEP_RANGE in _chain(evt):
            syncs += 1
        if on_device:
            kernels = [k for k in evt.kernels if k.name not in annotations]
            device_ops += len(kernels)
            t = sum(k.duration for k in kernels)
        else:
            t = evt.self_cpu_time_total
        if t <= 0:
            continue
        names = _chain(evt)
        cat = category(names)
        times[cat] += t
        ops[(_op_name(names), cat)] += t
    busy_ms = sum(times.values()) / 1e3
    return {
        "step_ms": step_ms,
        "time_basis": "device time of the kernels each op launched" if on_device else "self CPU time of each op",
        "ms": {c: times[c] / 1e3 for c in CATEGORIES},
        "fraction_of_step": {c: times[c] / 1e3 / step_ms for c in CATEGORIES},
        "idle_fraction": max(0.0, 1.0 - busy_ms / step_ms),
        "device_ops": device_ops if on_device else None,
        "host_syncs": syncs,
        "top_ops": [{"op": name, "category": cat, "ms": t / 1e3}
                    for (name, cat), t in sorted(ops.items(), key=lambda kv: -kv[1])[:top]],
    }
