"""Tiny process helpers, importable by spawned children without pulling in torch or megatron."""

from __future__ import annotations

import sys


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))   # 1 = PR_SET_PDEATHSIG


PENDING: list[int] = []     # stop signals received before the training loop installed its own handlers


def defer_stop_signals() -> None:
    """For the start-up of a trainer (imports, model build, resume): SIGTERM, SIGINT and SIGUSR1 are recorded in
    PENDING instead of killing the process; the training loop's stop handling picks them up and stops after the
    first step, with a checkpoint."""
    import signal

    def record(signum, _frame):
        PENDING.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, record)


def serve_until_parent_dies() -> None:
    """die_with_parent, and deaf to the stop signals. A helper process of a trainer (the checkpoint writer's queue
    server) must outlive a SIGTERM/SIGINT/SIGUSR1/SIGHUP sent to the whole process group, because the trainer
    answers that signal by saving a checkpoint through it. It still dies when the trainer does."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()
