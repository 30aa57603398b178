"""Graceful stop (genlip_mcore/train/stop.py): a signal only sets a flag; a second one or an outlasted grace period
exits at once without saving (observed in a child process); a forked helper survives the first signal and its
signals are not the trainer's; handlers are restored; the wall-clock verdict; and a
one-rank tiny run that stops on SIGUSR1 or exit_duration_mins, saves at that step, raises Stopped (75), and resumes
to the uninterrupted run's losses bitwise."""

import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from genlip_mcore import config as C
from genlip_mcore.train import stop
from tests.conftest import free_port
from tests.distributed.launch import REPO

# A child process for what ends in os._exit. argv: mode [port].
CHILD = r"""
import signal, sys, time
from genlip_mcore.train.stop import Stopper

mode = sys.argv[1]
if mode == "many_fds":                               # a trainer with more than 1024 descriptors open
    import os, resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
with Stopper(None, 0.2 if mode.startswith("grace") else 600, repeat_window=3600 if mode == "repeat" else 0) as s:
    if mode == "grace_agreed":                       # no signal here: the stop was agreed (budget over)
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
        s.exit_duration_mins = 1e-9
        print("agreed:", s.agree(), flush=True)
    elif mode == "fork":                             # a helper process in the trainer's process group
        import os
        pid = os.fork()
        if pid == 0:
            signal.raise_signal(signal.SIGTERM)      # absorbed: the trainer will end it after its save
            os.write(1, b"child survived one\n")
            signal.raise_signal(signal.SIGTERM)      # a second one acts as before
            os._exit(0)
        print("child:", os.waitpid(pid, 0)[1] & 0x7F, flush=True)
    else:
        s.saved = mode == "saved"
        signal.raise_signal(signal.SIGTERM)
        if mode != "grace_signal":
            signal.raise_signal(signal.SIGTERM)
    if mode not in ("repeat", "fork"):
        time.sleep(300)                              # only the watcher can end this
print("returned with", s.signum, flush=True)
"""


def _child(mode):
    args = [sys.executable, "-c", CHILD, mode] + ([str(free_port())] if mode == "grace_agreed" else [])
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=240)


def test_a_second_signal_exits_at_once_without_saving():
    p = _child("twice")
    assert p.returncode == stop.EXIT_ABORTED == 76, p.stderr
    assert "a second stop signal (SIGTERM): exiting now with code 76 (nothing saved" in p.stderr
    assert "returned" not in p.stdout


def test_the_watcher_works_past_1024_descriptors():
    """select() refuses a descriptor number above 1023; the watcher must still see the second signal."""
    p = _child("many_fds")
    assert p.returncode == stop.EXIT_ABORTED, p.stderr
    assert "a second stop signal (SIGTERM)" in p.stderr


def test_a_second_signal_after_the_stop_save_exits_75():
    p = _child("saved")
    assert p.returncode == stop.EXIT_STOPPED, p.stderr
    assert "the stop checkpoint was saved" in p.stderr


def test_a_repeat_inside_the_window_is_the_same_request():
    """torchrun forwards the SIGTERM it got; slurm signals every process of a step: one request, twice."""
    p = _child("repeat")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"returned with {int(signal.SIGTERM)}"


def test_a_forked_helper_survives_the_first_signal_and_does_not_count_as_the_trainer():
    p = _child("fork")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["child survived one", f"child: {int(signal.SIGTERM)}", "returned with None"]


@pytest.mark.parametrize("mode", ["grace_signal", "grace_agreed"])
def test_a_stop_that_outlasts_the_grace_period_exits_without_saving(mode):
    p = _child(mode)
    assert p.returncode == stop.EXIT_ABORTED, p.stderr
    assert "the stop did not finish within training.stop_grace_secs=0.2: exiting now with code 76" in p.stderr
    if mode == "grace_agreed":
        assert "agreed: exit_duration_mins=1e-09 reached" in p.stdout


def _handlers():
    return [signal.getsignal(s) for s in stop.STOP_SIGNALS]


def test_the_handler_sets_a_flag_and_the_previous_handlers_come_back():
    before = _handlers()
    with pytest.raises(KeyError):
        with stop.Stopper(None, 600, repeat_window=3600) as s:
            assert _handlers() == [s._on_signal] * 3
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGINT)           # a quick repeat: still the first request
            assert s.signum == signal.SIGUSR1
            raise KeyError("leaving by an exception restores too")
    assert _handlers() == before
    assert signal.set_wakeup_fd(-1) == -1                # the interpreter's wakeup fd is back to none


def test_exit_duration_verdict_counts_from_the_start():
    now = time.time()
    assert stop.Stopper(1.0, 600, started_at=now - 61).over_budget()
    assert not stop.Stopper(1.0, 600, started_at=now).over_budget()
    assert not stop.Stopper(None, 600, started_at=0).over_budget()
    assert stop.PROCESS_START <= now


