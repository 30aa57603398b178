"""The check's driver: the plan of jobs, one process per job under a time budget, and the report after each stage.

The driver itself imports neither torch nor Megatron: each job runs in its own process (`<worker> --worker JOB`),
so a job that hangs, crashes or poisons its CUDA context (an illegal address, a leaked compile worker) is killed
at its budget with its whole process group, and the next job starts clean. A job writes its results to a JSON
file after every measurement, so a job killed half-way still reports what it measured. Every stage ends with a
status: ok, failed (it ran and found a problem), error (it crashed), timeout, or skipped (with the reason).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("correctness", "attention", "throughput", "loader", "fp8")

# Sizes per mode. gpu: what the issue asks for on one H100/H200; smoke: the same code on 2 CPU cores in seconds.
SIZES = {
    "gpu": dict(tokens=16384, variants=["l16", "so16", "g16"], backends=["local", "flex"], warmup=2, steps=3,
                attn_repeats=5, attn_heads=16, attn_head_dim=96, loader_workers=[8, 16], loader_window_s=6.0,
                shapes_samples=1600, shapes_shards=32, shapes_max_side=512, test_timeout_s=90,
                fp8_bench_variants=["l16", "so16", "g16"], fp8_bench_min_s=25),
    "smoke": dict(tokens=1024, variants=["tiny"], backends=["local", "flex"], warmup=1, steps=2,
                  attn_repeats=2, attn_heads=4, attn_head_dim=32, loader_workers=[2], loader_window_s=1.5,
                  shapes_samples=64, shapes_shards=4, shapes_max_side=160, test_timeout_s=60,
                  fp8_bench_variants=["tiny"], fp8_bench_min_s=15),
}
# Seconds per job. gpu: 455 s in all, inside the device's 8 minutes with the wheel install; what a job leaves unused
# goes to the jobs after it (`run_check`). The FP8 gpu tests run in the fp8 job, not in correctness. smoke: only a
# guard against a hang in CI.
BUDGETS = {
    "gpu": {"correctness": 110, "attention": 45, "throughput:l16": 60, "throughput:so16": 60,
            "throughput:g16": 75, "loader": 45, "fp8": 60},
    "smoke": {"correctness": 120, "attention": 120, "throughput:tiny": 180, "loader": 120, "fp8": 60},
}
TOTAL_BUDGET = {"gpu": 455, "smoke": 600}
MIN_JOB_S = 5           # a job with less time than this left is skipped, not started
STATUS_RANK = {"ok": 0, "skipped": 0, "failed": 1, "timeout": 2, "error": 3}


@dataclass
class Job:
    stage: str
    key: Optional[str]          # a job of a multi-job stage (the throughput variant); None for one-job stages
    params: dict

    @property
    def name(self) -> str:
        return self.stage if self.key is None else f"{self.stage}:{self.key}"


# ------------------------------------------------------------------------------------------------------------------
# Worker side: a job's results, saved as they come.
# ------------------------------------------------------------------------------------------------------------------
def json_safe(value):
    """Plain JSON: non-finite floats become None, tuples lists, anything else unknown its str()."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


class Recorder:
    """A job's result dict; `save()` replaces the file atomically, so the driver never reads half a file."""

    def __init__(self, path: Path):
        self.path, self.data = Path(path), {}

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(json_safe(self.data), indent=1) + "\n")
        os.replace(tmp, self.path)

    def skip(self, reason: str) -> None:
        self.data.update(status="skipped", reason=reason)
        self.save()


def worker_main(job_file: str, stages: dict[str, Callable]) -> int:
    job = json.loads(Path(job_file).read_text())
    rec = Recorder(Path(job["result"]))
    rec.save()
    stages[job["stage"]](job["params"], rec)
    rec.save()
    return 0


