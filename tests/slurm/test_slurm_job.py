"""scripts/pretrain_genlip_g16.sh through a real sbatch on two Slurm nodes, one CPU trainer each under torchrun.

One uninterrupted tiny run is the reference; a second run of the same config is stopped mid-way by SIGUSR1 to its
batch shell (what `#SBATCH --signal=B:USR1@...` sends before the time limit). It must save, exit 75 and requeue
itself, and once released it must resume from that save and log the reference's per-step losses exactly.
"""

import json
import re
import time

import pytest

pytestmark = pytest.mark.slurm

# Enough steps after the first one (0.2-1.5 s each on 2 shared cores) for the stop to land mid-run.
ITERS = 30
ARGS = ["--config", "examples/configs/tiny_cpu.yaml", f"training.train_iters={ITERS}", "training.log_interval=1"]


def losses(run_dir):
    """{iteration: loss} from metrics.jsonl; a resumed run's lines come after the stopped run's."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "iteration" in rec:
            out[rec["iteration"]] = rec["loss"]
    return out


def metric_lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def ended(fields):
    return fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory):
    """An uninterrupted run: (run dir, job fields, job log)."""
    tmp = tmp_path_factory.mktemp("slurm_ref")
    run_dir, log = tmp / "run", tmp / "job.out"
    job = slurm_cluster.sbatch([*ARGS, f"training.run_dir={run_dir}"], out=log)
    try:
        fields = slurm_cluster.wait(job, ended, "finished", 300, log)
    finally:
        slurm_cluster.scancel(job)
    return run_dir, fields, log.read_text()


def test_two_node_job_trains_and_writes_metrics(reference):
    run_dir, fields, log = reference
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert fields["NodeList"] == "n[1-2]" and fields["NumNodes"] == "2"
    assert "srun --nodes=2 --ntasks=2" in log and "--nnodes=2 --nproc_per_node=1" in log
    assert sorted(losses(run_dir)) == list(range(1, ITERS + 1))
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{ITERS:07d}"


def test_stop_signal_saves_requeues_and_resumes_exactly(slurm_cluster, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm_cluster.sbatch([*ARGS, f"training.run_dir={run_dir}"], out=log)
    try:
        start = last_check = time.monotonic()
        while metric_lines(run_dir) < 1:                      # training has begun: the stop lands mid-run
            now = time.monotonic()
            assert now < start + 240, f"no training step after 240 s\n{log.read_text()[-3000:]}"
            if now > last_check + 5:
                assert not ended(slurm_cluster.job(job)), f"job ended before the stop\n{log.read_text()[-3000:]}"
                last_check = now
            time.sleep(0.1)
        slurm_cluster.scancel("--signal=USR1", "--batch", job)

        # The run saves, every trainer exits 75, and the batch script requeues the job (held 120 s by Slurm).
        fields = slurm_cluster.wait(job, lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING",
                                    "requeued", 180, log)
        first = log.read_text()
        stopped = re.search(r"stopping at iteration (\d+) \(SIGUSR1\)", first)
        assert stopped, first[-3000:]
        stop_iter = int(stopped[1])
        assert 1 <= stop_iter < ITERS
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{stop_iter:07d}"
        assert "requeueing job" in first
        assert sorted(losses(run_dir)) == list(range(1, stop_iter + 1))

        # Slurm holds a requeued job 120 s; release it once its last run is cleaned up, or the restart can fail.
        slurm_cluster.wait_nodes_idle(60)
        slurm_cluster.scontrol("update", f"JobId={job}", "StartTime=now")
        fields = slurm_cluster.wait(job, ended, "finished after the requeue", 300, log)
    finally:
        slurm_cluster.scancel(job)
    resumed = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), resumed[-3000:]
    assert resumed.startswith(first)                          # --open-mode=append: the stopped run's log is kept
    assert f"resumed from {run_dir}/checkpoints/iter_{stop_iter:07d} at iteration {stop_iter}" in resumed
    assert losses(run_dir) == losses(reference[0])            # bitwise: floats compared with ==
