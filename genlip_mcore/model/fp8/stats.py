"""Per-GEMM statistics of the tensors that FP8 GEMMs consume, summed over the micro-batches of a logging step and
reducible across ranks as one float64 vector.

Per role (activation X and weight W as fprop consumes them, gradient dY as dgrad consumes it):
  amax          max |x| of the high-precision tensor
  underflow_pct non-zero inputs that quantize to zero, as % of all quantized elements
  overflow_pct  elements whose scaled magnitude exceeds the format's max (clipped), as % of all quantized elements
  mse           mean squared error of the dequantized values against the high-precision ones
  kurtosis      Pearson kurtosis (3 for a normal distribution) from raw moments summed in float64; nan for a
                constant tensor
  scale         per-tensor recipes: the scale used; block recipes: the median block scale. With several
                quantizations (micro-batches, ranks) the mean of those; scale_min / scale_max are the extremes over
                every block (or tensor) seen
  numel         elements seen (high-precision and quantized)
A high-precision tensor (the GEMM runs without FP8) contributes amax, kurtosis and numel only.

Vector layout: len(ROLES) x len(FIELDS) float64, role-major (entry role_index * len(FIELDS) + field_index); every
entry reduces by SUM except those in _REDUCE (MAX or MIN), see `StatsAccumulator.reduce_ops`. Empty entries are
neutral for their op (0 for SUM and MAX, +inf for MIN, -inf for scale_max).
"""

from __future__ import annotations

import math

import torch

from genlip_mcore.model.fp8.quant import FP8_DTYPES, RECIPES, ROLES, QTensor

FIELDS = ("adds", "numel", "numel_fp8", "fp8_adds", "s1", "s2", "s3", "s4", "amax", "underflow", "overflow",
          "sq_err", "scale_sum", "scale_min", "scale_max", "recipe", "dtype")
_REDUCE = {"amax": "max", "scale_min": "min", "scale_max": "max", "recipe": "max", "dtype": "max"}
_EMPTY = {"scale_min": math.inf, "scale_max": -math.inf}
_DTYPE_NAMES = tuple(FP8_DTYPES)                 # code 0: none, i + 1: _DTYPE_NAMES[i]
_DTYPE_CODE = {dt: i + 1 for i, dt in enumerate(FP8_DTYPES.values())}
_F = {name: i for i, name in enumerate(FIELDS)}


class StatsAccumulator:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._t = torch.tensor([_EMPTY.get(f, 0.0) for f in FIELDS] * len(ROLES), dtype=torch.float64)

    def _row(self, role: str) -> torch.Tensor:
        i = ROLES.index(role)
        return self._t[i * len(FIELDS):(i + 1) * len(FIELDS)]     # a view: writes land in self._t

    @torch.no_grad()
    def add(self, role: str, x_hp: torch.Tensor, q: QTensor | None) -> None:
        x = x_hp.detach().reshape(-1).double()
        x2 = x * x
        vals = {"adds": 1.0, "numel": x.numel(), "s1": x.sum(), "s2": x2.sum(), "s3": (x2 * x).sum(),
                "s4": (x2 * x2).sum()}
        r = self._row(role)
        for name, v in vals.items():
            r[_F[name]] += float(v)
        r[_F["amax"]] = max(r[_F["amax"]].item(), x.abs().max().item() if x.numel() else 0.0)
        if q is None:
            return
        err = q.dq.detach().reshape(-1).double() - x
        scale = q.scale.detach().double()
        for name, v in {"numel_fp8": x.numel(), "fp8_adds": 1.0, "underflow": q.n_underflow.item(),
                        "overflow": q.n_overflow.item(), "sq_err": (err * err).sum(),
                        "scale_sum": scale.reshape(-1).median()}.items():
            r[_F[name]] += float(v)
        r[_F["scale_min"]] = min(r[_F["scale_min"]].item(), scale.min().item())
        r[_F["scale_max"]] = max(r[_F["scale_max"]].item(), scale.max().item())
        r[_F["recipe"]] = RECIPES.index(q.recipe) + 1 if q.recipe else 0
        r[_F["dtype"]] = _DTYPE_CODE[q.dtype]

    def to_tensor(self) -> torch.Tensor:
        return self._t.clone()

    def load_tensor(self, t: torch.Tensor) -> None:
        if t.numel() != self._t.numel():
            raise ValueError(f"fp8 stats vector has {t.numel()} entries, expected {self._t.numel()}")
        self._t = t.detach().to("cpu", torch.float64).reshape(-1).clone()

    @staticmethod
    def reduce_ops() -> dict[str, torch.Tensor]:
        """Indices into `to_tensor()` per reduction: {"sum": ..., "max": ..., "min": ...} (int64 index tensors)."""
        ops = {"sum": [], "max": [], "min": []}
        for i in range(len(ROLES)):
            for j, name in enumerate(FIELDS):
                ops[_REDUCE.get(name, "sum")].append(i * len(FIELDS) + j)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in ops.items()}

    def summary(self) -> dict[str, dict]:
        out = {}
        for role in ROLES:
            v = {name: self._row(role)[_F[name]].item() for name in FIELDS}
            if v["adds"] == 0:
                continue
            fp8 = v["numel_fp8"] > 0
            n, n8 = v["numel"], max(v["numel_fp8"], 1.0)
            q = {                                                   # FP8-only entries, None for high precision
                "recipe": RECIPES[int(v["recipe"]) - 1] if v["recipe"] > 0 else None,
                "dtype": _DTYPE_NAMES[int(v["dtype"]) - 1] if v["dtype"] > 0 else None,
                "scale": v["scale_sum"] / max(v["fp8_adds"], 1.0),
                "scale_min": v["scale_min"],
                "scale_max": v["scale_max"],
                "underflow_pct": 100.0 * v["underflow"] / n8,
                "overflow_pct": 100.0 * v["overflow"] / n8,
                "mse": v["sq_err"] / n8,
            }
            out[role] = {"fp8": fp8, "amax": v["amax"], "kurtosis": _kurtosis(n, v["s1"], v["s2"], v["s3"], v["s4"]),
                         "numel": int(n), **{k: (x if fp8 else None) for k, x in q.items()}}
        return out


def _kurtosis(n: float, s1: float, s2: float, s3: float, s4: float) -> float:
    """Pearson kurtosis E[(x-mu)^4] / var^2 from raw power sums."""
    mu, e2, e3, e4 = s1 / n, s2 / n, s3 / n, s4 / n
    var = e2 - mu * mu
    if not var > 0:
        return math.nan
    m4 = e4 - 4 * mu * e3 + 6 * mu * mu * e2 - 3 * mu ** 4
    return m4 / (var * var)
