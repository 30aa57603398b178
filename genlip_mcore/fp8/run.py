"""Launching the cells of a sweep: `genlip-pretrain` once per cell, locally or through slurm; resumable.

A cell's run dir holds `cell.json`, the tool's record of it: the cell, its overrides, the full validated config,
the command, and a status:
  running    launched locally by a tool process that is still alive (its pid is recorded)
  submitted  sbatch accepted it (job id recorded); it becomes done once its metrics reach training.train_iters
  done       the trainer exited 0 and metrics.jsonl has a training row at training.train_iters
  failed     anything else: non-zero exit, a short run, a timeout, an interrupted tool, a slurm job that ended
             without reaching the last iteration
`run` skips done cells (and cells still running or queued) and launches the rest. A failed local cell starts over
in an emptied run dir (metrics.jsonl is appended to by the trainer, so stale rows would mix in); a failed slurm cell
is resubmitted as is, and the slurm script resumes it from its last checkpoint.

Local cells run `--jobs` at a time, the costliest first (model FLOPs, x3 for emulated FP8), each with OMP_NUM_THREADS = usable cores / (jobs x the cell's ranks), one rank
per process (`torchrun --standalone --nproc-per-node W` when the cell's world size W > 1). A failed cell is
reported and the others go on. Slurm cells go through `sbatch scripts/pretrain_genlip_g16.sh --config BASE
overrides...` with --nodes/--gpus-per-node from the cell's world size; DRY_RUN=1 (or --dry-run) prints each
launch through the script's own dry run and submits nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from genlip_mcore import config as C
from genlip_mcore.fp8.sweep import Cell, Planned, Sweep, nodes_for

log = logging.getLogger(__name__)

CELL_FILE = "cell.json"
LAUNCH_LOG = "launch.log"
SWEEP_FILE = "sweep.json"
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------------------
# The cell record and its state.
# ------------------------------------------------------------------------------------------------------------------
def read_record(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(run_dir) / CELL_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(run_dir: Path, record: dict) -> None:
    """Atomic (write beside, then rename): a killed tool never leaves half a cell.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CELL_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(run_dir / CELL_FILE)


def last_train_iteration(run_dir: Path) -> Optional[int]:
    """The highest iteration of a training row (one with a `loss` key) in metrics.jsonl, None without one."""
    last = None
    try:
        with open(Path(run_dir) / "metrics.jsonl") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:        # a line cut by a crash
                    continue
                if "loss" in row and isinstance(row.get("iteration"), int):
                    last = row["iteration"] if last is None else max(last, row["iteration"])
    except FileNotFoundError:
        return None
    return last


