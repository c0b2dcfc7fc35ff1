"""One way to log: a logger per stage on Python's `logging`, and a log file kept with each stage's
outputs (`<out>/<stage>.log`, as STAMP keeps one in each output folder).

Why a module of its own: every stage used to print its progress through a hand-rolled `_say`, so
nothing of a run was kept once the terminal scrolled away. Here the terminal sees exactly the
lines it saw before (the message alone, on the stream the stage always used: stderr, or stdout
for synth), and `stage_log_file` adds, for one run, a file handler that keeps the same lines with
a time and a level, the run's resolved config as YAML and, when the run fails, its traceback. A
re-run appends under a dated header (a resumed run keeps the story of the runs before it).

All of nic's loggers are children of the `nic` logger, which alone holds the handlers: the
terminal handler, attached once per process (also in Ray workers and forked tiling workers, so a
line logged there reaches the terminal as a print did), and during a run its file handler, so
warnings of the lower layers (locks, Ray start-up) land in the stage's file too. `nic` does not
propagate to the root logger: a library that configures the root (Ray, a notebook) neither
duplicates nor reformats nic's lines. Nested runs (the stages of `nic pipeline`) each attach their
own file, so pipeline.log holds every line and each stage's folder its own.

This module is the lowest layer, below nic.storage: it imports nothing of nic (the config is dumped
through its pydantic `model_dump`, not through nic.config), so that every layer may log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ROOT = "nic"
#: The per-stage loggers are `nic.stage.<stage>`; code below the stages logs to `nic` itself.
STAGE_PREFIX = f"{ROOT}.stage."
#: The format of the log file; the terminal shows the message alone.
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"

#: `logger.info(message, extra=TO_STDOUT)`: this line goes to stdout on the terminal, as the print
#: it replaced did (synth's summary); every other line goes to stderr.
TO_STDOUT = {"stream": "stdout"}

_lock = threading.Lock()


class _TerminalHandler(logging.Handler):
    """The message alone, on stderr (stdout for a line logged with `extra=TO_STDOUT`), looked up at
    each line: pytest's capsys and other redirections swap `sys.stderr` after import, and a print
    followed them."""

    def emit(self, record: logging.LogRecord) -> None:
        stream: TextIO = sys.stdout if getattr(record, "stream", None) == "stdout" else sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed or broken stream must not end the run
            self.handleError(record)


class _FileHandler(logging.FileHandler):
    """A file handler that drops a line it cannot write (a full disk, a vanished folder) without
    logging's "--- Logging error ---" traceback on the terminal: the stage reports such failures
    itself, and the log is a record of the run, never a reason to fail or clutter it."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def root_logger() -> logging.Logger:
    """The `nic` logger, with its terminal handler attached (once per process)."""
    logger = logging.getLogger(ROOT)
    with _lock:
        if not any(isinstance(h, _TerminalHandler) for h in logger.handlers):
            handler = _TerminalHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
    return logger


def stage_logger(stage: str) -> logging.Logger:
    """The logger of one stage (`tile`, `train-encoder`, ...). Its lines reach the terminal as the
    stage's prints did (the message alone, on stderr unless logged with `extra=TO_STDOUT`), and the
    stage's log file while `stage_log_file` is open."""
    root_logger()
    return logging.getLogger(STAGE_PREFIX + stage)


def log_path(out_dir: str | Path, stage: str) -> Path:
    """Where a stage's log is kept: `<out>/<stage>.log` (a local path; for an object-store `out`
    the mirror folder, uploaded with the other outputs)."""
    return Path(out_dir) / f"{stage}.log"


def _stage_of(logger: logging.Logger) -> str:
    return logger.name.removeprefix(STAGE_PREFIX).removeprefix(ROOT + ".") if logger.name != ROOT else ROOT


def _dump(config: Any) -> str:
    if config is None:
        return "(none)\n"
    if hasattr(config, "model_dump"):
        import yaml

        return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return f"{config!r}\n"


@dataclass
class StageLogFile:
    """The open log file of one run: `note` writes to the file only (headers, the exit code, a
    traceback), never to the terminal."""

    path: Path
    handler: logging.FileHandler

    def note(self, text: str) -> None:
        with contextlib.suppress(Exception):  # the log is a record of the run, never a reason to fail it
            self.handler.acquire()
            try:
                stream = self.handler.stream
                if stream is not None:  # None once closed
                    stream.write(text if text.endswith("\n") else text + "\n")
                    stream.flush()
            finally:
                self.handler.release()


def _version() -> str:
    """nic's version from its installed metadata (not `nic.__version__`: this module imports nothing
    of nic, so that nic.storage, at the base, may log)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nic")
    except PackageNotFoundError:
        return "unknown"


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


@contextlib.contextmanager
def stage_log_file(logger: logging.Logger, out_dir: str | Path, config: Any = None) -> Iterator[StageLogFile]:
    """For one run: append to `<out_dir>/<stage>.log` a dated header and the resolved config as
    YAML, then keep every line of nic's loggers (this stage's and the layers below it) and every
    Python warning in it until the run ends; at a failure its traceback too. The handler is removed
    afterwards, so that many runs in one process (tests, `nic pipeline`) do not pile up handlers.
    `config.verbose` turns DEBUG lines on, on the terminal and in the file, for the run."""
    stage = _stage_of(logger)
    path = log_path(out_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = root_logger()
    handler = _FileHandler(path, mode="a", encoding="utf-8", delay=False)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    log = StageLogFile(path, handler)
    gap = "\n" if path.stat().st_size else ""  # a blank line between this run and the one before
    log.note(f"{gap}===== nic {stage}: run started {_stamp()} (pid {os.getpid()} on {socket.gethostname()}, "
             f"nic {_version()}) =====")
    log.note("--- resolved config ---\n" + _dump(config) + "--- end of config ---")
    level = root.level
    if getattr(config, "verbose", False):
        root.setLevel(logging.DEBUG)
    shown = warnings.showwarning

    def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        shown(message, category, filename, lineno, file, line)
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        handler.handle(logging.LogRecord(ROOT + ".warnings", logging.WARNING, filename, lineno, text, None, None))

    warnings.showwarning = showwarning
    root.addHandler(handler)
    try:
        yield log
    except BaseException as exc:
        log.note(f"{_stamp()} the run ended with {type(exc).__name__}:\n" + "".join(traceback.format_exception(exc)))
        raise
    finally:
        root.removeHandler(handler)
        if warnings.showwarning is showwarning:
            warnings.showwarning = shown
        root.setLevel(level)
        log.note(f"===== nic {stage}: run ended {_stamp()} =====")
        handler.close()
