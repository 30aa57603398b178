"""`genlip-fp8 report`: report.md and its figures, from the run dirs of a sweep (`results`).

For each size: a table per precision (final loss, gap to the baseline in absolute, σ and relative terms, speed,
memory, verdict) and per cell, the loss curves inside the baseline's seed band, and the gap at matched steps; then
throughput and memory, per-layer heatmaps of the FP8 statistics with the first offending layers, and the configs.
The verdict rule is `results.Rule` and is written out in the report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from genlip_mcore.fp8.results import (
    Rule,
    SizeSummary,
    Sweep,
    curves_for_size,
    load,
    offenders,
    read_jsonl,
    stats_matrix,
    summarize,
)

# ------------------------------------------------------------------------------------------------------------------
# report.md and the figures.
# ------------------------------------------------------------------------------------------------------------------
XLABEL = "tokens (packed rows × data.max_seq_len, padding included)"


def write_report(out: Path, rule: Optional[Rule] = None, baseline: Optional[str] = None, top: int = 3) -> Path:
    """report.md + PNGs in `out`; returns the report's path."""
    from genlip_mcore.fp8 import plots

    rule = rule or Rule()
    sw = load(out, baseline)
    summaries = summarize(sw, rule)
    md = [f"# FP8 sweep report: {sw.out.name}", "",
          f"Baseline precision: **{sw.baseline}**. Read from {len(sw.runs)} cell run dirs under `{sw.out}`"
          + (f" (sweep file `{sw.info['sweep_file']}`)." if sw.info.get("sweep_file") else "."), "",
          "Verdict rule: " + rule.text(), ""]
    for s in summaries:
        md += _size_section(sw, s, rule, plots)
    md += _speed_section(sw, summaries, plots)
    md += _stats_section(sw, plots, top)
    md += _config_section(sw)
    path = sw.out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _f(v, fmt: str = "{:.4f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _size_section(sw: Sweep, s: SizeSummary, rule: Rule, plots) -> list[str]:
    basis = "validation loss" if s.use_valid else f"mean of the last {rule.last_k} logged training losses"
    sigma = _f(s.sigma) if math.isfinite(s.sigma) else "unknown (one baseline seed: the floor alone applies)"
    md = [f"## Size `{s.size}`", "",
          f"Final loss F: {basis}. Baseline mean {_f(s.base_mean)}, seed σ {sigma}, threshold "
          f"{_f(rule.threshold(s.base_mean, s.sigma))}.", "",
          "| precision | setting | seeds | final loss | gap | gap/σ | rel gap % | tokens/s ratio | MFU | peak mem GiB "
          "| verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s.rows:
        md.append(f"| {r['precision']} | {r['precision_cfg']} | {r['seeds']} | {_f(r['final'])} | {_f(r['gap'], '{:+.4f}')} "
                  f"| {_f(r['sigmas'], '{:+.2f}')} | {_f(r['rel_pct'], '{:+.2f}')} | {_f(r['tps_ratio'], '{:.2f}')} "
                  f"| {_f(r['mfu'] and 100 * r['mfu'], '{:.1f}%')} | {_f(r['memory_gib'], '{:.2f}')} "
                  f"| **{r['verdict']}** |")
    md += ["", "<details><summary>cells</summary>", "", "| cell | status | final loss | gap | verdict | wall s | error |",
           "|---|---|---|---|---|---|---|"]
    for c in s.cells:
        err = (c["error"] or "").replace("|", "/")[:200]
        md.append(f"| {c['cell']} | {c['status']} | {_f(c['final'])} | {_f(c['gap'], '{:+.4f}')} | {c['verdict']} "
                  f"| {_f(c['wall_s'], '{:.0f}')} | {err} |")
    md += ["", "</details>", ""]
    band, curves = curves_for_size(sw, s.size)
    if band:
        p = plots.loss_curves(sw.out / f"loss_{s.size}.png", f"{s.size}: training loss", band, curves, XLABEL)
        md += [f"![loss curves {s.size}]({p.name})", "",
               f"*How to read:* the grey area is the spread (min–max) of the {band['seeds']} {sw.baseline} seeds, the "
               f"blue band their mean ± 2σ at each logged step; an FP8 curve inside the blue band is "
               f"indistinguishable from a reseeded baseline. The y axis skips the first fifth of the run.", ""]
        band_s, smooth = curves_for_size(sw, s.size, smooth=rule.last_k)
        gaps = {}
        for name, (x, y) in smooth.items():
            sig = np.where(band_s["std"] > 0, band_s["std"], np.nan)
            gaps[name] = {"x": x, "rel_pct": 100 * (y - band_s["mean"]) / band_s["mean"],
                          "sigmas": (y - band_s["mean"]) / sig}
        if gaps:
            p = plots.gap_curves(sw.out / f"gap_{s.size}.png", f"{s.size}: FP8 − {sw.baseline} at matched steps",
                                 gaps, XLABEL, rule.floor_rel)
            md += [f"![gap {s.size}]({p.name})", "",
                   f"*How to read:* losses smoothed over {rule.last_k} logged steps, compared at the same step (same "
                   f"tokens and data order). Left: the gap relative to the baseline mean (dotted: ±{100 * rule.floor_rel:g}%"
                   f" floor); right: in units of the baseline seeds' σ at that step (dashed: ±2σ). A curve drifting "
                   f"up and out of ±2σ is a real FP8 loss; one that wanders inside is noise.", ""]
    return md


def _speed_section(sw: Sweep, summaries: list[SizeSummary], plots) -> list[str]:
    labels, ratio, mem, mfu = [], [], [], []
    for s in summaries:
        for r in s.rows:
            labels.append(f"{s.size}/{r['precision']}")
            ratio.append(r["tps_ratio"])
            mem.append(r["memory_gib"])
            mfu.append(None if r["mfu"] is None else 100 * r["mfu"])
    if not any(v is not None for v in ratio):
        return []
    p = plots.throughput(sw.out / "throughput.png", labels, ratio, mem, mfu)
    return ["## Throughput and memory", "", f"![throughput]({p.name})", "",
            "*How to read:* median tokens/s over the logged steps (the first one is warm-up and left out) relative "
            "to the baseline of the same size; peak memory is the trainer's `memory_gib` (CUDA peak allocated on a "
            "GPU, process RSS on CPU). Emulated FP8 (fp8_backend=emulate) is slower than the baseline by design: "
            "its ratios say nothing about FP8 hardware (see `genlip-fp8 bench`).", ""]


def _stats_section(sw: Sweep, plots, top: int) -> list[str]:
    md = ["## Per-layer FP8 statistics", ""]
    listed = []
    for size in sw.sizes:
        for prec in sw.precisions:
            runs = [r for r in sw.runs if r.size == size and r.precision == prec
                    and (r.run_dir / "fp8_stats.jsonl").exists()]
            if not runs:
                continue
            run = runs[0]
            rows = read_jsonl(run.run_dir / "fp8_stats.jsonl")
            if not rows:
                continue
            panels = [("gradient underflow % (max over GEMMs)", *stats_matrix(rows, "gradient", "underflow_pct")),
                      ("activation kurtosis (max over GEMMs)", *stats_matrix(rows, "activation", "kurtosis"))]
            p = plots.heatmaps(sw.out / f"heatmap_{size}_{prec}.png", f"{run.name}: layer × iteration", panels)
            md += [f"### {run.name}", "", f"![heatmap {run.name}]({p.name})", ""]
            listed.append((run.name, offenders(rows, top)))
    if not listed:
        return []
    md[2:2] = ["*How to read:* one row per transformer layer (global, 1-based), one column per logged iteration. "
               "Left: the share of gradient elements that flush to zero in FP8 (blank: the layer ran in high "
               "precision); right: the kurtosis of the GEMM inputs (3 for a Gaussian; growth means outlier channels, "
               "the early warning of FP8 divergence in Fishman et al. and FOG). Only the first seed of each "
               "precision is drawn.", ""]
    md += ["### First offending layers", "",
           "Per cell, the layer × GEMM series that lead each sign: peak gradient underflow, activation kurtosis growth "
           "(last / first logged value), peak overflow (clipped elements). Candidates for "
           "`precision.first_last_layers_bf16` or a per-module high-precision override.", ""]
    for name, found in listed:
        items = [f"{sign}: " + ", ".join(f"layer {x['layer']} {x['gemm']} {x['tensor']} {x['value']:.3g} ({x['detail']})"
                                        for x in xs) for sign, xs in found.items() if xs]
        md.append(f"- **{name}**: " + ("; ".join(items) if items else "none (no underflow, overflow or kurtosis "
                                                                       "growth logged)"))
    return md + [""]


CONFIG_KEYS = (("model", "num_layers"), ("model", "hidden_size"), ("model", "ffn_hidden_size"),
               ("model", "num_attention_heads"), ("data", "max_seq_len"), ("training", "global_batch_size"),
               ("training", "train_iters"), ("optimizer", "lr"), ("parallel", "tensor_model_parallel_size"),
               ("precision", "bf16"), ("precision", "fp8"), ("precision", "fp8_recipe"), ("precision", "fp8_backend"),
               ("precision", "first_last_layers_bf16"), ("logging", "fp8_stats_interval"))


def _config_section(sw: Sweep) -> list[str]:
    """One row per (size, precision): the fields that define a scaling cell, from the first seed's recorded config."""
    head = [f"{s}.{k}" for s, k in CONFIG_KEYS]
    md = ["## Configurations", "", f"Base `{sw.info.get('base', '?')}`, sweep overrides "
          f"`{' '.join(sw.info.get('overrides', [])) or '-'}`.", "",
          "| cell | " + " | ".join(k.split(".", 1)[1] for k in head) + " |", "|---" * (len(head) + 1) + "|"]
    seen = set()
    for r in sw.runs:
        key = (r.size, r.precision)
        if key in seen:
            continue
        seen.add(key)
        cfg = r.record.get("config", {})
        fp8 = cfg.get("precision", {}).get("fp8") is not None
        # FP8 fields of a high-precision cell are unused defaults: shown as "-", not as a recipe it never ran
        md.append(f"| {r.size}/{r.precision} | " + " | ".join(
            "-" if s == "precision" and k.startswith("fp8_") and not fp8 else str(cfg.get(s, {}).get(k, "-"))
            for s, k in CONFIG_KEYS) + " |")
    return md + [""]
