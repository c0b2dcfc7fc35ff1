"""Pieces every Ray Train loop in nic shares: devices, checkpoints, early stopping, progress lines,
config hashes, and the few collectives a loop needs to keep its workers in agreement.

Nothing here is specific to encoders; the downstream training loop uses the same helpers.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nic.artifacts import atomic_path
from nic.logs import root_logger

CHECKPOINT_FILE = "state.pt"


# ---------------------------------------------------------------------------- devices


def resolve_device(use_gpu: bool = False) -> torch.device:
    """The device of this process: the Ray Train worker's device inside a run, else CUDA when asked
    for and present. Asking for a GPU that is not there is an error, not a silent CPU run."""
    if in_train_worker():
        import ray.train.torch

        device = ray.train.torch.get_device()
        return device[0] if isinstance(device, list) else device
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but CUDA is not available on this machine")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def in_train_worker() -> bool:
    """True inside a Ray Train worker (where ray.train.get_context() works)."""
    try:
        import ray.train

        ray.train.get_context().get_world_rank()
        return True
    except Exception:  # not in a Train worker: the API raises different errors outside one
        return False


# ---------------------------------------------------------------------------- trainer settings

# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s)
# and a worker's `ray.train.report` returns only after the next poll, so every report costs up to
# one interval. nic reports once per epoch and its epochs are often well under a second (small
# grids, small patch datasets): at 2 s the poll, not the training, set the pace (a 20-epoch fold
# took 45 s instead of 5 s). A quarter of a second keeps the controller's polling cheap.
TRAIN_POLL_INTERVAL_S = 0.25
_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def configure_train_polling() -> None:
    """Shorten the Train controller's poll interval for trainers started from this process, unless
    the user set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S. Ray Train passes the variable on to the
    controller it starts (it is one of the variables propagated from the driver), so this must run
    in the process that calls `TorchTrainer.fit()`, before the call."""
    os.environ.setdefault(_POLL_ENV, str(TRAIN_POLL_INTERVAL_S))


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str | Path, state: Mapping[str, Any], filename: str = CHECKPOINT_FILE) -> Path:
    """torch.save `state` into `directory/filename` atomically; returns the file's path."""
    path = Path(directory) / filename
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    return path


def load_checkpoint(source: Any, filename: str = CHECKPOINT_FILE, map_location: str | torch.device = "cpu") -> dict:
    """The state saved by `save_checkpoint`, from a folder or a `ray.train.Checkpoint`."""
    if hasattr(source, "as_directory"):
        with source.as_directory() as folder:
            return load_checkpoint(folder, filename, map_location)
    path = Path(source) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    # Our own checkpoints hold optimiser states and plain Python values: full unpickling is needed.
    return torch.load(path, map_location=map_location, weights_only=False)


@contextmanager
def checkpoint_dir() -> Iterator[Path]:
    """A temporary folder to build a checkpoint in before `ray.train.report` persists it."""
    with tempfile.TemporaryDirectory(prefix="nic-ckpt-") as folder:
        yield Path(folder)


#: Folder of a CheckpointStore inside its run's folder in the storage path.
STORE_DIR = "nic_checkpoint"


