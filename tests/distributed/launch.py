"""Launch a torchrun worker under a hard timeout (a dead checkpoint writer can hang its parent forever)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun(script: str, nproc: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    from tests.conftest import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(Path(__file__).parent / script), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{script} failed (rc={proc.returncode}):\n{tail}")
    return proc
