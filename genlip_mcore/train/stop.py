"""Graceful stop: a signal or the wall-clock budget ends a run at a step boundary, with a checkpoint.

The contract the slurm script relies on: SIGTERM, SIGINT or SIGUSR1 on any trainer process asks for a stop. The
handler only records the signal. At every step boundary all ranks agree with one all-reduce (MAX) of two ints: a
signal seen by some rank, and whether some rank's clock is past `training.exit_duration_mins`. On a stop the loop
saves a checkpoint at that iteration (unless it has just saved one), logs why, and raises `Stopped`, whose exit code
is EXIT_STOPPED = 75 (EX_TEMPFAIL: "saved, resume me").

A second stop signal while a stop is pending, or a stop that has not finished `training.stop_grace_secs` after it was
requested (or agreed, on ranks that saw no signal), exits at once with EXIT_ABORTED = 76, saving nothing: saves are
published by a rename (genlip_mcore/ckpt.py), so the previous checkpoint stays whole. Python runs signal handlers
only between bytecodes of the main thread, which may be blocked in a collective or a save; so a watcher thread reads
the signal numbers that the interpreter writes to its wakeup fd, and does the counting and the timing itself.
A repeat within REPEAT_WINDOW_S of the first signal is the same request, not a second one: launchers deliver one
request twice (slurm signals every process of a step, and torchrun forwards the SIGTERM or SIGINT it got itself).

The wall-clock budget counts, as in Megatron, from the earliest start of any rank: Megatron takes the import time of
its training module, reduced with MIN over ranks; we take each process's start time (from /proc; the import time of
this module where there is none), and the MAX of per-rank verdicts is the verdict of the earliest start.
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("genlip_mcore.train")

EXIT_STOPPED = 75           # a checkpoint was saved at the stop: resume from it
EXIT_ABORTED = 76           # second signal or grace period over: nothing saved by this stop, the previous one stands
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_WINDOW_S = 2.0
_ARM, _QUIT = 0, 255        # bytes the main thread writes to the watcher's pipe (signal numbers are 1..64)


def _process_start() -> float:
    """Wall-clock time at which this process started (Linux), else now."""
    now = time.time()
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])    # field 22, starttime
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)                             # the clock it counts on
        return min(now, now - since_boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return now


PROCESS_START = _process_start()


class Stopped(SystemExit):
    """Raised by the training loop once the stop checkpoint is saved. A SystemExit with code EXIT_STOPPED, so the
    CLI exits 75 without a traceback, and in-process callers can catch it."""

    def __init__(self, reason: str, iteration: int):
        super().__init__(EXIT_STOPPED)
        self.reason, self.iteration = reason, iteration


class Stopper:
    """Stop requests of one train() call. A context manager: handlers and the wakeup fd are installed on entry and
    the previous ones restored on exit. Off the main thread nothing is installed (Python allows handlers there
    only), but `agree()` still takes part in the all-reduce, which every rank must call at every step boundary."""

    def __init__(self, exit_duration_mins: Optional[float], grace_secs: float, *, started_at: float = PROCESS_START,
                 repeat_window: float = REPEAT_WINDOW_S):
        self.exit_duration_mins, self.grace_secs = exit_duration_mins, grace_secs
        self.started_at, self.repeat_window = started_at, repeat_window
        self.signum: Optional[int] = None       # the first stop signal this process received
        self.saved = False                      # the stop checkpoint is written: an abort from here on exits 75
        self._old: dict = {}
        self._thread: Optional[threading.Thread] = None

    # -- install / restore ------------------------------------------------------------------------------------------
    def __enter__(self) -> "Stopper":
        global _active
        if threading.current_thread() is not threading.main_thread():
            log.warning("train() is not on the main thread: stop signals are not handled")
            return self
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)         # the interpreter's signal-time write must never block
        self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="genlip-stop-watch", daemon=True)
        self._thread.start()
        _active = self
        from genlip_mcore import procutil

        if procutil.PENDING:                    # a signal during start-up (procutil.defer_stop_signals)
            self.signum = procutil.PENDING[0]
            procutil.PENDING.clear()
            os.write(self._w, bytes([_ARM]))    # its grace period starts now
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if self._thread is None:
            return
        self._restore()
        os.write(self._w, bytes([_QUIT]))
        self._thread.join()
        os.close(self._r)
        os.close(self._w)
        self._thread, _active = None, None

    def _restore(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)    # None: a handler not set from Python
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    # -- the watcher thread -----------------------------------------------------------------------------------------
    def _watch(self) -> None:
        first_signal = deadline = None
        poller = select.poll()           # not select(): a trainer can hold more than 1024 descriptors
        poller.register(self._r, select.POLLIN)
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not poller.poll(None if timeout is None else int(timeout * 1000) + 1):
                self._abort(f"the stop did not finish within training.stop_grace_secs={self.grace_secs:g}")
            for b in os.read(self._r, 256):
                if b == _QUIT:
                    return
                now = time.monotonic()
                if b in STOP_SIGNALS:
                    if first_signal is None:
                        first_signal = now
                    elif now - first_signal >= self.repeat_window:
                        self._abort(f"a second stop signal ({signal.Signals(b).name})")
                if (b == _ARM or b in STOP_SIGNALS) and deadline is None:
                    deadline = now + self.grace_secs

    def _abort(self, why: str) -> None:
        # No logging here: the main thread may hold a handler's lock. One line to stderr, then out.
        code = EXIT_STOPPED if self.saved else EXIT_ABORTED
        what = "the stop checkpoint was saved" if self.saved else "nothing saved, the previous checkpoint stands"
        os.write(2, f"genlip-pretrain: {why}: exiting now with code {code} ({what})\n".encode())
        os._exit(code)

    # -- the step boundary ------------------------------------------------------------------------------------------
    def over_budget(self) -> bool:
        return (self.exit_duration_mins is not None
                and (time.time() - self.started_at) / 60 >= self.exit_duration_mins)

    def agree(self) -> Optional[str]:
        """Called by every rank at every step boundary: one all-reduce (MAX) over the world. Returns why the run
        stops (a signal name, or exit_duration_mins), or None. Touches nothing the step computes."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        flags = torch.tensor([self.signum or 0, int(self.over_budget())], dtype=torch.int32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, over = flags.tolist()
        if not (signum or over):
            return None
        if self._thread is not None:
            os.write(self._w, bytes([_ARM]))    # the grace period runs from here on ranks that saw no signal
        if signum:
            return signal.Signals(signum).name
        return f"exit_duration_mins={self.exit_duration_mins:g} reached"