class CheckpointStore:
    """The latest checkpoint of a loop that runs outside Ray Train (the single-worker folds of
    `nic train-downstream`, nic.train.downstream_loop.FoldRunner), kept where Ray Train keeps a
    run's: `<storage>/<name>/nic_checkpoint/`, `storage` being a local path or a URI (the value
    `nic.storage.ray_storage` gives a TorchTrainer, resolved by the driver). `save` replaces the
    files one by one, each atomically (a local file is written beside and renamed into place, an
    object store writes an object whole), `marker` last: a reader that finds the new marker finds
    the rest of that checkpoint too, and a writer killed midway leaves the previous one usable."""

    def __init__(self, storage: str, name: str, marker: str = CHECKPOINT_FILE) -> None:
        import pyarrow.fs as pafs

        self.fs, base = pafs.FileSystem.from_uri(storage)
        self.path = f"{base.rstrip('/')}/{name}/{STORE_DIR}"
        self.marker = marker

    def create(self) -> None:
        """Make the folder now (a local run shows its storage folder when the fold starts)."""
        self.fs.create_dir(self.path, recursive=True)

    def save(self, folder: str | Path) -> None:
        """Persist every file of `folder` (no subfolders), the marker last."""
        from nic.storage import _upload

        files = sorted((p for p in Path(folder).iterdir() if p.is_file()), key=lambda p: (p.name == self.marker, p.name))
        if not any(p.name == self.marker for p in files):
            raise ValueError(f"{folder}: a checkpoint needs its {self.marker}")
        for local in files:
            _upload(self.fs, local, f"{self.path}/{local.name}")

    def fetch(self, into: str | Path) -> bool:
        """Copy the latest checkpoint's files into `into`; False (nothing copied) when there is none."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        found = {i.base_name: i.path for i in infos
                 if i.type == pafs.FileType.File and not i.base_name.startswith(".")}
        if self.marker not in found:
            return False
        into = Path(into)
        into.mkdir(parents=True, exist_ok=True)
        for name, path in found.items():
            with self.fs.open_input_stream(path) as src, open(into / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        return True


# ---------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """Stop when the monitored value has not improved by `min_delta` for `patience` epochs."""

    def __init__(self, patience: int, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True if it is the best so far."""
        if value is None or not math.isfinite(value):
            self.bad_epochs += 1
            return False
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


# ---------------------------------------------------------------------------- loop steps
# The steps the encoder loop (nic.train.encoder_loop) and the fold loop (nic.train.downstream_loop)
# both take every epoch, written once so that a change to how nic checkpoints or reports reaches
# both loops.


class LoopSession(Protocol):
    """What a loop asks of whatever runs it: its rank and world size, and where its reports (and
    checkpoints) go. `TrainSession` inside Ray Train; the fold loop has a second one for folds
    trained on a FoldRunner."""

    rank: int
    world: int

    def report(self, metrics: dict, folder: Path | None = None) -> None: ...


class TrainSession:
    """A loop's session inside a Ray Train worker: DDP rank and world, Train's device and model
    preparation, Train's checkpoints and reports."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        return resolve_device()

    def prepare(self, model: torch.nn.Module, **parallel_strategy_kwargs: Any) -> torch.nn.Module:
        """DDP-wrap `model` (and move it to the worker's device); with one worker Train returns
        it unwrapped."""
        import ray.train.torch

        if parallel_strategy_kwargs:
            return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=parallel_strategy_kwargs)
        return ray.train.torch.prepare_model(model)

    def checkpoint(self) -> Any:
        """The run's latest reported checkpoint (a restarted worker group or a new driver run with
        the same storage path and run name), or None for a fresh run."""
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=None if folder is None else ray.train.Checkpoint.from_directory(str(folder)))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the model itself): what checkpoints save and load, so a
    checkpoint does not depend on the number of workers that wrote it."""
    return getattr(model, "module", model)


def cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of nested dicts/lists of tensors: the snapshot of the best weights so
    far, which later optimiser steps must not change and which a checkpoint pickles."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    return obj


def state_dicts(stateful: Mapping[str, Any]) -> dict[str, Any]:
    """`{name: obj.state_dict()}`, in `stateful`'s order: the trainable part of a checkpoint."""
    return {name: obj.state_dict() for name, obj in stateful.items()}


def load_state_dicts(stateful: Mapping[str, Any], saved: Mapping[str, Any], missing_ok: bool = False) -> None:
    """Give each object its state from a checkpoint written by `state_dicts`, in `stateful`'s
    order; `missing_ok`: an object the checkpoint has no state for keeps its own (a checkpoint
    from before that object existed)."""
    for name, obj in stateful.items():
        if missing_ok and name not in saved:
            continue
        obj.load_state_dict(saved[name])


