"""scripts/pretrain_genlip_g16.sh under a simulated Slurm allocation: the launch it prints (DRY_RUN=1) and runs.

A fake `scontrol` expands the node list (and answers `show job`, records `requeue`), and a fake `srun` records its
arguments instead of launching anything, so these tests need neither Slurm nor a GPU. The torchrun shim's tests
launch it for real on this machine (a few seconds); tests/slurm runs the script under a real Slurm.
"""

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
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
    """A PATH prefix with a fake `scontrol` (show hostnames -> gpu017, gpu018; show job -> Requeue=$FAKE_REQUEUE;
    requeue -> logged to scontrol.log) and an `srun` that logs its argv and exits $FAKE_SRUN_RC. With
    FAKE_SRUN_WAIT=1 it waits instead, touching srun.ready, until a USR1 or TERM, which it logs to srun.signals."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    t = shlex.quote(str(tmp_path))
    (bin_dir / "scontrol").write_text(f"""#!/bin/sh
case "$1 $2" in
    "show hostnames") printf "gpu017\\ngpu018\\n" ;;
    "show job") echo "JobId=$3 Requeue=${{FAKE_REQUEUE:-1}} Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0" ;;
    "requeue "*) echo "requeue $2" >> {t}/scontrol.log ;;
    *) exit 1 ;;
esac
""")
    (bin_dir / "srun").write_text(f"""#!/bin/bash
printf "%s\\0" "$@" > {t}/srun.argv
if [ -n "${{FAKE_SRUN_WAIT:-}}" ]; then
    trap 'echo USR1 >> {t}/srun.signals; exit ${{FAKE_SRUN_RC:-0}}' USR1
    trap 'echo TERM >> {t}/srun.signals; exit 143' TERM
    touch {t}/srun.ready
    for _ in $(seq 600); do sleep 0.1; done
fi
exit ${{FAKE_SRUN_RC:-0}}
""")
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
    """The printed snippet -> (exports {name: value}, comment lines, command argv); checks it is the whole story.
    The torchrun shim is printed once as `TORCHRUN_SHIM='...'` and used as "$TORCHRUN_SHIM": argv holds its text."""
    assert proc.returncode == 0, proc.stderr
    shim = re.search(r"^TORCHRUN_SHIM='([^']*)'$", proc.stdout, re.M)
    assert shim, proc.stdout
    lines = [ln for ln in (proc.stdout[:shim.start()] + proc.stdout[shim.end():]).splitlines() if ln]
    comments = [ln for ln in lines if ln.startswith("#")]
    exports = dict(shlex.split(ln)[1].split("=", 1) for ln in lines if ln.startswith("export "))
    commands = [ln for ln in lines if not ln.startswith(("#", "export ", "cd "))]
    assert len(commands) == 1, proc.stdout
    argv = shlex.split(commands[0])
    assert argv.count("$TORCHRUN_SHIM") == 1 and argv[argv.index("$TORCHRUN_SHIM") - 1] == "-c", commands[0]
    argv[argv.index("$TORCHRUN_SHIM")] = shim[1]
    return exports, comments, argv


def shim_text():
    """TORCHRUN_SHIM as the script defines it (bash evaluates the assignment)."""
    src = SCRIPT.read_text()
    assignment = re.search(r"^TORCHRUN_SHIM='[^']*'$", src, re.M)[0]
    return subprocess.run(["bash", "-c", f'{assignment}\nprintf %s "$TORCHRUN_SHIM"'], capture_output=True,
                          text=True, check=True, timeout=30).stdout


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
    assert torchrun == ["-c", shim_text(), "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=static",
                        "--rdzv_endpoint=gpu017:29742"]      # 29500 + 4242 % 1000
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
    assert argv[argv.index("-c") - 1] == "/opt/env/bin/python"
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
    assert "--nnodes=1" in argv and "--rdzv_endpoint=localhost:29500" in argv
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


def sbatch_directives():
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", SCRIPT.read_text(), re.M))


def test_header_asks_for_a_stop_signal_and_requeue():
    d = sbatch_directives()
    assert "requeue" in d and d["open-mode"] == "append"    # a requeued job appends to its log
    m = re.fullmatch(r"B:USR1@(\d+)", d["signal"])         # to the batch shell, which sends it on to every task
    assert m and 60 <= int(m[1]) <= 900


def _start(fakebin, tmp_path, **env):
    """The script, not dry, with a waiting fake srun; returns the process once srun is up."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _SCRUB}
    e.update(ALLOC, PYTHON="python3", PATH=f"{fakebin}{os.pathsep}{e.get('PATH', '')}", FAKE_SRUN_WAIT="1", **env)
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=e, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "fake srun never started"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_stop_signal_goes_to_srun_as_usr1_and_75_requeues(fakebin, tmp_path, sig):
    """The batch shell (slurm's --signal=B:USR1 target, or a TERM) stays alive and sends SIGUSR1 to srun; when the
    trainers exit 75 the job requeues itself. With `exec srun` the signal hit srun as it was, and nothing requeued."""
    proc = _start(fakebin, tmp_path, FAKE_SRUN_RC="75")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert (tmp_path / "srun.signals").read_text() == "USR1\n"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert f"{sig.name}: asking the trainers to save and stop" in err and "requeueing job 4242" in err


