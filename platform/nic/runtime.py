"""The one place that connects to Ray, and the one rule of when a stage that can run without it
does (`use_ray`).

Embedded by default (a local instance sized to this machine), a cluster when an address is given
by flag or `RAY_ADDRESS`. Quiet by default: stages print their own one-line progress instead of
Ray's logs and progress bars, which `verbose` brings back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nic.config.base import RayOptions
from nic.logs import stage_logger

_PLATFORM_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RayInfo:
    address: str
    embedded: bool
    num_cpus: float
    num_gpus: float
    num_nodes: int


#: Device files one of which exists on Linux wherever torch.cuda can find a device: the NVIDIA
#: driver (bare metal, containers), WSL2's GPU bridge, AMD's compute driver (ROCm builds of torch).
_GPU_DEVICE_FILES = ("/proc/driver/nvidia/gpus", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _may_have_gpu() -> bool:
    """False only where torch.cuda certainly finds no device: Linux without any GPU driver's files."""
    if not sys.platform.startswith("linux"):
        return True  # no cheap test elsewhere: ask torch
    return any(os.path.exists(path) for path in _GPU_DEVICE_FILES)


def local_gpu_count() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA).

    Importing torch only to count devices costs seconds of an embedded start (a large share of a
    small job's), and most machines have none to count: where no GPU driver is installed the
    answer is 0 without importing torch."""
    if not _may_have_gpu():
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # torch missing or broken CUDA install: run on CPU
        return 0


def _runtime_env() -> dict:
    """Workers on a cluster must import the same `nic` as the driver: the package is shipped to
    every node (`py_modules`), so a job submitted with `--working-dir` runs its own code even where
    another version is installed; it merges with a job's own runtime env, which sets `working_dir`.
    (An embedded instance needs none: see `_embedded_worker_env`.)"""
    return {"py_modules": [str(_PLATFORM_DIR / "nic")]}


@contextlib.contextmanager
def _embedded_worker_env() -> Iterator[None]:
    """platform/ on PYTHONPATH while an embedded instance starts, so its workers import this `nic`
    (runs from a source checkout that is not installed).

    The workers of an embedded instance are children of the raylet that `ray.init` starts from
    this process, so they inherit its environment as it is during `ray.init`; afterwards the
    driver's own environment is put back. This replaces a job-level `runtime_env` of env_vars,
    which made every worker of the job need that environment: the workers Ray prestarts at
    `ray.init` (one per CPU) have none, so they sat idle and the first task of every command
    waited for a new worker process to start (a second or more of a small job's start-up).
    """
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PLATFORM_DIR), before]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def use_ray(options: RayOptions) -> bool:
    """Whether a stage that can also run without Ray (`nic tile`, `nic compress`) should use it.

    Ray when there is a cluster to use: an address (flag or `RAY_ADDRESS`), or Ray already running
    in this process (`nic pipeline` connects once for all its steps; a `nic tune` trial runs in a
    Ray worker; the tests' session instance). Otherwise the stage runs in this process and local
    workers: starting an embedded Ray instance costs seconds (`ray.init`, its workers, Ray Data),
    more than a small job's whole work, and on one machine gives these stages nothing they need.
    Decided without importing ray (a second of start-up where it is not imported yet)."""
    if options.address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def connect(options: RayOptions | None = None, verbose: bool = False) -> RayInfo:
    """Connect to (or start) Ray once per process; later calls reuse the connection."""
    import ray

    options = options or RayOptions()
    global _VERBOSE
    _VERBOSE = verbose
    if "ray.data" in sys.modules:  # else quiet_ray_data() runs where Ray Data is first used
        quiet_ray_data()
    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS")
        common: dict[str, Any] = dict(
            logging_level=logging.INFO if verbose else logging.WARNING,
            log_to_driver=verbose,
            configure_logging=True,
        )
        if address:
            ray.init(address=address, runtime_env=_runtime_env(), **common)
        else:
            num_gpus = options.num_gpus if options.num_gpus is not None else local_gpu_count()
            # "local" starts a new instance. With no address Ray would join whatever cluster the
            # last `ray start` on this machine recorded in /tmp/ray/ray_current_cluster, even one
            # long dead (then num_cpus makes ray.init fail): embedded means embedded.
            with _embedded_worker_env():
                ray.init(
                    address="local",
                    num_cpus=options.num_cpus or os.cpu_count(),
                    num_gpus=num_gpus,
                    include_dashboard=False,
                    object_store_memory=_object_store_bytes(),
                    **common,
                )
    return cluster_info()


def _object_store_bytes() -> int | None:
    """Ray's default (30 % of RAM) unless NIC_OBJECT_STORE_BYTES says otherwise (tests, small laptops)."""
    value = os.environ.get("NIC_OBJECT_STORE_BYTES")
    return int(value) if value else None


def cluster_info() -> RayInfo:
    import ray

    resources = ray.cluster_resources()
    ctx = ray.get_runtime_context()
    address = ctx.gcs_address
    return RayInfo(
        address=address,
        embedded=not (os.environ.get("RAY_ADDRESS")),
        num_cpus=float(resources.get("CPU", 0)),
        num_gpus=float(resources.get("GPU", 0)),
        num_nodes=len([n for n in ray.nodes() if n.get("Alive")]),
    )


#: `verbose` of the last `connect`, for `quiet_ray_data` called later by a stage that uses Ray Data.
_VERBOSE = False


def quiet_ray_data(verbose: bool | None = None) -> None:
    """Ray Data's progress bars and execution logs only when `verbose` (default: as in the last
    `connect`). A stage calls this where it builds a Dataset; `connect` does not import Ray Data
    for it, since only `nic compress` uses Ray Data and the import costs a second or more of every
    other stage's start-up."""
    verbose = _VERBOSE if verbose is None else verbose
    try:
        from ray.data import DataContext
    except ImportError:  # ray without the data extra
        return
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # "Progress bars disabled" is what quiet means here; stages print their own progress.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


class Progress:
    """One line per update on stderr, throttled, so long jobs show they are alive without noise."""

    def __init__(self, stage: str, total: int | None = None, unit: str = "items", every_s: float = 2.0):
        self.stage = stage
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.start = time.monotonic()
        self._last = 0.0
        self.done = 0

    def update(self, done: int | None = None, extra: str = "", force: bool = False) -> None:
        if done is not None:
            self.done = done
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        total = f"/{self.total}" if self.total is not None else ""
        tail = f", {extra}" if extra else ""
        stage_logger(self.stage).info(f"[{self.stage}] {self.done}{total} {self.unit}{tail} ({now - self.start:.1f} s)")

    def finish(self, extra: str = "") -> None:
        self.update(extra=extra, force=True)
