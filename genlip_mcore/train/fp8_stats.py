"""Per layer x GEMM x tensor FP8 statistics, every logging.fp8_stats_interval iterations, to fp8_stats.jsonl.

On a statistics step every block linear's GemmState gets a fresh StatsAccumulator (none between those steps, so
the other steps cost nothing); after the step the accumulators of all ranks are combined into global numbers and
one rank appends one JSON object per layer x GEMM x tensor:

  {"iteration", "layer" (global, 1-based), "gemm", "tensor", "fp8", "recipe", "dtype", "amax", "scale",
   "scale_min", "scale_max", "underflow_pct", "overflow_pct", "mse", "kurtosis", "numel"}

(field meanings: genlip_mcore/model/fp8/stats.py; quantization fields are null for high-precision layers).
Combining: every rank places its states' vectors in one [L * 4, F] table at their global layer, neutral entries
elsewhere, and the table is all-reduced over the world once per reduction kind (sum, max, min). That sums DP
replicas (each saw other data) and TP shards (weights always, the column layer's dY, the row layer's input), and
takes each pipeline stage's layers from their stage. Operands that are identical on every TP rank (the column
layer's copied or SP-gathered input, the row layer's dY) count on TP rank 0 only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from genlip_mcore.config import Config, fp8_backend
from genlip_mcore.model.fp8.attach import GEMMS, TP_REPLICATED, chunk_states
from genlip_mcore.model.fp8.quant import ROLES
from genlip_mcore.model.fp8.stats import StatsAccumulator
from genlip_mcore.train import stop

FILENAME = "fp8_stats.jsonl"


def for_run(cfg: Config, writer: bool):
    """The statistics hook of this run, or None (no precision.fp8 or logging.fp8_stats_interval). Every rank, before
    the model is built (Transformer Engine's debug features attach when its modules are constructed). The decision
    depends on the config only, so every rank takes it alike (statistics steps run collectives)."""
    if cfg.precision.fp8 is None or not cfg.logging.fp8_stats_interval:
        return None
    if fp8_backend(cfg.precision, cfg.model) == "te":
        from genlip_mcore.model.fp8 import te_stats

        hook = te_stats.init(cfg, Path(cfg.training.run_dir))
        return _TEStats(hook) if hook is not None else None
    return FP8Stats(cfg, writer)


class _Hook:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # leaving on an error: no flush, whose collectives would wait for ranks that may be gone
        self.close(flush=exc_type is None or issubclass(exc_type, stop.Stopped))

    def close(self, flush: bool = True) -> None:
        pass


class _TEStats(_Hook):
    """fp8_backend=te: TE computes the statistics (model/fp8/te_stats.py); its step counter moves every iteration."""

    def __init__(self, hook):
        self.hook = hook

    def attach(self, chunks: list, start_iteration: int) -> None:
        self.hook.attach(chunks, start_iteration)

    def begin(self, iteration: int) -> bool:
        return True

    def end(self, iteration: int) -> None:
        self.hook.step(iteration)

    def close(self, flush: bool = True) -> None:
        self.hook.close(flush=flush)


class FP8Stats(_Hook):
    """emulate and torchao: our GemmStates accumulate the statistics on the statistics steps."""

    def __init__(self, cfg: Config, writer: bool):
        self.interval, self.num_layers = cfg.logging.fp8_stats_interval, cfg.model.num_layers
        self.path = Path(cfg.training.run_dir) / FILENAME
        self.writer = writer
        self.states: dict = {}

    def attach(self, chunks: list, start_iteration: int) -> None:
        self.states = {k: s for m in chunks for k, s in chunk_states(m).items()}

    def begin(self, iteration: int) -> bool:
        """Before a step: True (and accumulators attached) when this iteration writes statistics."""
        if iteration % self.interval:
            return False
        for s in self.states.values():
            s.stats = StatsAccumulator()
        return True

    def end(self, iteration: int) -> None:
        """After the step: combine over all ranks, append the rows, detach the accumulators."""
        table = self._global_table()
        for s in self.states.values():
            s.stats = None
        if not self.writer:
            return
        acc = StatsAccumulator()
        with self.path.open("a") as f:
            for layer in range(1, self.num_layers + 1):
                for g, gemm in enumerate(GEMMS):
                    acc.load_tensor(table[(layer - 1) * len(GEMMS) + g])
                    summary = acc.summary()
                    for role in ROLES:
                        row = {"iteration": iteration, "layer": layer, "gemm": gemm, "tensor": role,
                               **_row(summary.get(role))}
                        f.write(json.dumps(row, allow_nan=False) + "\n")

    def _global_table(self) -> torch.Tensor:
        empty = StatsAccumulator().to_tensor()                       # [F_all] neutral for every reduction
        per_role = empty.numel() // len(ROLES)
        table = empty.repeat(self.num_layers * len(GEMMS), 1)         # [L * 4, F_all] float64
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for (layer, gemm), s in self.states.items():
            v = s.stats.to_tensor()
            if tp_rank != 0:
                for role in TP_REPLICATED[gemm]:
                    i = ROLES.index(role) * per_role
                    v[i:i + per_role] = empty[i:i + per_role]
            table[(layer - 1) * len(GEMMS) + GEMMS.index(gemm)] = v
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        ops = StatsAccumulator.reduce_ops()
        out = table.clone()
        for kind, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
            t = table.to(device)
            dist.all_reduce(t, op=op)
            out[:, ops[kind]] = t.cpu()[:, ops[kind]]
        return out


def _row(s: dict | None) -> dict:
    keys = ("fp8", "recipe", "dtype", "amax", "scale", "scale_min", "scale_max", "underflow_pct", "overflow_pct",
            "mse", "kurtosis", "numel")
    if s is None:                                                    # never ran this step (cannot happen in training)
        return dict.fromkeys(keys) | {"fp8": False, "amax": 0.0, "numel": 0}
    # strict JSON: a kurtosis of a constant tensor (0/0) or an infinite amax is written as null
    return {k: None if isinstance(s[k], float) and not math.isfinite(s[k]) else s[k] for k in keys}
