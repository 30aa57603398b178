"""The figures of `genlip-fp8 report`: matplotlib on the Agg backend (headless), one PNG per figure.

Every function takes plain numbers (the report module has done the reading and the statistics) and a path, draws,
saves and closes its figure, so a long sweep's report does not accumulate open figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")               # no display on clusters and CI; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def loss_curves(path: Path, title: str, band: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                xlabel: str) -> Path:
    """Baseline band (mean ± 2σ and min–max over its seeds) and each other precision's mean loss, against tokens.

    band: {"x", "mean", "std", "min", "max", "name", "seeds"} (arrays over the matched steps); curves: name -> (x, y).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if band:
        x = band["x"]
        ax.fill_between(x, band["min"], band["max"], color="0.85", label=f"{band['name']} min–max ({band['seeds']} seeds)")
        ax.fill_between(x, band["mean"] - 2 * band["std"], band["mean"] + 2 * band["std"], color="tab:blue",
                        alpha=0.25, label=f"{band['name']} mean ± 2σ")
        ax.plot(x, band["mean"], color="tab:blue", lw=1.2, label=f"{band['name']} mean")
    colours = iter(f"C{i}" for i in range(1, 100))       # C0 (blue) is the baseline's
    for name, (x, y) in curves.items():
        ax.plot(x, y, lw=1.0, label=name, color=next(colours))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    _zoom_to_tail(ax, band, curves)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _zoom_to_tail(ax, band: dict, curves: dict) -> None:
    """The first steps' loss (ln V) dwarfs the differences that matter; clip the y axis to the later 80%."""
    ys = [band["max"], band["min"]] if band else []
    ys += [y for _, y in curves.values()]
    tails = [y[len(y) // 5:] for y in ys if len(y) >= 5]
    vals = np.concatenate(tails) if tails else np.array([])
    vals = vals[np.isfinite(vals)]
    if vals.size:
        lo, hi = float(vals.min()), float(vals.max())
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def gap_curves(path: Path, title: str, gaps: dict[str, dict], xlabel: str, floor_rel: float) -> Path:
    """Two panels: relative gap (%) and gap in units of the baseline's seed σ, per precision, against tokens.

    gaps: name -> {"x", "rel_pct", "sigmas"} (sigmas may be all NaN with one baseline seed).
    """
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, g) in enumerate(gaps.items(), 1):          # the colours of loss_curves
        a.plot(g["x"], g["rel_pct"], lw=1.0, label=name, color=f"C{i}")
        b.plot(g["x"], g["sigmas"], lw=1.0, label=name, color=f"C{i}")
    a.axhline(0, color="k", lw=0.6)
    for s in (100 * floor_rel, -100 * floor_rel):
        a.axhline(s, color="0.5", lw=0.6, ls=":")
    a.set_ylabel("(FP8 − baseline mean) / baseline mean, %")
    for s in (2, -2):
        b.axhline(s, color="tab:red", lw=0.6, ls="--")
    b.axhline(0, color="k", lw=0.6)
    b.set_ylabel("(FP8 − baseline mean) / baseline seed σ")
    for ax in (a, b):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def throughput(path: Path, labels: Sequence[str], ratio: Sequence[float], memory: Sequence[Optional[float]],
               mfu: Sequence[Optional[float]]) -> Path:
    """Bars per (size, precision): tokens/s relative to the baseline, peak memory and MFU (where known)."""
    plt = _plt()
    panels = 3 if any(m is not None for m in mfu) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels + 2, 0.35 * len(labels) + 1.8))
    y = np.arange(len(labels))
    values = [(ratio, "tokens/s vs baseline (×)", 1.0), (memory, "peak memory, GiB", None),
              (mfu, "MFU, % of bf16 peak", None)][:panels]
    for ax, (vals, name, ref) in zip(axes, values, strict=True):
        ax.barh(y, [np.nan if v is None else v for v in vals], color="tab:blue")
        if ref is not None:
            ax.axvline(ref, color="k", lw=0.8)
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(name)
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def heatmaps(path: Path, title: str, panels: list[tuple[str, np.ndarray, list[int], list[int]]]) -> Path:
    """One layer x iteration heatmap per panel: (name, matrix [layers, iterations], layers, iterations).
    NaN cells (layers kept in high precision, steps without stats) are left blank."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.25 * max(len(p[2]) for p in panels) + 2.5),
                             squeeze=False)
    for ax, (name, mat, layers, iters) in zip(axes[0], panels, strict=True):
        shown = np.ma.masked_invalid(mat)
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        ax.set_title(name, fontsize=10)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        step = max(1, len(iters) // 10)
        ax.set_xticks(range(0, len(iters), step), [str(x) for x in iters[::step]], fontsize=7)
        ax.set_xlabel("iteration")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    return _save(fig, path)
