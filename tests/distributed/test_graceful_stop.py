"""Graceful stop at TP=2 x PP=2 on 4 CPU ranks (issue 10, acceptance 1). Four trainer processes are started as srun
starts them (one per rank, no torchrun in between, so each one's exit code is seen):
- SIGTERM to every trainer by pid, mid-run, as slurm delivers it: all save at the next step boundary and exit 75;
- SIGTERM raised by one rank only (GENLIP_FAULT, rank 1, after iteration 3): the per-step all-reduce makes every
  rank stop at iteration 3.
Each stopped run is then resumed (one torchrun launch, with the uninterrupted run), and its metrics.jsonl losses
equal the uninterrupted run's bitwise, iteration by iteration."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from genlip_mcore import ckpt
from tests.conftest import free_port
from tests.distributed.launch import REPO, torchrun
from tests.distributed.stop_worker import CONFIG, ITERS, OVERRIDES

pytestmark = pytest.mark.distributed
WORLD = 4


def _start(run_dir, env_extra=None):
    """The 4 trainers of one run, with torchrun's environment; stdout and stderr to files in run_dir."""
    run_dir.mkdir(parents=True)
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(env_extra or {}))
        out = open(run_dir / f"out{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "genlip_mcore.train", "--config", CONFIG, *OVERRIDES,
                                       f"training.run_dir={run_dir}"], cwd=REPO, env=env, stdout=out,
                                      stderr=subprocess.STDOUT))
        out.close()
    return procs


def _wait(procs, run_dir, timeout=300):
    end = time.monotonic() + timeout
    try:
        return [p.wait(max(1, end - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"trainers hung; {_tail(run_dir)}") from None


def _tail(run_dir):
    return "\n".join((run_dir / "out0.txt").read_text().splitlines()[-40:])


def _iterations_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()] if path.exists() else []


def _losses(run_dir):
    """Loss and grad norm per iteration; a resumed run's rows replace the ones it repeats."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("stop")
    by_pid = d / "by_pid"
    procs = _start(by_pid)
    end = time.monotonic() + 300
    while not any(i >= 2 for i in _iterations_logged(by_pid)):       # mid-run: two steps done
        assert time.monotonic() < end and all(p.poll() is None for p in procs), _tail(by_pid)
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    by_pid_codes = _wait(procs, by_pid)

    one_rank = d / "one_rank"
    one_rank_codes = _wait(_start(one_rank, {"GENLIP_FAULT": "signal:SIGTERM@3:1"}), one_rank)
    stopped = {"by_pid": (by_pid, by_pid_codes), "one_rank": (one_rank, one_rank_codes)}
    for run_dir, _ in stopped.values():           # snapshots before the resume adds checkpoints and rows
        (run_dir / "stopped_at.json").write_text(json.dumps(
            {"checkpoints": [p.name for p in ckpt.checkpoints(run_dir / "checkpoints")],
             "iterations": _iterations_logged(run_dir)}))
    torchrun("stop_worker.py", WORLD, str(d / "straight"), str(by_pid), str(one_rank))
    return d, stopped


@pytest.mark.parametrize("name", ["by_pid", "one_rank"])
def test_every_rank_saves_at_the_next_boundary_and_exits_75(runs, name):
    _, stopped = runs
    run_dir, codes = stopped[name]
    assert codes == [75] * WORLD, _tail(run_dir)
    at = json.loads((run_dir / "stopped_at.json").read_text())
    last = at["iterations"][-1]
    assert 2 <= last < ITERS and at["checkpoints"] == [f"iter_{last:07d}"]      # saved where it stopped, only there
    if name == "one_rank":
        assert last == 3
    rank0 = (run_dir / "logs" / "rank0.log").read_text()
    assert f"stopping at iteration {last} (SIGTERM): saved " in rank0


@pytest.mark.parametrize("name", ["by_pid", "one_rank"])
def test_the_resumed_run_matches_the_uninterrupted_one_bitwise(runs, name):
    d, stopped = runs
    straight = _losses(d / "straight")
    assert sorted(straight) == list(range(1, ITERS + 1))
    assert _losses(stopped[name][0]) == straight