def test_the_process_start_is_the_start_of_the_process_not_of_the_import():
    code = "import time; time.sleep(2); import genlip_mcore.train.stop as s; print(time.time() - s.PROCESS_START)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert float(out.stdout) >= 2.0, out.stderr


def test_agree_names_the_reason(mcore_world):
    with stop.Stopper(None, 600) as s:
        assert s.agree() is None
        s.signum = signal.SIGTERM
        assert s.agree() == "SIGTERM"
    with stop.Stopper(0.5, 600, started_at=time.time() - 60) as s:
        assert s.agree() == "exit_duration_mins=0.5 reached"


def test_a_signal_during_start_up_is_the_first_request(mcore_world):
    """genlip-pretrain records stop signals from its first line; the loop's Stopper takes them over."""
    from genlip_mcore import procutil

    old = {s: signal.getsignal(s) for s in stop.STOP_SIGNALS}
    try:
        procutil.defer_stop_signals()
        signal.raise_signal(signal.SIGUSR1)                    # would kill the process under the default action
        assert procutil.PENDING == [signal.SIGUSR1]
        with stop.Stopper(None, 600) as s:
            assert s.agree() == "SIGUSR1" and procutil.PENDING == []
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_a_malformed_fault_spec_names_the_variable(monkeypatch):
    monkeypatch.setenv("GENLIP_FAULT", "signal:TERM@x")
    with pytest.raises(RuntimeError, match=r"GENLIP_FAULT='signal:TERM@x': expected signal:<NAME>@<iteration>"):
        stop.fault_point(1)


# ------------------------------------------------------------------------------------------------------------------
# A one-rank tiny run
# ------------------------------------------------------------------------------------------------------------------
def _cfg(run_dir, *extra):
    return C.load(None, ["model.variant=tiny", "data.max_seq_len=128", "training.global_batch_size=2",
                         "training.train_iters=4", "training.log_interval=10", f"training.run_dir={run_dir}",
                         *extra], world_size=1)


def _losses(results):
    return [(r.loss, r.grad_norm) for r in results]


def test_a_stop_saves_at_that_step_exits_75_and_resumes_bitwise(mcore_world, tmp_path, monkeypatch, caplog):
    from genlip_mcore import ckpt
    from genlip_mcore.train.loop import train

    caplog.set_level(logging.INFO, logger="genlip_mcore.train")
    straight = _losses(train(_cfg(tmp_path / "a")))
    before = _handlers()

    monkeypatch.setenv("GENLIP_FAULT", "signal:SIGUSR1@2")
    with pytest.raises(stop.Stopped) as e:
        train(_cfg(tmp_path / "b", "training.save_interval=3"))
    assert (e.value.code, e.value.reason, e.value.iteration) == (75, "SIGUSR1", 2)
    assert _handlers() == before
    save_dir = tmp_path / "b" / "checkpoints"
    assert [p.name for p in ckpt.checkpoints(save_dir)] == ["iter_0000002"]
    assert ckpt.resolve(save_dir).name == "iter_0000002"
    assert any(m.startswith("stopping at iteration 2 (SIGUSR1): saved ") and "exiting with code 75" in m
               for m in caplog.messages)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2]         # the stop step is logged although log_interval is 10
    assert rows[0]["loss"] == straight[1][0]

    monkeypatch.delenv("GENLIP_FAULT")
    resumed = train(_cfg(tmp_path / "b", f"training.load_dir={save_dir}"))
    assert _losses(resumed) == straight[2:]
    assert _handlers() == before

    caplog.clear()
    again = train(_cfg(tmp_path / "c", f"training.load_dir={save_dir}"))     # latest is iteration 4 now
    assert again == [] and not (tmp_path / "c" / "checkpoints").exists()
    assert "nothing to do: resumed at iteration 4 and training.train_iters is 4; no step taken, nothing saved" \
        in caplog.messages


def test_exit_duration_saves_and_stops_and_warns_without_a_save_interval(mcore_world, tmp_path, caplog):
    from genlip_mcore import ckpt
    from genlip_mcore.train.loop import train

    caplog.set_level(logging.INFO, logger="genlip_mcore.train")
    with pytest.raises(stop.Stopped) as e:
        train(_cfg(tmp_path, "training.exit_duration_mins=1e-6"))
    assert (e.value.code, e.value.iteration) == (75, 1)
    assert e.value.reason == "exit_duration_mins=1e-06 reached"
    assert ckpt.resolve(tmp_path / "checkpoints").name == "iter_0000001"
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "training.save_interval=0: only the save at the exit protects this run" in warning.getMessage()
