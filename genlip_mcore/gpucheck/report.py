"""gpu_report.md: the JSON report as tables a reader can paste into the README or an issue."""

from __future__ import annotations

from typing import Any, Optional


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _header(r: dict) -> list[str]:
    env, pk = r["environment"], r["environment"]["packages"]
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    lines = [f"# GenLIP GPU check ({r['mode']})", "",
             f"- started {r['started']}, {_f(r.get('wall_s'), '{:.0f}')} s of a {r['budget_s']:.0f} s budget; "
             f"status **{r.get('status', 'running')}**",
             f"- GPU: {env['gpu'] or 'none'}; {env['cpu_count']} CPU cores; Python {env['python']}",
             f"- packages: {versions}",
             f"- commit: {env['commit'] or 'unknown (no git checkout here)'}"]
    if env.get("wheels"):
        lines.append(f"- carried wheels: {env['wheels']}")
    lines += ["", "Command: `bash scripts/gpu_check.sh" + (" --smoke" if r["mode"] == "smoke" else "")
              + " --out DIR`", ""]
    rows = [[name, st["status"], f"{st['wall_s']:.0f} / {st['budget_s']:.0f}", st.get("reason", "")]
            for name, st in r["stages"].items()]
    return lines + _table(["stage", "status", "wall / budget s", "reason"], rows)


def _correctness(res: dict) -> list[str]:
    s = res.get("summary") or {}
    lines = [f"`{res.get('command', '')}`: exit code {res.get('exit_code')}; "
             + ", ".join(f"{v} {k}" for k, v in s.items()), ""]
    rows = [[f"`{t['id']}`", t["outcome"], _f(t["seconds"]), (t["message"] or "").replace("\n", " ")[:160]]
            for t in res.get("tests", [])]
    return lines + _table(["test", "outcome", "s", "message"], rows)


def _attention(res: dict) -> list[str]:
    c = res.get("config", {})
    lines = [f"{res.get('device')}: one row of {c.get('tokens')} tokens, {c.get('heads')} heads x head_dim "
             f"{c.get('head_dim')}, {c.get('dtype')}; errors are relative max errors against {c.get('truth')}; "
             f"median of {c.get('repeats')}.", ""]
    rows = []
    for kind, entry in (res.get("packs") or {}).items():
        row = entry["row"]
        for name, k in entry["kernels"].items():
            shape = f"{kind} ({row['samples']} samples)"
            if "skipped" in k or "error" in k:
                rows.append([shape, name, "skipped: " + k["skipped"] if "skipped" in k else "error: " + k["error"],
                             "", "", "", "", "", "", ""])
                continue
            e = k["rel_err"]
            rows.append([shape, name, _f(k["fwd_ms"], "{:.2f}"), _f(k["fwd_bwd_ms"], "{:.2f}"), _f(k["peak_mib"]),
                         *(f"{e[w]:.1e}" for w in ("out", "dq", "dk", "dv")),
                         entry.get("flex_agrees", "") if name == "flex" else ""])
    return lines + _table(["row", "kernel", "fwd ms", "fwd+bwd ms", "peak MiB", "out", "dq", "dk", "dv",
                           "flex agrees"], rows)


def _throughput(results: dict) -> list[str]:
    rows, notes = [], []
    for variant, res in results.items():
        if not res:
            continue
        head = (f"{variant}: {res.get('parameters', 0):,} parameters, {res.get('world')}, recompute "
                f"{res.get('recompute')}, {res.get('parallel')}, static memory "
                f"{_f(res.get('static_memory_gib'), '{:.1f} GiB')}, built in {_f(res.get('build_s'))} s")
        ms = {(r["pack"], r["backend"]): r["ms_per_step"] for r in res.get("runs", []) if "ms_per_step" in r}
        ratios = [f"{pack} {ms[(pack, 'local')] / ms[(pack, 'flex')]:.2f}x" for pack in dict.fromkeys(p for p, _ in ms)
                  if (pack, "local") in ms and (pack, "flex") in ms]
        if ratios:
            head += "; flex steps faster than local by " + ", ".join(ratios)
        notes.append("- " + head + (f"; {res['mfu_note']}" if res.get("mfu_note") else ""))
        for run in res.get("runs", []):
            label = [variant, f"{run['pack']} ({run['row']['samples']})", run["backend"]]
            if "ms_per_step" not in run:
                why = run.get("skipped") or run.get("error", "")
                rows.append(label + [("skipped: " if "skipped" in run else "error: ") + why] + [""] * 11)
                continue
            p = run["profile"]
            fr = p["fraction_of_step"]
            rows.append(label + [_f(run["ms_per_step"]), f"{run['tokens_per_s']:,.0f}", _f(run["samples_per_s"]),
                                 _f(run["tflops"], "{:.3g}"), _pct(run["mfu"]), _f(run["peak_memory_gib"], "{:.2f}"),
                                 _pct(fr["attention"]), _pct(fr["gemm"]), _pct(fr["optimizer"]), _pct(fr["other"]),
                                 _pct(p["idle_fraction"]), p["host_syncs"]])
    head = ["variant", "pack (samples)", "attention", "ms/step", "tokens/s", "samples/s", "TFLOP/s", "MFU",
            "peak GiB", "attn", "GEMM", "optim", "other", "idle", "host syncs"]
    basis = ("Fractions are of the profiled step's wall time (device time of each op's kernels on a GPU, self CPU "
             "time on CPU); idle = time no attributed work ran. TFLOP/s and MFU count model FLOPs "
             "(train/metrics.py step_flops, no recompute).")
    return notes + [""] + _table(head, rows) + [basis, ""]