# ------------------------------------------------------------------------------------------------------------------
# Driver side.
# ------------------------------------------------------------------------------------------------------------------
def environment() -> dict:
    """Versions and the machine, read without importing torch (the jobs report what they see themselves)."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = {"python": sys.version.split()[0], "executable": sys.executable, "cpu_count": os.cpu_count(),
           "packages": {p: version(p) for p in ("torch", "triton", "megatron-core", "torchao", "webdataset",
                                                 "transformer-engine", "nvidia-dali-cuda130", "pytest")},
           "wheels": os.environ.get("GPU_CHECK_WHEELS"), "gpu": None, "commit": None}
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            env["gpu"] = q.stdout.strip() or q.stderr.strip()
        except subprocess.TimeoutExpired:
            env["gpu"] = "nvidia-smi did not answer within 30 s"
    if (ROOT / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        env["commit"] = head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    return env


def gpu_demand(report: dict) -> dict:
    """Samples/s one GPU consumes per pack kind and variant: the faster backend's rate, from the throughput stage."""
    demand: dict = {}
    for variant, res in (report["stages"].get("throughput", {}).get("results") or {}).items():
        for run in (res or {}).get("runs", []):
            rate = run.get("samples_per_s")
            if rate:
                best = demand.setdefault(run["pack"], {})
                best[variant] = max(best.get(variant, 0.0), rate)
    return demand


def job_names(stage: str, sizes: dict) -> list[str]:
    return [f"throughput:{v}" for v in sizes["variants"]] if stage == "throughput" else [stage]


def jobs_for(stage: str, mode: str, sizes: dict, report: dict) -> list[Job]:
    base = {"mode": mode, "sizes": sizes, "out": report["out"]}
    if stage == "throughput":
        return [Job(stage, v, {**base, "variant": v}) for v in sizes["variants"]]
    params = dict(base)
    if stage == "loader":
        params["gpu_demand"] = gpu_demand(report)
    return [Job(stage, None, params)]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)      # the job and anything it started (loader workers, compile workers)
    except (ProcessLookupError, PermissionError):
        pass


def run_job(job: Job, out: Path, worker: list[str], budget_s: float) -> dict:
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stem = job.name.replace(":", "-")
    result, log = out / "jobs" / f"{stem}.json", out / "logs" / f"{stem}.log"
    job_file = out / "jobs" / f"{stem}.job.json"
    job_file.write_text(json.dumps({"stage": job.stage, "key": job.key, "result": str(result),
                                    "params": {**job.params, "budget_s": budget_s}}, indent=1))
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([*worker, "--worker", str(job_file)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=budget_s), False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
        finally:                           # past its budget, or interrupted: the job and its children; else the
            kill_group(proc.pid)           # children that outlived it
            proc.wait()
    rec = {"job": job.name, "wall_s": round(time.perf_counter() - start, 1), "budget_s": round(budget_s, 1),
           "log": str(log.relative_to(out))}
    try:
        results = json.loads(result.read_text())
    except (OSError, ValueError):
        results = {}
    if timed_out:
        rec.update(status="timeout", error=f"ran past its budget of {budget_s:.0f} s and was killed; log tail:\n"
                                           f"{_tail(log)}")
    elif rc != 0:
        rec.update(status="error", error=f"exit code {rc}; log tail:\n{_tail(log)}")
    else:
        rec["status"] = results.pop("status", "ok")
        if "reason" in results:
            rec["reason"] = results.pop("reason")
    rec["results"] = results
    return rec


def merge_stage(jobs: list[Job], recs: list[dict]) -> dict:
    """One stage's record from its jobs' records (a multi-job stage keeps each job's results under its key)."""
    worst = max((r["status"] for r in recs), key=lambda s: STATUS_RANK[s])
    if worst == "ok" and all(r["status"] == "skipped" for r in recs):
        worst = "skipped"
    stage = {"status": worst, "wall_s": round(sum(r["wall_s"] for r in recs), 1),
             "budget_s": round(sum(r["budget_s"] for r in recs), 1)}
    reasons = [r["reason"] for r in recs if r.get("reason")]
    errors = [f"{r['job']}: {r['error']}" for r in recs if r.get("error")]
    if reasons:
        stage["reason"] = "; ".join(reasons)
    if errors:
        stage["error"] = "\n\n".join(errors)
    if len(jobs) == 1 and jobs[0].key is None:
        stage["results"], stage["log"] = recs[0]["results"], recs[0]["log"]
    else:
        stage["results"] = {j.key: r["results"] for j, r in zip(jobs, recs, strict=True)}
        stage["jobs"] = {j.key: {k: r[k] for k in ("status", "wall_s", "budget_s", "log", "reason", "error")
                                 if k in r} for j, r in zip(jobs, recs, strict=True)}
    return stage


def write_report(report: dict, out: Path) -> None:
    from genlip_mcore.gpucheck.report import markdown

    (out / "gpu_report.json").write_text(json.dumps(json_safe(report), indent=1) + "\n")
    (out / "gpu_report.md").write_text(markdown(report))


def run_check(out: Path, mode: str, worker: list[str], only: Optional[list[str]] = None,
              total_s: Optional[float] = None, budgets: Optional[dict] = None) -> dict:
    sizes, budgets = SIZES[mode], {**BUDGETS[mode], **(budgets or {})}
    total_s = total_s or TOTAL_BUDGET[mode]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"schema": 1, "mode": mode, "out": str(out), "started": datetime.now(timezone.utc).isoformat(),
              "budget_s": total_s, "sizes": sizes, "environment": environment(), "stages": {}}
    stages = [s for s in STAGES if not only or s in only]
    # Every job gets its own budget plus whatever the jobs before it left unused, but never the budgets of the
    # jobs still to come. Jobs are built stage by stage (the loader needs the throughput results); their names
    # are known up front.
    planned = [n for s in stages for n in job_names(s, sizes)]
    unused = 0.0
    for stage in stages:
        jobs = jobs_for(stage, mode, sizes, report)
        recs = []
        for job in jobs:
            reserved = sum(budgets[n] for n in planned[planned.index(job.name) + 1:])
            own = budgets[job.name] + unused
            budget = min(own, total_s - (time.perf_counter() - t0) - reserved)
            if budget < MIN_JOB_S:
                recs.append({"job": job.name, "status": "skipped", "wall_s": 0.0, "budget_s": 0.0, "log": "",
                             "reason": f"only {max(budget, 0):.0f} s left for it (under {MIN_JOB_S} s) in the check's "
                                       f"{total_s:.0f} s", "results": {}})
            else:
                print(f"[gpu_check] {job.name}: running (budget {budget:.0f} s)", flush=True)
                recs.append(run_job(job, out, worker, budget))
            r = recs[-1]
            unused = max(0.0, own - r["wall_s"])
            print(f"[gpu_check] {job.name}: {r['status']} in {r['wall_s']:.1f} s"
                  + (f" ({r['reason']})" if r.get("reason") else ""), flush=True)
        report["stages"][stage] = merge_stage(jobs, recs)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        write_report(report, out)
    report["status"] = max((s["status"] for s in report["stages"].values()), key=lambda s: STATUS_RANK[s],
                           default="ok")
    write_report(report, out)
    return report


