"""The results of a sweep, read from its run dirs alone, and the statistics `report` judges them by.

Reads `<out>/sweep.json` (written by `run`: sizes, precisions, baseline, in order) and, per cell, `cell.json`,
`metrics.jsonl` and `fp8_stats.jsonl`. Nothing is re-run or asked of slurm. metrics.jsonl is appended to on resume,
so of rows of one kind (training rows carry `loss`, validation rows `valid_loss`) at one iteration the last counts.

The verdict rule, per cell and per precision (the mean over its seeds), with F the final loss:
  F            validation loss of the last validation row when every finished cell of the size has one, else the
               mean training loss of the last k logged rows (`--last-k`)
  gap          F - mean over the baseline seeds of F;  σ: their sample standard deviation (n-1)
  threshold    max(2σ, floor_rel x baseline mean)  -- the floor keeps σ≈0 (or one seed) from calling every cell
               degraded; its default 0.25% is DeepSeek-V3's relative-error bar for FP8 against BF16
  diverged     the run failed, a logged loss was non-finite, or gap > max(5 x threshold, 10% of the baseline mean)
  within noise |gap| <= threshold
  degraded     gap > threshold;  below band: gap < -threshold (lower than every plausible baseline: check it)
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from genlip_mcore.fp8.run import CELL_FILE, SWEEP_FILE


@dataclass
class Run:
    size: str
    precision: str
    seed: int
    run_dir: Path
    record: dict
    train: list[dict] = field(default_factory=list)     # one row per iteration, sorted
    valid: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.size}/{self.precision}/seed{self.seed}"

    @property
    def status(self) -> str:
        """done | failed | incomplete, read from the record (a slurm cell that reached its end counts as done)."""
        s = self.record.get("status")
        end, last = self.record.get("train_iters"), self.train[-1]["iteration"] if self.train else None
        if s == "done" or (s == "submitted" and end is not None and last is not None and last >= end):
            return "done"
        return "failed" if s == "failed" else "incomplete"

    @property
    def nonfinite(self) -> bool:
        """A training loss the trainer logged as null (metrics rows store non-finite numbers as null)."""
        return any(r.get("loss") is None for r in self.train)

    def x_tokens(self) -> np.ndarray:
        cfg = self.record.get("config", {})
        seq = cfg.get("data", {}).get("max_seq_len", 1)
        gbs = cfg.get("training", {}).get("global_batch_size", 1)
        return np.array([r.get("consumed_samples") or r["iteration"] * gbs for r in self.train], float) * seq


@dataclass
class Sweep:
    out: Path
    sizes: list[str]
    precisions: list[str]
    baseline: str
    runs: list[Run]
    info: dict


# ------------------------------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:        # a line cut by a crash
                    continue
    except FileNotFoundError:
        pass
    return rows


def _last_per_iteration(rows: list[dict]) -> list[dict]:
    by_it = {}
    for r in rows:
        if isinstance(r.get("iteration"), int):
            by_it[r["iteration"]] = r
    return [by_it[i] for i in sorted(by_it)]


def load(out: Path, baseline: Optional[str] = None) -> Sweep:
    out = Path(out)
    info = json.loads((out / SWEEP_FILE).read_text()) if (out / SWEEP_FILE).exists() else {}
    runs = []
    for cell_file in sorted(out.glob(f"*/*/seed*/{CELL_FILE}")):
        record = json.loads(cell_file.read_text())
        rows = read_jsonl(cell_file.parent / "metrics.jsonl")
        runs.append(Run(size=record["size"], precision=record["precision"], seed=int(record["seed"]),
                        run_dir=cell_file.parent, record=record,
                        train=_last_per_iteration([r for r in rows if "loss" in r]),
                        valid=_last_per_iteration([r for r in rows if "valid_loss" in r])))
    if not runs:
        raise FileNotFoundError(f"{out}: no cell run dirs (<size>/<precision>/seed<k>/{CELL_FILE}); run the sweep first")
    sizes = [s for s in info.get("sizes", {}) if any(r.size == s for r in runs)] or sorted({r.size for r in runs})
    precisions = ([p for p in info.get("precisions", {}) if any(r.precision == p for r in runs)]
                  or sorted({r.precision for r in runs}))
    runs.sort(key=lambda r: (_index(sizes, r.size), _index(precisions, r.precision), r.seed))
    baseline = baseline or info.get("baseline")
    if baseline not in precisions:
        raise ValueError(f"{out}: baseline {baseline!r} has no runs (precisions: {precisions}); pass --baseline")
    return Sweep(out, sizes, precisions, baseline, runs, info)


def _index(names: list[str], name: str) -> int:
    return names.index(name) if name in names else len(names)


# ------------------------------------------------------------------------------------------------------------------
# Statistics.
# ------------------------------------------------------------------------------------------------------------------
def final_loss(run: Run, last_k: int, use_valid: bool) -> float:
    if use_valid:
        v = run.valid[-1].get("valid_loss") if run.valid else None
        return float("nan") if v is None else float(v)
    losses = [r.get("loss") for r in run.train[-last_k:]]
    if not losses or any(x is None for x in losses):
        return float("nan")
    return float(statistics.fmean(losses))


def _median(values) -> Optional[float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def speed(run: Run) -> dict:
    """Median tokens/s and MFU over the logged rows (the first is warm-up when there are others); peak memory."""
    rows = run.train[1:] if len(run.train) > 1 else run.train
    mem = [r.get("memory_gib") for r in run.train if r.get("memory_gib") is not None]
    return {"tokens_per_sec": _median(r.get("tokens_per_sec") for r in rows),
            "mfu": _median(r.get("mfu") for r in rows), "memory_gib": max(mem) if mem else None}


@dataclass
class Rule:
    last_k: int = 5
    floor_rel: float = 0.0025
    diverged_factor: float = 5.0
    diverged_rel: float = 0.10

    def verdict(self, gap: float, base_mean: float, sigma: float, failed: bool = False) -> str:
        if failed or not math.isfinite(gap):
            return "diverged"
        threshold = self.threshold(base_mean, sigma)
        if gap > max(self.diverged_factor * threshold, self.diverged_rel * abs(base_mean)):
            return "diverged"
        if abs(gap) <= threshold:
            return "within noise"
        return "degraded" if gap > 0 else "below band"

    def threshold(self, base_mean: float, sigma: float) -> float:
        two_sigma = 2 * sigma if math.isfinite(sigma) else 0.0
        return max(two_sigma, self.floor_rel * abs(base_mean))

    def text(self) -> str:
        return (f"F = final loss (validation loss when every finished cell of the size has one, else the mean of "
                f"the last {self.last_k} logged training losses); gap = F − mean of the baseline seeds' F; σ = their "
                f"sample standard deviation. **within noise**: |gap| ≤ max(2σ, {100 * self.floor_rel:g}% of the "
                f"baseline mean) (the floor keeps σ≈0, or a single baseline seed, from calling everything degraded); "
                f"**degraded**: gap above that; **below band**: gap below minus that (lower loss than the baseline "
                f"band: worth a look); **diverged**: failed run, non-finite loss, or gap > max({self.diverged_factor:g}"
                f" × threshold, {100 * self.diverged_rel:g}% of the baseline mean).")


@dataclass
class SizeSummary:
    size: str
    use_valid: bool
    base_mean: float
    sigma: float
    rows: list[dict]            # per precision
    cells: list[dict]           # per cell


def summarize(sw: Sweep, rule: Rule) -> list[SizeSummary]:
    out = []
    for size in sw.sizes:
        runs = [r for r in sw.runs if r.size == size]
        done = [r for r in runs if r.status == "done"]
        use_valid = bool(done) and all(r.valid for r in done)
        finals = {r.name: final_loss(r, rule.last_k, use_valid) for r in done}
        base = [finals[r.name] for r in done if r.precision == sw.baseline and math.isfinite(finals[r.name])]
        base_mean = statistics.fmean(base) if base else float("nan")
        sigma = statistics.stdev(base) if len(base) >= 2 else float("nan")
        base_speed = [speed(r) for r in done if r.precision == sw.baseline]
        base_tps = _median(s["tokens_per_sec"] for s in base_speed)
        cells = [_cell_row(r, finals.get(r.name, float("nan")), base_mean, sigma, rule, sw.baseline) for r in runs]
        rows = [_precision_row(p, [r for r in runs if r.precision == p], finals, base_mean, sigma, base_tps, rule,
                               sw.baseline) for p in sw.precisions if any(r.precision == p for r in runs)]
        out.append(SizeSummary(size, use_valid, base_mean, sigma, rows, cells))
    return out


def _cell_row(r: Run, final: float, base_mean: float, sigma: float, rule: Rule, baseline: str) -> dict:
    failed = r.status == "failed" or r.nonfinite
    gap = final - base_mean
    if r.status == "incomplete":
        verdict = "incomplete"
    elif r.precision == baseline and not failed:
        verdict = "baseline"
    elif not failed and not math.isfinite(base_mean):
        verdict = "no baseline"                     # no finished baseline seed to judge against
    else:
        verdict = rule.verdict(gap, base_mean, sigma, failed)
    return {"cell": r.name, "status": r.status, "final": final, "gap": gap, "verdict": verdict,
            "wall_s": r.record.get("wall_s"), "error": r.record.get("error")}


def _precision_row(p: str, runs: list[Run], finals: dict, base_mean: float, sigma: float,
                   base_tps: Optional[float], rule: Rule, baseline: str) -> dict:
    done = [r for r in runs if r.status == "done"]
    vals = [finals[r.name] for r in done]
    final = statistics.fmean(vals) if vals and all(math.isfinite(v) for v in vals) else float("nan")
    failed = any(r.status == "failed" for r in runs) or any(r.nonfinite for r in done)
    gap = final - base_mean
    speeds = [speed(r) for r in done]
    tps = _median(s["tokens_per_sec"] for s in speeds)
    mem = [s["memory_gib"] for s in speeds if s["memory_gib"] is not None]
    if not done and not failed:
        verdict = "incomplete"
    elif p == baseline and not failed:
        verdict = "baseline"
    elif not failed and not math.isfinite(base_mean):
        verdict = "no baseline"
    else:
        verdict = rule.verdict(gap, base_mean, sigma, failed)
    return {"precision": p, "seeds": f"{len(done)}/{len(runs)}", "final": final, "gap": gap,
            "sigmas": gap / sigma if math.isfinite(sigma) and sigma > 0 else float("nan"),
            "rel_pct": 100 * gap / base_mean if base_mean else float("nan"),
            "tps_ratio": tps / base_tps if tps and base_tps else None,
            "mfu": _median(s["mfu"] for s in speeds), "memory_gib": max(mem) if mem else None,
            "verdict": verdict, "precision_cfg": _precision_desc(done[0] if done else (runs[0] if runs else None))}


def _precision_desc(run: Optional[Run]) -> str:
    pr = (run.record.get("config", {}) if run else {}).get("precision", {})
    if not pr or pr.get("fp8") is None:
        return "bf16" if pr.get("bf16") else "fp32"
    extra = " first/last high precision" if pr.get("first_last_layers_bf16") else ""
    return f"{pr['fp8']} {pr['fp8_recipe']} ({pr.get('fp8_backend', 'auto')}){extra}"


# ------------------------------------------------------------------------------------------------------------------
# Curves (matched steps) and FP8 statistics.
# ------------------------------------------------------------------------------------------------------------------
def _matched(runs: list[Run], smooth: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Iterations every run logged, their tokens, and the losses [runs, steps] (NaN for null), optionally a
    trailing mean over `smooth` logged points (single-step losses are noisy)."""
    common = set.intersection(*[{r["iteration"] for r in run.train} for run in runs])
    its = np.array(sorted(common))
    first = runs[0]
    x = first.x_tokens()[[i for i, r in enumerate(first.train) if r["iteration"] in common]]
    ys = np.array([[np.nan if r.get("loss") is None else r["loss"] for r in run.train if r["iteration"] in common]
                   for run in runs], float)
    if smooth > 1 and ys.shape[1]:
        kernel = np.ones(smooth) / smooth
        ys = np.array([np.convolve(np.concatenate([np.full(smooth - 1, y[0]), y]), kernel, "valid") for y in ys])
    return its, x, ys