_active: Optional[Stopper] = None


def _in_forked_child() -> None:
    """A process forked by a trainer (a checkpoint writer, a data-loader worker) shares its process group, so
    torchrun and slurm signal it together with the trainer. Killed, it would take the stop's save down with it:
    it absorbs the first stop signal (its trainer ends it after saving) and a second one acts as before. Nor may
    it share the trainer's wakeup fd, where its signals would count as the trainer's."""
    global _active
    s, _active = _active, None          # its own children inherit its handlers; our fds are not theirs to close
    if s is None:
        return
    old = dict(s._old)

    def absorb_once(signum, frame):
        for sig, h in old.items():
            signal.signal(sig, signal.SIG_DFL if h is None else h)

    try:
        signal.set_wakeup_fd(s._old_fd)
        for sig in STOP_SIGNALS:
            signal.signal(sig, absorb_once)
        os.close(s._r)
        os.close(s._w)
    except (OSError, ValueError):
        pass


os.register_at_fork(after_in_child=_in_forked_child)


def fault_point(iteration: int) -> None:
    """Fault injection for the stop tests: GENLIP_FAULT=signal:<NAME>@<iteration>[:<rank>] makes this process (only
    global rank <rank>, when given) raise that signal right after that iteration's step. raise_signal runs the Python
    handler before it returns, so the stop is agreed at that very boundary."""
    spec = os.environ.get("GENLIP_FAULT", "")
    if not spec.startswith("signal:"):
        return
    m = re.fullmatch(r"signal:(SIG[A-Z0-9]+)@(\d+)(?::(\d+))?", spec)
    if not m or not hasattr(signal, m[1]):
        raise RuntimeError(f"GENLIP_FAULT={spec!r}: expected signal:<NAME>@<iteration>[:<rank>]")
    if int(m[2]) == iteration and (m[3] is None or int(m[3]) == dist.get_rank()):
        signal.raise_signal(getattr(signal, m[1]))
