"""A real two-node Slurm cluster on this machine (scripts/slurm_local.sh), for the tests marked `slurm`.

pytest.ini deselects the marker, so these run only when asked: `pytest -m slurm tests/slurm` (CI's slurm stage,
which starts the cluster first). When no cluster answers at SLURM_CONF, the fixture starts one itself and stops it
afterwards; that needs root and apt-get, and fails (never skips) without them.
"""

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "scripts" / "slurm_local.sh"
DEFAULT_CONF = "/tmp/genlip-slurm/slurm.conf"


def _sh(args, env, timeout=30, check=True):
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


class Cluster:
    def __init__(self, conf: str):
        self.env = {**os.environ, "SLURM_CONF": conf}
        self.cpus = min(2, os.cpu_count() or 1)

    def sbatch(self, script_args, *, out: Path, sbatch_args=(), **env) -> str:
        """Submits scripts/pretrain_genlip_g16.sh from the repository root on 2 nodes x 1 CPU trainer."""
        job_env = {k: v for k, v in self.env.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "DRY_RUN")}
        job_env.update(GPUS_PER_NODE="1", RDZV_HOST="127.0.0.1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
                       **env)
        proc = subprocess.run(
            ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", f"--cpus-per-task={self.cpus}", "--time=10",
             f"--output={out}", *sbatch_args, str(ROOT / "scripts" / "pretrain_genlip_g16.sh"), *script_args],
            env=job_env, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as {field: value} (kept for MinJobAge, 300 s, after the job ends)."""
        text = _sh(["scontrol", "show", "job", "-o", job_id], self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_nodes_idle(self, timeout: float):
        """Until both nodes are idle: a requeued job's last run has ended there (slurmd is done cleaning up).
        Then 3 s more: slurmd revokes the ended run's job credential with a timestamp in whole seconds, and
        refuses ("Job credential revoked") a new launch of the same job id whose credential is from that same
        second. Slurm's own 120 s hold on a requeued job is there for this; StartTime=now skips it."""
        deadline = time.monotonic() + timeout
        while not _up(self.env):
            if time.monotonic() > deadline:
                out = _sh(["sinfo", "-h", "-N", "-o", "%N %t"], self.env, check=False).stdout
                pytest.fail(f"nodes not idle after {timeout:.0f} s: {out}")
            time.sleep(0.5)
        time.sleep(3)

    def scontrol(self, *args):
        return _sh(["scontrol", *args], self.env)

    def scancel(self, *args):
        return _sh(["scancel", *args], self.env)

    def wait(self, job_id: str, until, what: str, timeout: float, log: Path = None) -> dict:
        """Polls the job until `until(fields)` holds; fails after `timeout` s with the job's state and log tail."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if until(fields):
                return fields
            if time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log is not None and log.exists() else "(no log)"
                pytest.fail(f"job {job_id}: not {what} after {timeout:.0f} s (JobState={fields.get('JobState')}, "
                            f"Reason={fields.get('Reason')}, ExitCode={fields.get('ExitCode')})\n{tail}")
            time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(env) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True,
                             timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return len(re.findall(r"^n[12] idle", out, re.M)) == 2


@pytest.fixture(scope="session")
def slurm_cluster():
    conf = os.environ.get("SLURM_CONF", DEFAULT_CONF)
    env = {**os.environ, "SLURM_CONF": conf}
    started = False
    if not _up(env):
        proc = subprocess.run(["bash", str(LOCAL), "start"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "SLURM_LOCAL_DIR": str(Path(conf).parent)})
        if proc.returncode != 0:
            pytest.fail(f"no Slurm cluster at SLURM_CONF={conf}, and `bash {LOCAL} start` failed:\n"
                        f"{proc.stdout}{proc.stderr}")
        started = True
    try:
        yield Cluster(conf)
    finally:
        if started:
            subprocess.run(["bash", str(LOCAL), "stop"], timeout=120,
                           env={**os.environ, "SLURM_LOCAL_DIR": str(Path(conf).parent)})
