"""scripts/pretrain_genlip_g16.sh under a simulated Slurm allocation: the launch it prints (DRY_RUN=1) and runs.

A fake `scontrol` expands the node list and a fake `srun` records its arguments instead of launching anything, so
these tests need neither Slurm nor a GPU and take well under a second.
"""

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pretrain_genlip_g16.sh"

# Variables the script reads: cleared so that the machine running the tests (maybe itself a Slurm job) does not leak in.
_SCRUB = ("MASTER_PORT", "MASTER_ADDR", "RDZV_HOST", "GPUS_PER_NODE", "PYTHON", "DRY_RUN", "GENLIP_ROOT",
          "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_IB_TIMEOUT", "NCCL_ASYNC_ERROR_HANDLING",
          "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG", "OMP_NUM_THREADS", "PYTHONFAULTHANDLER")

ALLOC = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "genlip-g16",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_CPUS_PER_TASK": "96",
}


@pytest.fixture
def fakebin(tmp_path):
    """A PATH prefix with `scontrol show hostnames` -> gpu017, gpu018 and an `srun` that logs its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\nprintf "gpu017\\ngpu018\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {shlex.quote(str(tmp_path / "srun.argv"))}\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def run(args=(), *, fakebin=None, alloc=True, dry=True, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _SCRUB}
    if fakebin is not None:
        env["PATH"] = f"{fakebin}{os.pathsep}{env.get('PATH', '')}"
    if alloc:
        env.update(ALLOC)
    if dry:
        env["DRY_RUN"] = "1"
    env.setdefault("PYTHON", "python3")
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd="/", capture_output=True, text=True,
                          timeout=30)


def launch(proc):
    """The printed snippet -> (exports {name: value}, comment lines, command argv); checks it is the whole story."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    comments = [ln for ln in lines if ln.startswith("#")]
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    commands = [ln for ln in lines if not ln.startswith(("#", "export ", "cd "))]
    assert len(commands) == 1, proc.stdout
    return exports, comments, shlex.split(commands[0])


def after(argv, item):
    return argv[argv.index(item) + 1]


def trainer_args(argv):
    """Everything after `-m genlip_mcore.train`."""
    i = argv.index("genlip_mcore.train")
    assert argv[i - 1] == "-m"
    return argv[i + 1:]


def test_script_is_executable_bash():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_two_node_launch(fakebin, tmp_path):
    spaced = 'data.sources=["/data/my shards/{000..009}.tar"]'
    quoted = """logging.wandb_name=it's a "g16" run"""
    exports, comments, argv = launch(run(["training.train_iters=10", spaced, quoted], fakebin=fakebin))

    assert not (tmp_path / "srun.argv").exists(), "a dry run must not launch"
    assert argv[0] == "srun"
    srun = argv[:argv.index("python3")]
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun and "--ntasks=2" in srun
    assert "--cpus-per-task=96" in srun                     # srun does not inherit it from sbatch
    torchrun = argv[argv.index("python3") + 1:argv.index("genlip_mcore.train") - 1]
    assert torchrun == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
                        "--rdzv_endpoint=gpu017:29742", "--rdzv_id=4242"]      # 29500 + 4242 % 1000
    assert trainer_args(argv) == ["--config", "examples/configs/g16_stage1.yaml", "training.train_iters=10", spaced,
                                  quoted, "training.run_dir=runs/genlip-g16-4242"]

    assert exports == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_IB_TIMEOUT": "22",
                       "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "12",
                       "PYTHONFAULTHANDLER": "1"}
    assert any("dry run" in c for c in comments)
    assert any("fresh start" in c for c in comments)


def test_exported_settings_win(fakebin):
    exports, _, argv = launch(run(fakebin=fakebin, MASTER_PORT="31000", NCCL_DEBUG="INFO", GPUS_PER_NODE="4",
                                  PYTHON="/opt/env/bin/python", SLURM_JOB_NAME="mine"))
    assert exports["NCCL_DEBUG"] == "INFO"
    assert exports["OMP_NUM_THREADS"] == "24"               # 96 CPUs over 4 ranks
    assert argv[argv.index("-m") - 1] == "/opt/env/bin/python"
    assert "--rdzv_endpoint=gpu017:31000" in argv and "--nproc_per_node=4" in argv
    assert trainer_args(argv)[-1] == "training.run_dir=runs/mine-4242"