def _loader(res: dict) -> list[str]:
    sh = res.get("shards") or {}
    lines = [f"Pillow decode, {sh.get('samples')} generated shapes samples in {sh.get('shards')} shards (sides "
             f"80-{sh.get('max_side_px')} px), rows of {res.get('max_seq_len')} tokens; rates over the second half "
             f"of each window, after one row per worker.", ""]
    rows = []
    for run in res.get("runs", []):
        vs = ", ".join(f"{v} {x:.1f}x" for v, x in run.get("vs_one_gpu", {}).items()) or "-"
        rows.append([run["stage"], run["workers"], _f(run["samples_per_s"]), _f(run["samples_per_s_per_worker"]),
                     f"{run['tokens_per_s']:,.0f}", _f(run["samples_per_row"]), vs])
    lines += _table(["stage", "workers", "samples/s", "per worker", "tokens/s", "samples/row",
                     "vs one GPU's consumption"], rows)
    if res.get("note"):
        lines += [res["note"], ""]
    return lines


def _fp8(res: dict) -> list[str]:
    pk = {"Transformer Engine": res.get("transformer_engine"), "torchao": res.get("torchao"),
          "nvdlfw-inspect": res.get("nvdlfw_inspect")}
    lines = [f"{res.get('device')}; " + ", ".join(f"{k}: {v if v not in (None, False) else 'absent'}"
                                                  for k, v in pk.items()), ""]
    tests = res.get("tests") or {}
    lines += ["### FP8 tests", ""]
    lines += [f"skipped: {tests['skipped']}", ""] if "skipped" in tests else _correctness(tests)
    bench = res.get("bench") or {}
    lines += ["### GEMM benchmark", ""]
    if "skipped" in bench:
        return lines + [f"skipped: {bench['skipped']}", ""]
    lines += [f"`{bench.get('command', '')}`: exit code {bench.get('exit_code')} in {_f(bench.get('wall_s'))} s "
              f"(log `{bench.get('log')}`)", ""]
    figures = bench.get("figures")
    rows = figures.get("rows") if isinstance(figures, dict) else figures       # a list of rows, or {"rows": [...]}
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        head = list(dict.fromkeys(k for r in rows for k in r))
        lines += _table(head, [[_cell(r.get(k)) for k in head] for r in rows])
    elif figures is not None:
        lines += ["Figures (JSON) are in gpu_report.json.", ""]
    if bench.get("figures_error"):
        lines += [bench["figures_error"], ""]
    if bench.get("output_tail"):
        lines += ["```", bench["output_tail"], "```", ""]
    return lines


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def markdown(r: dict) -> str:
    lines = _header(r)
    render = {"correctness": _correctness, "attention": _attention, "throughput": _throughput, "loader": _loader,
              "fp8": _fp8}
    for name, st in r["stages"].items():
        lines += [f"## {name}: {st['status']}", ""]
        if st.get("reason"):
            lines += [st["reason"], ""]
        if name in render and st.get("results"):
            try:
                lines += render[name](st["results"])
            except (KeyError, TypeError, ValueError) as e:     # a partial result: the JSON still has it all
                lines += [f"(could not render these results: {type(e).__name__}: {e}; see gpu_report.json)", ""]
        if st.get("error"):
            lines += ["```", st["error"], "```", ""]
    return "\n".join(lines)