def test_exit_75_without_a_signal_requeues(fakebin, tmp_path):
    """training.exit_duration_mins: the trainers stop by themselves, and the job requeues all the same."""
    proc = run(fakebin=fakebin, dry=False, FAKE_SRUN_RC="75")
    assert proc.returncode == 75 and (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_no_requeue_when_not_requeueable_or_not_stopped(fakebin, tmp_path):
    proc = _start(fakebin, tmp_path, FAKE_SRUN_RC="75", FAKE_REQUEUE="0")      # sbatch --no-requeue
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and not (tmp_path / "scontrol.log").exists()
    assert "resubmit with training.run_dir=runs/genlip-g16-4242" in err
    for rc in (0, 1, 76):                                  # done, failed, stop aborted without a save
        done = run(fakebin=fakebin, dry=False, FAKE_SRUN_RC=str(rc))
        assert done.returncode == rc and not (tmp_path / "scontrol.log").exists()


def _shim(tmp_path, worker_body, *, signal_after_ready=None):
    """The script's torchrun shim on this machine, 2 workers running `worker_body`; returns (exit code, stderr)."""
    worker = tmp_path / "worker.py"
    worker.write_text("import os, signal, sys, time\n" + worker_body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "READY_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", shim_text(), "--standalone", "--nproc_per_node=2", str(worker)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if signal_after_ready is not None:
            deadline = time.monotonic() + 120
            while len(list(tmp_path.glob("ready.*"))) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, "workers never got ready"
                time.sleep(0.1)
            proc.send_signal(signal_after_ready)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_shim_passes_stop_signals_to_workers_and_exits_with_their_75(tmp_path, sig):
    """Plain torchrun dies of SIGUSR1, ends its workers itself on SIGTERM, and exits 1 when they exit 75. A worker
    that torchrun kills after another one's 75 (the stop was saved by then) does not change the verdict."""
    body = """got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
open(os.path.join(os.environ["READY_DIR"], "ready." + os.environ["RANK"]), "w").close()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a trainer past its stop: torchrun's SIGTERM now kills it
time.sleep(5 * int(os.environ["RANK"]))        # rank 1 is still on its way out when rank 0 exits
sys.exit(75 if got and got[0] == %d else 3)
""" % sig
    rc, err = _shim(tmp_path, body, signal_after_ready=sig)
    assert rc == 75, err
    assert "Root Cause" not in err                          # a graceful stop prints no failure report


def test_shim_passes_other_exit_codes_through(tmp_path):
    rc, err = _shim(tmp_path, "sys.exit(2)\n")
    assert rc == 2 and "Root Cause" in err and "exitcode  : 2" in err


# The estimate behind training.save_interval in the stage configs (see their comments).
PEAK, MFU, ROW_TOKENS, ROWS = 989e12, 0.40, 16384, 512
SAMPLE = {1: (196, 74), 2: (1024, 256)}                    # (image, text) tokens of a typical sample


@pytest.mark.parametrize("variant", ["l16", "so16", "g16"])
@pytest.mark.parametrize("stage", [1, 2])
def test_stage_configs_save_hourly_and_stop_before_the_time_limit(variant, stage):
    from genlip_mcore.config import model_config, read_yaml
    from genlip_mcore.train.metrics import step_flops

    tree = read_yaml(ROOT / "examples" / "configs" / f"{variant}_stage{stage}.yaml")
    t, par = tree["training"], tree["parallel"]
    assert t["global_batch_size"] == ROWS and tree["data"]["max_seq_len"] == ROW_TOKENS
    gpus = par["tensor_model_parallel_size"] * par["pipeline_model_parallel_size"] * 32       # DP 32
    ni, nt = SAMPLE[stage]
    k = ROW_TOKENS // (ni + nt)
    row = step_flops(model_config(variant), [ni] * k + [0], [nt] * k + [ROW_TOKENS - k * (ni + nt)], n_lm=k * nt)
    step_s = row * ROWS / (gpus * PEAK * MFU)
    assert 0.8 * 3600 <= t["save_interval"] * step_s <= 1.2 * 3600, (t["save_interval"], step_s)

    hours = re.fullmatch(r"(\d+):00:00", sbatch_directives()["time"])
    limit_min = int(hours[1]) * 60
    lead_min = int(sbatch_directives()["signal"].split("@")[1]) / 60
    if t["train_iters"] * step_s > limit_min * 60:         # needs several jobs: stop before the limit
        assert lead_min < limit_min - t["exit_duration_mins"] <= 60
    else:
        assert "exit_duration_mins" not in t