class Stopwatch:
    """Wall time since the start of an epoch (or an evaluation): what the progress lines and the
    history show, and what an epoch time limit is checked against."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def over(self, minutes: float) -> bool:
        """True once more than `minutes` have passed."""
        return self.seconds() > 60 * minutes


def report_epoch(session: LoopSession, metrics: dict, progress: Any, line: str,
                 state: Callable[[], Mapping[str, Any]], filename: str = CHECKPOINT_FILE) -> None:
    """End an epoch: rank 0 shows its progress line and reports `metrics` with a checkpoint of
    `state()` (built only there, as it is the costly part); the other ranks report the metrics
    alone. Every rank must report every epoch (Ray Train waits for all of them), but one copy of
    the state is all a resume needs."""
    if session.rank != 0:
        session.report(metrics)
        return
    send_progress(progress, line)
    with checkpoint_dir() as folder:
        save_checkpoint(folder, state(), filename)
        session.report(metrics, folder)


# ---------------------------------------------------------------------------- progress


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def epoch_line(stage: str, epoch: int, epochs: int, metrics: Mapping[str, Any], seconds: float | None = None,
               note: str = "") -> str:
    """'[stage] epoch 3/10 loss 0.41 val_loss 0.38 tissue_type acc 0.93 (12.3 s)': task metrics
    written 'task/metric' are shown as 'task metric'."""
    parts = [f"[{stage}] epoch {epoch}/{epochs}"]
    for key, value in metrics.items():
        parts.append(f"{key.replace('/', ' ')} {_fmt(value)}")
    if seconds is not None:
        parts.append(f"({seconds:.1f} s)")
    if note:
        parts.append(note)
    return " ".join(parts)


class ProgressRelay:
    """Lines printed by a Train worker, shown on the driver's stderr as they happen.

    Workers' stdout does not reach the driver when Ray runs quietly, so rank 0 puts its epoch
    lines on a small Ray queue (an actor needing no CPU) and a driver thread prints them.
    """

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="nic-progress")

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone (Ray shutting down): nothing more to print
                return
            root_logger().info(line)  # on the driver: to the terminal and the stage's log file

    def __enter__(self) -> ProgressRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        import ray

        try:
            ray.kill(self.queue.actor)  # type: ignore[arg-type]  # Queue.actor is an ActorHandle; Ray types it as the class too
        except Exception:  # already gone
            pass


def send_progress(queue: Any, line: str) -> None:
    """From a worker: put a line on the relay's queue, or print it if there is none."""
    if queue is None:
        root_logger().info(line)  # in the worker: reaches the terminal as Ray forwards its stderr
        return
    try:
        queue.put_nowait(line)
    except Exception:  # the driver went away; progress is not worth failing a run for
        root_logger().info(line)


# ---------------------------------------------------------------------------- data fingerprints


def path_fingerprint(path: str | Path | None) -> Any:
    """A cheap fingerprint of a data file or folder (names, sizes, modification times), so a stage
    notices that the data behind an unchanged config has changed without reading every byte."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, st.st_mtime_ns]
    if path.is_dir():
        count, size, latest = 0, 0, 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                st = os.stat(os.path.join(root, name))
                count, size, latest = count + 1, size + st.st_size, max(latest, st.st_mtime_ns)
        return [path.name, count, size, latest]
    return [path.name, "missing"]


# ---------------------------------------------------------------------------- collectives


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_worker(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every worker if it is True on any (e.g. 'out of time'), so all stop at the same step."""
    if not _distributed():
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_workers(values: Mapping[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average scalar metrics over workers (each worker's value weighted equally)."""
    if not values or not _distributed():
        return dict(values)
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def gather_columns(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate per-sample arrays from all workers (rank order), for exact whole-set metrics."""
    if not _distributed():
        return dict(columns)
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(columns))
    keys = list(columns)
    return {k: np.concatenate([p[k] for p in parts if p is not None and k in p]) for k in keys}


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every worker rank 0's buffers (BatchNorm statistics drift apart in the last steps)."""
    if not _distributed():
        return
    import torch.distributed as dist

    for buf in module.buffers():
        dist.broadcast(buf, src=0)
