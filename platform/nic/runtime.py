"""The one place that connects to Ray.

Embedded by default (a local instance sized to this machine), a cluster when an address is given
by flag or `RAY_ADDRESS`. Quiet by default: stages print their own one-line progress instead of
Ray's logs and progress bars, which `verbose` brings back.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nic.config.base import RayOptions

_PLATFORM_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RayInfo:
    address: str
    embedded: bool
    num_cpus: float
    num_gpus: float
    num_nodes: int


def local_gpu_count() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # torch missing or broken CUDA install: run on CPU
        return 0


def _runtime_env(cluster: bool) -> dict:
    """Workers must import the same `nic` as the driver.

    On a cluster the package is shipped to every node (`py_modules`), so a job submitted with
    `--working-dir` runs its own code even where another version is installed; it merges with a
    job's own runtime env, which sets `working_dir`. An embedded instance's workers live on this
    machine and only need platform/ on their path (set for runs from a source checkout).
    """
    if cluster:
        return {"py_modules": [str(_PLATFORM_DIR / "nic")]}
    path = os.pathsep.join(filter(None, [str(_PLATFORM_DIR), os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"PYTHONPATH": path}}


def connect(options: RayOptions | None = None, verbose: bool = False) -> RayInfo:
    """Connect to (or start) Ray once per process; later calls reuse the connection."""
    import ray

    options = options or RayOptions()
    _quiet_ray_data(verbose)
    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS")
        common: dict[str, Any] = dict(
            logging_level=logging.INFO if verbose else logging.WARNING,
            log_to_driver=verbose,
            configure_logging=True,
        )
        if address:
            ray.init(address=address, runtime_env=_runtime_env(cluster=True), **common)
        else:
            num_gpus = options.num_gpus if options.num_gpus is not None else local_gpu_count()
            # "local" starts a new instance. With no address Ray would join whatever cluster the
            # last `ray start` on this machine recorded in /tmp/ray/ray_current_cluster, even one
            # long dead (then num_cpus makes ray.init fail): embedded means embedded.
            ray.init(
                address="local",
                num_cpus=options.num_cpus or os.cpu_count(),
                num_gpus=num_gpus,
                include_dashboard=False,
                object_store_memory=_object_store_bytes(),
                runtime_env=_runtime_env(cluster=False),
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


def _quiet_ray_data(verbose: bool) -> None:
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
        print(
            f"[{self.stage}] {self.done}{total} {self.unit}{tail} ({now - self.start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    def finish(self, extra: str = "") -> None:
        self.update(extra=extra, force=True)
