"""How every stage's `run_*(config)` meets its files: the `stage_storage` decorator.

It locks the stage's `out` folder for the run (nic.locks), fetches the object-store inputs its
config names (nic.storage), mirrors `out` to its URI, and turns the storage failures every stage
shares into exit codes: another run holds `out` (75), `out` or an input cannot be used (2), a full
disk or a failed upload (1). It also keeps the run's log file, `<out>/<stage>.log` (nic.logs), open
while the stage runs, inside the mirror of an object-store `out` so that it is uploaded with the
outputs. It sits above nic.config (which fields name files), nic.locks,
nic.artifacts and nic.storage, so that nic.storage itself imports nothing else of nic.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from nic.artifacts import is_no_space, no_space_message
from nic.config.base import path_fields
from nic.locks import EXIT_LOCKED, LOCK_NAME, LockedError, out_lock
from nic.logs import stage_log_file, stage_logger
from nic.storage import UploadError, display, ensure_local, mirrored_output, uri_for

F = TypeVar("F", bound=Callable[..., Any])


def stage_storage(run: F | None = None, *, lazy: Iterable[str] = ()) -> Any:
    """Decorator of a stage's `run_*(config, ...)`: its `out` folder is locked for the run (one run
    per folder, nic.locks: exit code 75 naming the other run), mirrored inputs named by the config's
    Path fields are fetched and its `out` is a `mirrored_output` (`@stage_storage(lazy=("tiles",))`:
    its per-slide folders are not fetched, the stage checks them from a listing). Slide lists and
    encoder names are resolved where they are opened instead (a driver needs no copy of thousands of
    slides). A full disk ends the stage with a message naming the file (exit code 1), not a
    traceback."""
    if run is None:
        return functools.partial(stage_storage, lazy=tuple(lazy))
    lazy_folders = tuple(lazy)

    @functools.wraps(run)
    def wrapper(config, *args, **kwargs):
        stage = run.__name__.removeprefix("run_").replace("_", "-")
        logger = stage_logger(stage)
        inputs, out = [], None
        for name, lazy in path_fields(type(config)):
            value = getattr(config, name)
            if value is None or lazy or name == "storage_path":
                continue
            if name == "out":
                out = value
            else:
                inputs.append(value)
        try:
            with contextlib.ExitStack() as stack:
                if out is not None:
                    try:
                        stack.enter_context(out_lock(out, stage))
                    except OSError as exc:
                        if is_no_space(exc):
                            raise
                        logger.error(f"nic {stage}: cannot use the out folder {display(out)} "
                                     f"({display(Path(out) / LOCK_NAME)}): {exc}")
                        return 2
                return _run_stage(run, config, args, kwargs, inputs, out, lazy_folders, stage)
        except LockedError as exc:
            logger.error(f"nic {stage}: {exc}")
            return EXIT_LOCKED
        except Exception as exc:
            if not is_no_space(exc):
                raise
            logger.error(f"nic {stage}: {no_space_message(exc, display(out) if out is not None else None)}; free "
                         "some space (or choose another out folder) and re-run: complete outputs are kept, partial "
                         "ones never look complete")
            return 1

    return wrapper


def _run_stage(run: Callable[..., Any], config: Any, args: tuple, kwargs: dict, inputs: list, out: Any,
               lazy: tuple[str, ...] = (), stage: str = "") -> Any:
    logger = stage_logger(stage)
    try:
        for value in inputs:
            ensure_local(value)
    except (FileNotFoundError, OSError) as exc:
        logger.error(f"nic: {exc}")
        return 2
    if out is None:
        return run(config, *args, **kwargs)
    if uri_for(out) is None:
        return _run_logged(run, config, args, kwargs, out, logger)
    try:
        with mirrored_output(out, lazy):  # the log is written in the mirror and uploaded with the rest
            return _run_logged(run, config, args, kwargs, out, logger)
    except UploadError as exc:
        logger.error(f"nic: {exc}")
        return 1


def _run_logged(run: Callable[..., Any], config: Any, args: tuple, kwargs: dict, out: Any,
                logger: logging.Logger) -> Any:
    """The run with its log file `<out>/<stage>.log` open (nic.logs), closed before `out` is
    uploaded, so that the bucket gets the whole log, also of a run that failed."""
    with stage_log_file(logger, out, config) as log:
        code = run(config, *args, **kwargs)
        log.note(f"exit code {code}")
        return code