def test_stage_and_config_select_the_yaml(fakebin):
    for args, want in ((["--stage", "2"], "examples/configs/g16_stage2.yaml"),
                       (["--stage=2"], "examples/configs/g16_stage2.yaml"),
                       (["--stage", "2", "--config", "examples/configs/l16_stage1.yaml"],
                        "examples/configs/l16_stage1.yaml")):
        _, _, argv = launch(run(args, fakebin=fakebin))
        assert after(argv, "--config") == want, args
    bad = run(["--stage", "3"], fakebin=fakebin)
    assert bad.returncode != 0 and "use 1 or 2" in bad.stderr
    missing = run(["--config", "nope.yaml"], fakebin=fakebin)
    assert missing.returncode != 0 and "nope.yaml: no such file" in missing.stderr


def test_auto_resume_from_latest(fakebin, tmp_path):
    run_dir = tmp_path / "run with space"
    user = [f"training.run_dir={run_dir}"]
    _, comments, argv = launch(run(user, fakebin=fakebin))
    assert trainer_args(argv)[2:] == user                  # explicit run_dir: nothing added, nothing to resume
    assert any("fresh start" in c for c in comments)

    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("iter_0000200\n")
    _, comments, argv = launch(run(user, fakebin=fakebin))
    assert trainer_args(argv)[2:] == user + [f"training.load_dir={run_dir}/checkpoints", "training.init_from=null"]
    assert any("iter_0000200" in c for c in comments)

    # training.save_dir moves the checkpoints, and an explicit training.load_dir is left alone.
    save_dir = tmp_path / "ckpts"
    save_dir.mkdir()
    _, _, argv = launch(run(user + [f"training.save_dir={save_dir}"], fakebin=fakebin))
    assert not any(a.startswith("training.load_dir=") for a in argv)
    (save_dir / "latest").write_text("iter_0000100\n")
    _, _, argv = launch(run(user + [f"training.save_dir={save_dir}"], fakebin=fakebin))
    assert f"training.load_dir={save_dir}" in argv
    _, _, argv = launch(run(user + ["training.load_dir=/elsewhere"], fakebin=fakebin))
    assert [a for a in argv if a.startswith("training.load_dir=")] == ["training.load_dir=/elsewhere"]


def test_runs_exactly_what_it_prints(fakebin, tmp_path):
    """Without DRY_RUN the script prints the same snippet, then execs srun with exactly the printed argv."""
    quoted = """logging.wandb_name=it's a "g16" run"""
    proc = run([quoted], fakebin=fakebin, dry=False)
    _, comments, argv = launch(proc)
    assert not any("dry run" in c for c in comments)
    recorded = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert ["srun", *recorded] == argv


def test_outside_slurm():
    proc = run(alloc=False, dry=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "not inside a Slurm allocation" in proc.stderr and "sbatch" in proc.stderr and "DRY_RUN=1" in proc.stderr

    # A dry run outside an allocation shows a one-node localhost launch and says so.
    _, comments, argv = launch(run(alloc=False, GPUS_PER_NODE="8"))
    assert any("not inside a Slurm allocation" in c for c in comments)
    assert "--nnodes=1" in argv and "--rdzv_endpoint=localhost:29500" in argv and "--rdzv_id=dryrun" in argv
    assert "training.run_dir=runs/genlip-g16-dryrun" in argv
    _, _, argv2 = launch(run(["--dry-run"], alloc=False, dry=False, GPUS_PER_NODE="8"))
    assert argv2 == argv


def test_rejects_options_meant_for_sbatch(fakebin):
    proc = run(["--nodes=4"], fakebin=fakebin)
    assert proc.returncode != 0 and "go before the script name" in proc.stderr
    proc = run(["train_iters"], fakebin=fakebin)
    assert proc.returncode != 0 and "section.key=value" in proc.stderr


def test_finds_the_checkout_from_slurms_spool_copy(fakebin, tmp_path):
    """sbatch runs a copy of the script from its spool directory: the checkout is then the submit directory."""
    spool = tmp_path / "spool" / "job4242"
    spool.mkdir(parents=True)
    copy = spool / "slurm_script"
    copy.write_text(SCRIPT.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _SCRUB}
    env.update(ALLOC, DRY_RUN="1", PYTHON="python3", PATH=f"{fakebin}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.run(["bash", str(copy)], env=env, cwd="/", capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "cannot find the genlip_mcore checkout" in proc.stderr
    env["SLURM_SUBMIT_DIR"] = str(ROOT)
    proc = subprocess.run(["bash", str(copy)], env=env, cwd="/", capture_output=True, text=True, timeout=30)
    _, _, argv = launch(proc)
    assert f"cd {shlex.quote(str(ROOT))}" in proc.stdout.splitlines()
    assert after(argv, "--config") == "examples/configs/g16_stage1.yaml"