def reached_end(run_dir: Path, record: dict) -> bool:
    end = record.get("train_iters")
    last = last_train_iteration(run_dir)
    return end is not None and last is not None and last >= end


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job_active(job_id: str) -> Optional[bool]:
    """True while squeue lists the job, False when it does not, None when squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:                         # squeue errors on a job id it no longer knows
        return False
    return bool(out.stdout.strip())


def cell_state(run_dir: Path) -> str:
    """new | running | submitted | done | failed (see the module docstring). A submitted slurm job that has
    reached its last iteration is recorded as done here."""
    record = read_record(run_dir)
    if record is None:
        return "new"
    status = record.get("status")
    if status == "done":
        return "done"
    if status == "running":
        return "running" if _alive(record.get("tool_pid")) and _alive(record.get("pid")) else "failed"
    if status == "submitted":
        if reached_end(run_dir, record):
            write_record(run_dir, {**record, "status": "done", "finished": _now()})
            return "done"
        active = _slurm_job_active(record.get("job_id", ""))
        return "submitted" if active in (True, None) else "failed"
    return "failed"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# ------------------------------------------------------------------------------------------------------------------
# Commands.
# ------------------------------------------------------------------------------------------------------------------
def train_command(base: Path, cell: Cell, python: str = sys.executable) -> list[str]:
    """`genlip-pretrain` for a local cell: one process, or torchrun with one process per rank."""
    args = ["--config", str(base), *cell.overrides]
    if cell.world_size > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cell.world_size}",
                "-m", "genlip_mcore.train", *args]
    return [python, "-m", "genlip_mcore.train", *args]


def sbatch_command(sweep: Sweep, cell: Cell) -> tuple[list[str], dict[str, str]]:
    """sbatch over the slurm script, and the environment it needs (the script reads GPUS_PER_NODE)."""
    nodes = nodes_for(cell.world_size, sweep.gpus_per_node)
    per_node = cell.world_size // nodes
    job = f"fp8-{cell.size}-{cell.precision}-s{cell.seed}"
    cmd = ["sbatch", f"--nodes={nodes}", f"--gpus-per-node={per_node}", f"--job-name={job}",
           f"--output={cell.run_dir}/slurm-%j.out", *cell.sbatch_args, str(sweep.script), "--config",
           str(sweep.base), *cell.overrides]
    return cmd, {"GPUS_PER_NODE": str(per_node)}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                          # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------------------------
# Running a sweep.
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    cell: Cell
    status: str                 # done | failed | skipped | submitted | running | dry-run
    detail: str = ""


def write_sweep_json(sweep: Sweep, planned: list[Planned]) -> None:
    sweep.out.mkdir(parents=True, exist_ok=True)
    data = {**sweep.to_json(), "cells": [p.cell.name for p in planned]}
    tmp = sweep.out / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(sweep.out / SWEEP_FILE)


def run_sweep(sweep: Sweep, planned: list[Planned], *, jobs: Optional[int] = None, force: bool = False,
              dry_run: bool = False, timeout_s: Optional[float] = None) -> list[Outcome]:
    """Launch every cell that is not done (all of them with `force`); returns one Outcome per cell."""
    outcomes, todo = [], []
    for p in planned:
        state = "new" if force else cell_state(p.cell.run_dir)
        if state == "done":
            _warn_if_changed(p)
            outcomes.append(Outcome(p.cell, "skipped", "done before"))
        elif state in ("running", "submitted"):
            outcomes.append(Outcome(p.cell, "skipped", f"still {state}"))
        else:
            todo.append(p)
    if not dry_run:
        write_sweep_json(sweep, planned)
    if sweep.launcher == "slurm":
        outcomes += [_submit(sweep, p, dry_run) for p in todo]
    elif dry_run:
        outcomes += [Outcome(p.cell, "dry-run", " ".join(train_command(sweep.base, p.cell))) for p in todo]
    else:
        # Longest first: the last cells to start then are short ones, and fewer slots idle at the end.
        todo.sort(key=lambda p: -expected_cost(p.cfg))
        outcomes += LocalPool(sweep.base, jobs or sweep.jobs, timeout_s).run(todo)
    order = {p.cell.name: i for i, p in enumerate(planned)}
    return sorted(outcomes, key=lambda o: order[o.cell.name])


def expected_cost(cfg: C.Config) -> float:
    """A cell's relative run time: model FLOPs of its tokens, three times that for emulated FP8 (eager
    quantize-dequantize costs 1.5-3x a plain GEMM on a CPU). Only its order matters."""
    from genlip_mcore.info import DEFAULT_SAMPLE, flops_per_token

    t = cfg.training
    work = flops_per_token(cfg.model, *DEFAULT_SAMPLE)["flops_per_token"] * t.train_iters * t.global_batch_size
    work *= cfg.data.max_seq_len
    if cfg.precision.fp8 is not None and C.fp8_backend(cfg.precision, cfg.model) == "emulate":
        work *= 3
    return work


def _warn_if_changed(p: Planned) -> None:
    record = read_record(p.cell.run_dir) or {}
    if list(record.get("overrides", [])) != list(p.cell.overrides):
        log.warning(f"{p.cell.name}: finished with other overrides than the sweep's now; kept (--force re-runs it)")


def _record(sweep_base: Path, p: Planned, command: list[str], launcher: str, **extra) -> dict:
    c = p.cell
    return {"size": c.size, "precision": c.precision, "seed": c.seed, "base": str(sweep_base),
            "overrides": list(c.overrides), "world_size": c.world_size, "train_iters": p.cfg.training.train_iters,
            "launcher": launcher, "command": command, "config": C.to_dict(p.cfg), "started": _now(), **extra}


def _clear(run_dir: Path) -> None:
    """Empty a failed local cell's run dir before its re-run. Only a directory the tool made (it holds cell.json)
    is emptied; anything else in the way is an error."""
    if not run_dir.exists():
        return
    if not (run_dir / CELL_FILE).exists() and any(run_dir.iterdir()):
        raise RuntimeError(f"{run_dir} exists and is not a genlip-fp8 cell (no {CELL_FILE}); move it away")
    shutil.rmtree(run_dir)


class LocalPool:
    """Up to `jobs` trainer processes at once, each in its own session so a timeout or Ctrl-C ends its whole tree."""

    def __init__(self, base: Path, jobs: int, timeout_s: Optional[float]):
        self.base, self.jobs, self.timeout_s = base, max(1, jobs), timeout_s
        self.running: dict[int, tuple[Planned, subprocess.Popen, float, object]] = {}

    def run(self, todo: list[Planned]) -> list[Outcome]:
        queue, outcomes = list(todo), []
        try:
            while queue or self.running:
                while queue and len(self.running) < self.jobs:
                    started = self._start(queue.pop(0))
                    if isinstance(started, Outcome):
                        outcomes.append(started)
                outcomes += self._reap()
                time.sleep(0.2)
        except KeyboardInterrupt:
            for pid in list(self.running):
                outcomes.append(self._finish(pid, None, "interrupted"))
            raise
        return outcomes

    def _env(self, cell: Cell) -> dict[str, str]:
        threads = max(1, usable_cores() // (self.jobs * cell.world_size))
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}

    def _start(self, p: Planned):
        cell = p.cell
        try:
            _clear(cell.run_dir)
        except RuntimeError as e:
            log.error(f"{cell.name}: {e}")
            return Outcome(cell, "failed", str(e))
        cell.run_dir.mkdir(parents=True)
        cmd = train_command(self.base, cell)
        out = open(cell.run_dir / LAUNCH_LOG, "w")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env(cell), cwd=Path.cwd(),
                                start_new_session=True)
        write_record(cell.run_dir, _record(self.base, p, cmd, "local", status="running", pid=proc.pid,
                                           tool_pid=os.getpid(), omp_num_threads=self._env(cell)["OMP_NUM_THREADS"]))
        log.info(f"{cell.name}: started (pid {proc.pid}, log {cell.run_dir / LAUNCH_LOG})")
        self.running[proc.pid] = (p, proc, time.monotonic(), out)
        return proc

    def _reap(self) -> list[Outcome]:
        done = []
        for pid, (_, proc, t0, _out) in list(self.running.items()):
            rc = proc.poll()
            if rc is not None:
                done.append(self._finish(pid, rc, None))
            elif self.timeout_s and time.monotonic() - t0 > self.timeout_s:
                done.append(self._finish(pid, None, f"timed out after {self.timeout_s:g} s"))
        return done

    def _finish(self, pid: int, rc: Optional[int], why: Optional[str]) -> Outcome:
        p, proc, t0, out = self.running.pop(pid)
        if rc is None:                                  # timed out or interrupted: end the trainer's whole session
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
        out.close()
        wall = time.monotonic() - t0
        cell, record = p.cell, read_record(p.cell.run_dir) or {}
        if why is None and rc != 0:
            why = f"exit status {rc}: {_tail(cell.run_dir / LAUNCH_LOG)}"
        elif why is None and not reached_end(cell.run_dir, record):
            why = (f"exit status 0 but metrics.jsonl stops at iteration {last_train_iteration(cell.run_dir)} of "
                   f"{record.get('train_iters')}")
        status = "failed" if why else "done"
        write_record(cell.run_dir, {**record, "status": status, "rc": rc, "wall_s": round(wall, 1),
                                    "finished": _now(), "error": why})
        (log.error if why else log.info)(f"{cell.name}: {status} in {wall:.0f} s" + (f" ({why})" if why else ""))
        return Outcome(cell, status, why or f"{wall:.0f} s")


def _tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a log, as one line: what the trainer said when it stopped."""
    try:
        text = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except FileNotFoundError:
        return "no log"
    return " | ".join(text[-lines:])[-400:]