def curves_for_size(sw: Sweep, size: str, smooth: int = 1) -> tuple[dict, dict]:
    """(band, {precision: (x, mean loss)}) over the steps all finished runs of the size logged."""
    done = [r for r in sw.runs if r.size == size and r.status == "done" and r.train]
    base = [r for r in done if r.precision == sw.baseline]
    if not base:
        return {}, {}
    _, x, ys = _matched(done, smooth)
    names = [r.precision for r in done]
    b = ys[[i for i, n in enumerate(names) if n == sw.baseline]]
    std = b.std(axis=0, ddof=1) if len(b) > 1 else np.zeros(b.shape[1])
    band = {"x": x, "mean": b.mean(axis=0), "std": std, "min": b.min(axis=0), "max": b.max(axis=0),
            "name": sw.baseline, "seeds": len(b)}
    curves = {}
    for p in sw.precisions:
        rows = [i for i, n in enumerate(names) if n == p]
        if p != sw.baseline and rows:
            curves[p] = (x, ys[rows].mean(axis=0))
    return band, curves


def stats_matrix(rows: list[dict], tensor: str, key: str) -> tuple[np.ndarray, list[int], list[int]]:
    """[layers, iterations] of the max over a layer's GEMMs of `key` for `tensor`; NaN where nothing was logged
    (or the value was null, e.g. underflow of a layer kept in high precision)."""
    picked = [r for r in rows if r.get("tensor") == tensor and r.get(key) is not None]
    layers = sorted({r["layer"] for r in rows})
    iters = sorted({r["iteration"] for r in rows})
    mat = np.full((len(layers), len(iters)), np.nan)
    li, ii = {v: i for i, v in enumerate(layers)}, {v: i for i, v in enumerate(iters)}
    for r in picked:
        a, b = li[r["layer"]], ii[r["iteration"]]
        mat[a, b] = np.fmax(mat[a, b], float(r[key]))
    return mat, layers, iters


