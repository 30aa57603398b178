"""Counting what one training step costs besides its math: host syncs, collectives, aten ops, gradient bytes read.

A CPU count that carries over to the GPU: every call counted here as a sync blocks the host until the device
queue drains when the tensor lives on a GPU, every collective is one NCCL launch, every aten op is at least one
kernel launch (or a CPU op on the host). Used by tools/bench_step_overhead.py and tests/unit/test_step_overhead.py.

- syncs: Tensor.item / __bool__ / __int__ / __float__ / __index__ (aten._local_scalar_dense), Tensor.tolist,
  Tensor.cpu, Tensor.numpy, torch.tensor(list of tensors) (one read per element), and the ops whose output size
  depends on the data (nonzero, masked_select, unique, repeat_interleave without output_size). Calls made while
  the batch is still on the host (the data iterator, build_packed_params) are counted apart as `host_syncs`:
  they read host memory and wait for no device.
- collectives: calls of the torch.distributed collectives, by name (also where a module bound one at import).
- aten_ops: ops dispatched (views included), outside the host phase.
- grad_bytes_read: bytes of the DDP gradient buffers passed as input to a non-view op (the full passes over the
  gradients: norm, finiteness check, clipping, the optimizer's own read).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
               "all_to_all_single", "all_gather_object", "broadcast_object_list", "barrier", "send", "recv",
               "isend", "irecv", "batch_isend_irecv")
_SCALAR_READS = {"tolist", "cpu", "numpy"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "nonzero_static"}
_NOT_READS = {"zero_", "fill_", "detach", "alias", "lift_fresh"}


class _Functions(TorchFunctionMode):
    def __init__(self, counter: "StepCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SCALAR_READS:
            self.counter._sync(name)
        elif name in ("tensor", "as_tensor") and args and isinstance(args[0], (list, tuple)):
            n = _count_tensors(args[0])
            if n:                              # one read per element; not counted again at the dispatch level
                self.counter._sync("tensor(list of tensors)", n)
                self.counter.quiet += 1
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    self.counter.quiet -= 1
        return func(*args, **(kwargs or {}))


def _count_tensors(x) -> int:
    if torch.is_tensor(x):
        return 1
    return sum(_count_tensors(y) for y in x) if isinstance(x, (list, tuple)) else 0


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "StepCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        c = self.counter
        name = func.overloadpacket.__name__
        if c.quiet:
            pass
        elif name == "_local_scalar_dense":
            c._sync("item/bool/int/float")
        elif name in _DATA_DEPENDENT or (name == "repeat_interleave" and torch.is_tensor(args[0])
                                         and (kwargs or {}).get("output_size") is None):
            c._sync(name)
        if not c.host and func.namespace == "aten":
            c.counts["aten_ops"] += 1
            if c.grad_storages and not func.is_view and name not in _NOT_READS:
                read = {(a.untyped_storage().data_ptr(), a.storage_offset(), a.numel(), a.element_size())
                        for a in _tensors(args, kwargs)}          # eq(x, x) reads x once
                c.counts["grad_bytes_read"] += sum(n * size for ptr, _, n, size in read if ptr in c.grad_storages)
        return func(*args, **(kwargs or {}))


def _tensors(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if torch.is_tensor(a):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if torch.is_tensor(x))


class StepCounter:
    """Context manager; `counts` holds the totals of everything run inside it. `host_phase()` marks host-side
    work (its syncs go to `host_syncs`, its ops are not counted)."""

    def __init__(self, grad_buffers=()):
        self.counts: Counter = Counter()
        self.host = False
        self.grad_storages = {b.untyped_storage().data_ptr() for b in grad_buffers}
        self._patched: list = []
        self._depth = 0
        self.quiet = 0

    def _sync(self, what: str, n: int = 1) -> None:
        key = "host_syncs" if self.host else "syncs"
        self.counts[key] += n
        self.counts[f"{key}:{what}"] += n

    @contextlib.contextmanager
    def host_phase(self):
        was, self.host = self.host, True
        try:
            yield
        finally:
            self.host = was

    def _patch_collectives(self) -> None:
        originals = {getattr(torch.distributed, n): n for n in COLLECTIVES if hasattr(torch.distributed, n)}
        modules = [m for name, m in list(sys.modules.items())
                   if m is not None and (name.startswith("torch.distributed") or name.startswith("megatron.core")
                                         or name.startswith("genlip_mcore"))]
        for m in modules:
            for attr, value in list(vars(m).items()):
                if callable(value) and not isinstance(value, type):
                    try:
                        name = originals.get(value)
                    except TypeError:                      # unhashable
                        continue
                    if name is not None:
                        setattr(m, attr, self._counting(value, name))
                        self._patched.append((m, attr, value))

    def _counting(self, fn, name: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._depth == 0:                           # all_gather_object calls all_gather: count it once
                self.counts["collectives"] += 1
                self.counts[f"collectives:{name}"] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapper

    def __enter__(self):
        self._patch_collectives()
        self._modes = [_Functions(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        for m, attr, value in reversed(self._patched):
            setattr(m, attr, value)
        self._patched.clear()
        return False


class HostSideIterator:
    """Wraps a batch iterator so that drawing a batch counts as host work."""

    def __init__(self, it, counter: StepCounter):
        self.it, self.counter = it, counter

    def __getattr__(self, name):
        return getattr(self.it, name)

    def __iter__(self):
        return self

    def __next__(self):
        with self.counter.host_phase():
            return next(self.it)


def count_train_steps(chunks, optimizer, scheduler, data, shape: dict, steps: int, *,
                      legacy: bool = False) -> tuple[Counter, list]:
    """Run `steps` training steps under a StepCounter; returns (totals, StepResults). Drawing a batch and building
    its packed-sequence metadata are the host phase."""
    from genlip_mcore.train import step as step_mod

    buffers = [buf.grad_data for m in chunks for buf in m.buffers]
    counter = StepCounter(buffers)
    original = step_mod.build_packed_params

    def host_side_packed(*args, **kwargs):
        with counter.host_phase():
            return original(*args, **kwargs)

    step_mod.build_packed_params = host_side_packed
    results = []
    try:
        with counter:
            it = HostSideIterator(data, counter)
            for _ in range(steps):
                results.append(step_mod.train_step(chunks, optimizer, scheduler, it,
                                                   _legacy=legacy, **shape))
    finally:
        step_mod.build_packed_params = original
    return counter.counts, results


def build_tiny(overrides: list[str], run_dir: str):
    """The tiny model, its optimizer, schedule and generated data, one process (world of 1). Returns
    (cfg, chunks, optimizer, scheduler, data, shape)."""
    from genlip_mcore import config as C
    from genlip_mcore.data.synthetic import SyntheticPacks
    from genlip_mcore.model import build_model_chunks
    from genlip_mcore.parallel import setup_model_parallel
    from genlip_mcore.train.optim import build_optimizer, build_scheduler, wrap_chunks
    from genlip_mcore.train.step import step_shape

    cfg = C.load(None, ["model.variant=tiny", "data.max_seq_len=128", "training.global_batch_size=2",
                        f"training.run_dir={run_dir}", *overrides], world_size=1)
    setup_model_parallel(cfg.parallel, cfg.training.seed)
    chunks = wrap_chunks(cfg, build_model_chunks(cfg))
    optimizer = build_optimizer(cfg, chunks)
    return cfg, chunks, optimizer, build_scheduler(cfg, optimizer), SyntheticPacks.for_config(cfg, 0, 1), \
        step_shape(cfg, 1)


def compare(overrides: list[str], steps: int, run_dir: str) -> dict:
    """Two identical tiny models on the same batches, one on the former step path, one on the current; per-step
    counts of each, and whether their losses and grad norms agree bitwise."""
    before = build_tiny(overrides, run_dir)
    after = build_tiny(overrides, run_dir)
    for a, b in zip(before[1], after[1], strict=True):
        b.load_state_dict(a.state_dict())
    out = {}
    for name, (_, chunks, opt, sched, data, shape), legacy in (("before", before, True), ("after", after, False)):
        counts, results = count_train_steps(chunks, opt, sched, data, shape, steps, legacy=legacy)
        out[name] = {k: v / steps for k, v in counts.items()}
        out[name + "_results"] = [(r.loss, r.grad_norm, r.update_successful) for r in results]
    out["identical_results"] = out["before_results"] == out["after_results"]
    return out