def _submit(sweep: Sweep, p: Planned, dry_run: bool) -> Outcome:
    cell = p.cell
    cmd, env = sbatch_command(sweep, cell)
    if dry_run:
        # The script's own dry run shows the launch it would make inside the job; nothing is submitted.
        script_args = cmd[cmd.index(str(sweep.script)):]
        shown = subprocess.run(["bash", *script_args, "--dry-run"], capture_output=True, text=True,
                               env={**os.environ, **env, "DRY_RUN": "1"})
        detail = " ".join(cmd) + "\n" + (shown.stdout + shown.stderr).rstrip()
        return Outcome(cell, "dry-run" if shown.returncode == 0 else "failed", detail)
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Outcome(cell, "failed", f"sbatch: {e}")
    m = re.search(r"Submitted batch job (\d+)", out.stdout)
    if out.returncode != 0 or not m:
        return Outcome(cell, "failed", f"sbatch exit {out.returncode}: {(out.stderr or out.stdout).strip()[-400:]}")
    previous = read_record(cell.run_dir) or {}
    jobs = previous.get("job_ids", []) + [m.group(1)]
    write_record(cell.run_dir, _record(sweep.base, p, cmd, "slurm", status="submitted", job_id=m.group(1),
                                       job_ids=jobs))
    log.info(f"{cell.name}: submitted as slurm job {m.group(1)}")
    return Outcome(cell, "submitted", f"job {m.group(1)}")


def dry_run_requested() -> bool:
    """The slurm script's DRY_RUN convention: 1/true/yes."""
    return os.environ.get("DRY_RUN", "0").lower() in ("1", "true", "yes")
