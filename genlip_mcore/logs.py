"""Logging of the command-line tools: our lines and real warnings on the console, third-party chatter in the log file.

Chatter is what a user cannot act on and that drowned our own lines (the quickstart printed about 70 lines of it):
megatron-core's INFO records (the parameter list of every gradient bucket, the DDP and optimizer config dumps, the
Megatron-FSDP banners) and the warnings that megatron-core raises on every CPU machine because Transformer Engine and
Apex, GPU packages, are not installed. Chatter still reaches the log file (`attach_file`), relabelled DEBUG; set
GENLIP_LOG_CHATTER=1 to see it on the console too. Python warnings are routed through logging (`py.warnings`), so a
real warning shows on the console once, in the same stream as our lines, and lands in the file.

Stdlib only, so any module of the package may import it.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path
from typing import TextIO

# Messages of captured warnings (logger "py.warnings") that are chatter: megatron-core's fallbacks on machines without
# Transformer Engine or Apex, its deprecations of its own defaults and shims, and the torch deprecations that its
# distributed checkpointing runs into (ShardedTensor, torch.distributed.checkpoint.load_state_dict).
CHATTER_WARNINGS = re.compile(
    r"Transformer Engine and Apex are not installed|Apex is not installed|"
    r"The following imports from `dynamic_context.py`|tp_group is None, using default tp group|"
    r"`torch.jit.script_method` is deprecated|Please use DTensor instead and we are deprecating ShardedTensor|"
    r"`load_state_dict` is deprecated and will be removed")
CHATTER_LOGGERS = ("megatron",)         # below WARNING, these loggers are chatter
# Notices printed when transformers imports torchao (the `fp8` extra), which it does whenever torchao is installed,
# often before any entry point has set up logging (Python's last-resort handler then prints them): torchao's CUDA
# kernels (_C_mxfp8, _C_cutlass_90a) do not load on a machine without CUDA, which the Python paths we use do not
# need, and torch's pytree announces, through torch's own handler, each enum torchao registers. Dropped on their
# loggers from the moment this module is imported; GENLIP_LOG_CHATTER=1 keeps them.
IMPORT_NOTICES = {"torchao": re.compile(r"^Failed to load .*\.so"),
                  "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported by torch")}
FORMAT = "%(asctime)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
_TAG = "_genlip_handler"                # marks the handlers this module installed, so setup() can be called again
_BUFFER = 10_000                        # records kept for the log file until it is attached


def is_chatter(record: logging.LogRecord) -> bool:
    if record.name == "py.warnings":
        return bool(CHATTER_WARNINGS.search(record.getMessage()))
    return record.levelno < logging.WARNING and record.name.split(".")[0] in CHATTER_LOGGERS


class _DropNotice(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("GENLIP_LOG_CHATTER") == "1" or not self.pattern.search(record.getMessage())


def _drop_import_notices() -> None:
    for name, pattern in IMPORT_NOTICES.items():
        logger = logging.getLogger(name)                  # the same object the library logs through later
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(pattern))


_drop_import_notices()


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_chatter(record)


class _FileFilter(logging.Filter):
    """Keeps everything; chatter is relabelled DEBUG (in the file only: the console never shows it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_chatter(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _Console(logging.StreamHandler):
    """A StreamHandler on sys.stdout or sys.stderr as they are at each record (pytest and redirect_stdout swap them),
    never on a stream object captured at setup that may be closed by then."""

    def __init__(self, name: str):
        self._which = name
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Buffer(logging.handlers.MemoryHandler):
    """Holds the records emitted before the log file is known (the run dir comes from the config); bounded."""

    def __init__(self):
        super().__init__(capacity=_BUFFER, flushLevel=logging.CRITICAL + 1)

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.buffer) < self.capacity:
            self.buffer.append(record)


def _ours(handler: logging.Handler) -> bool:
    return getattr(handler, _TAG, False)


def _install(root: logging.Logger, handler: logging.Handler, fmt: str, flt: logging.Filter) -> logging.Handler:
    handler.setFormatter(logging.Formatter(fmt, datefmt=DATEFMT))
    handler.addFilter(flt)
    setattr(handler, _TAG, True)
    root.addHandler(handler)
    return handler


def reset() -> None:
    """Remove what setup() and attach_file() installed (for code that calls an entry point's main() in-process and
    goes on, like the tests)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if _ours(h)]:
        root.removeHandler(h)
        h.close()
    logging.captureWarnings(False)


def setup(level: int = logging.INFO, stream: str = "stdout", fmt: str = FORMAT) -> None:
    """Console logging for a command-line entry point (replaces logging.basicConfig) on sys.`stream` ("stdout" or
    "stderr"). Idempotent: a second call replaces the handlers of the first. Records are buffered for `attach_file`
    until it is called."""
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream must be 'stdout' or 'stderr', got {stream!r}")
    reset()
    root = logging.getLogger()
    root.setLevel(min(level, logging.INFO))
    console = _install(root, _Console(stream), fmt,
                       logging.Filter() if os.environ.get("GENLIP_LOG_CHATTER") == "1" else _ConsoleFilter())
    console.setLevel(level)
    _install(root, _Buffer(), FILE_FORMAT, _FileFilter())
    logging.captureWarnings(True)


def attach_file(path: str | Path) -> Path:
    """Write every record (chatter at DEBUG) to `path` from now on, starting with those buffered since setup()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    file = _install(root, logging.FileHandler(path, encoding="utf-8"), FILE_FORMAT, _FileFilter())
    for buf in [h for h in root.handlers if isinstance(h, _Buffer)]:
        for record in buf.buffer:
            file.handle(record)
        root.removeHandler(buf)
        buf.buffer.clear()
    return path
