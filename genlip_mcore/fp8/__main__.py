"""`genlip-fp8`: FP8 scaling experiments over one sweep file (also `python -m genlip_mcore.fp8`, `tools/fp8.py`).

    genlip-fp8 plan examples/fp8/cpu_sweep.yaml              # expand + validate every cell, print them
    genlip-fp8 run examples/fp8/cpu_sweep.yaml --report      # launch what is not done yet, then write the report
    genlip-fp8 report runs/fp8_cpu_sweep                     # report.md + PNGs from the run dirs (or the sweep file)
    genlip-fp8 bench --variant l16 --variant g16 --tp 2      # BF16 vs FP8 GEMMs on the block's shapes

Exit status: 0 done; 1 a cell failed (the others still ran) or the report found nothing to read; 2 a sweep or config
error (every invalid cell named, with its field), before anything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from genlip_mcore import logs

log = logging.getLogger("genlip_mcore.fp8")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="genlip-fp8", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="expand and validate every cell; print them")
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed MFU of the GPU-hours estimate (slurm sweeps)")

    r = sub.add_parser("run", help="launch every cell that is not done (resumable)")
    r.add_argument("sweep", help="sweep YAML file")
    r.add_argument("--jobs", type=int, default=None, help="local: cells at once (default: the sweep's `jobs`)")
    r.add_argument("--force", action="store_true", help="re-run finished cells too")
    r.add_argument("--dry-run", action="store_true",
                   help="print the launches, start nothing (also DRY_RUN=1, the slurm script's convention)")
    r.add_argument("--timeout", type=float, default=None, help="local: seconds before a cell is killed and failed")
    r.add_argument("--report", action="store_true", help="write the report afterwards (failed cells included)")
    _report_args(r)

    rep = sub.add_parser("report", help="report.md + PNGs from the run dirs")
    rep.add_argument("target", help="the sweep's out directory, or the sweep file (its `out` is read)")
    _report_args(rep)

    b = sub.add_parser("bench", help="time BF16 against FP8 GEMMs on the model's shapes")
    b.add_argument("--variant", action="extend", nargs="+", choices=("tiny", "l16", "so16", "g16"),
                   help="model variants (several after one flag, or the flag repeated; default l16)")
    b.add_argument("--tp", type=int, default=1, help="tensor parallel size (divides the sharded dimension)")
    b.add_argument("--tokens", type=int, default=262144,
                   help="tokens per micro-batch, M (default: 16 rows x 16384, the stage-1 configs)")
    b.add_argument("--cpu-tokens", type=int, default=1024, help="M measured where there is no FP8 hardware")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--json", metavar="FILE", default=None, help="also write the figures as one JSON object to FILE "
                   "('-': print it instead of the tables)")
    return ap


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", default=None, help="reference precision (default: the sweep's `baseline`)")
    p.add_argument("--last-k", type=int, default=5, help="logged training losses averaged for the final loss")
    p.add_argument("--floor-rel", type=float, default=0.0025,
                   help="noise floor relative to the baseline loss (default 0.25%%)")
    p.add_argument("--top", type=int, default=3, help="offending layers listed per sign")


def _load(path: str):
    from genlip_mcore.fp8 import sweep as S

    sw = S.load_sweep(path)
    return sw, S.plan(sw)


def cmd_plan(args) -> int:
    from genlip_mcore.fp8 import sweep as S

    sw, planned = _load(args.sweep)
    print(S.format_plan(sw, planned, args.mfu))
    return 0


def cmd_run(args) -> int:
    from genlip_mcore.fp8 import run as R

    sw, planned = _load(args.sweep)
    dry = args.dry_run or R.dry_run_requested()
    log.info(f"{len(planned)} cells valid; launcher {sw.launcher}" + (" (dry run)" if dry else ""))
    outcomes = R.run_sweep(sw, planned, jobs=args.jobs, force=args.force, dry_run=dry, timeout_s=args.timeout)
    width = max(len(o.cell.name) for o in outcomes)
    for o in outcomes:
        print(f"{o.cell.name:{width}}  {o.status:9}  {o.detail}")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} cells failed; `genlip-fp8 run` again re-runs them "
              f"(logs: <run dir>/{R.LAUNCH_LOG})")
    if args.report and not dry:
        _report(sw.out, args)
    return 1 if failed else 0


def _report(out: Path, args) -> Path:
    from genlip_mcore.fp8.report import write_report
    from genlip_mcore.fp8.results import Rule

    rule = Rule(last_k=args.last_k, floor_rel=args.floor_rel)
    path = write_report(out, rule, args.baseline, args.top)
    print(f"report: {path}")
    return path


def cmd_report(args) -> int:
    target = Path(args.target)
    if target.is_file():
        from genlip_mcore.fp8 import sweep as S

        target = S.load_sweep(target).out
    try:
        _report(target, args)
    except (FileNotFoundError, ValueError) as e:
        print(f"genlip-fp8: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from genlip_mcore.fp8 import bench

    try:
        r = bench.run_bench(args.variant or ["l16"], args.tp, args.tokens, args.cpu_tokens, args.warmup, args.repeats)
    except ValueError as e:
        print(f"genlip-fp8 bench: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(r))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    print(bench.format_bench(r))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup()
    from genlip_mcore.fp8.sweep import SweepError

    try:
        return {"plan": cmd_plan, "run": cmd_run, "report": cmd_report, "bench": cmd_bench}[args.command](args)
    except SweepError as e:
        print(f"genlip-fp8: sweep error:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