def offenders(rows: list[dict], top: int = 3) -> dict[str, list[dict]]:
    """The layer x GEMM x tensor series that lead each warning sign: the largest gradient underflow, the largest
    activation kurtosis growth (last over first logged value) and the largest overflow of any tensor."""
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["layer"], r["gemm"], r["tensor"]), []).append(r)
    found = {"gradient underflow %": [], "activation kurtosis growth": [], "overflow %": []}
    for (layer, gemm, tensor), rs in series.items():
        rs.sort(key=lambda r: r["iteration"])
        where = {"layer": layer, "gemm": gemm, "tensor": tensor}
        if tensor == "gradient":
            _peak(found["gradient underflow %"], rs, "underflow_pct", where)
        _peak(found["overflow %"], rs, "overflow_pct", where)
        k = [(r["iteration"], r["kurtosis"]) for r in rs if r.get("kurtosis") is not None]
        if tensor == "activation" and len(k) >= 2 and k[0][1] > 0:
            found["activation kurtosis growth"].append({**where, "value": k[-1][1] / k[0][1], "iteration": k[-1][0],
                                                        "detail": f"{k[0][1]:.3g} → {k[-1][1]:.3g}"})
    return {name: sorted([x for x in v if x["value"] > 0], key=lambda x: -x["value"])[:top]
            for name, v in found.items()}


def _peak(out: list, rs: list[dict], key: str, where: dict) -> None:
    vals = [(r[key], r["iteration"]) for r in rs if r.get(key) is not None]
    if vals:
        v, it = max(vals)
        out.append({**where, "value": v, "iteration": it, "detail": f"max at iteration {it}"})