def _budgets(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        out[name.strip()] = float(seconds)
    return out


def main(argv: Optional[list[str]], stages: dict[str, Callable], worker: list[str], description: str = "") -> int:
    """The command line of tools/gpu_check.py (which passes the throughput stage and its own path)."""
    ap = argparse.ArgumentParser(prog="gpu_check", description=description)
    ap.add_argument("--out", help="folder for gpu_report.json, gpu_report.md, logs/ and jobs/")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same stages in about a minute")
    ap.add_argument("--only", help=f"comma-separated stages to run, of {','.join(STAGES)}")
    ap.add_argument("--budget", type=float, help="seconds for the whole check (default: 455 gpu, 600 smoke)")
    ap.add_argument("--budgets", default="", help="per-job seconds, e.g. correctness=150,throughput:g16=90")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_main(a.worker, stages)
    if not a.out:
        ap.error("--out is required")
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    unknown = sorted(set(only or []) - set(STAGES))
    if unknown:
        ap.error(f"--only: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    mode = "smoke" if a.smoke else "gpu"
    budgets = _budgets(a.budgets)
    unknown = sorted(set(budgets) - set(BUDGETS[mode]))
    if unknown:
        ap.error(f"--budgets: unknown job(s) {unknown}; jobs are {sorted(BUDGETS[mode])}")
    report = run_check(Path(a.out).resolve(), mode, worker, only, a.budget, budgets)
    print(f"[gpu_check] {report['status']}: {Path(a.out) / 'gpu_report.md'} ({report['wall_s']:.0f} s)", flush=True)
    return 0 if STATUS_RANK[report["status"]] == 0 else 1
