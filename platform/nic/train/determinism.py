"""Same config, same machine, same numbers: what a training worker sets before it computes anything.

Seeds alone do not make a CPU run repeatable. Two more things change float results between runs of
one command on one machine:

- **The intra-op thread count.** CPU kernels may split a reduction between threads, so its sums
  can be added in another order with 1 thread than with 2. Left alone, a Ray worker's torch thread
  count is whatever OMP_NUM_THREADS held when torch first ran in that process (Ray sets it per task
  or actor from the CPUs reserved, and a worker process can serve more than one), so it is set
  here explicitly from the CPUs the worker reserved.
- **Kernels with a nondeterministic implementation.** `torch.use_deterministic_algorithms` picks
  the deterministic one where torch has both (on CPU: the accumulating index_put_ that the
  backward of tensor indexing runs, and index_copy) and warns where it has none. On CPU it cost
  nothing measurable (an MTL training step of the reference trunk, batch 32, 1 thread: 0.26 s
  with and without), with torch told not to fill every new tensor with NaN
  (`fill_uninitialized_memory`, a debugging aid for reads of uninitialised memory that
  repeatability does not need).

GPU runs are left alone: deterministic CUDA kernels can be much slower and some need
CUBLAS_WORKSPACE_CONFIG set before CUDA starts, so a GPU run is seeded but not bitwise repeatable
(docs/pipeline.md, "Reproducibility").
"""

from __future__ import annotations

import math

import torch


def reserved_cpus() -> float | None:
    """CPUs the Ray task or actor running this code reserved (a Train worker's share of its
    placement group, a FoldRunner's reservation); None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # the driver (not a worker), or Ray not running: nothing reserved here
        return None
    return float(cpus) if cpus else None


def worker_threads(cpus: float | None) -> int:
    """Torch threads for a worker that reserved `cpus` CPUs: the whole CPUs, at least 1 (Ray's own
    rule for OMP_NUM_THREADS, so the explicit setting is what a fresh Ray process would get)."""
    if cpus is None or cpus <= 0:
        return 1
    return max(1, math.floor(cpus + 1e-9))


def make_deterministic(cpus: float | None = None, device: torch.device | str = "cpu") -> int:
    """Fix this process's torch thread count to `worker_threads(cpus)` (`cpus` None: the CPUs this
    Ray worker reserved) and, on CPU, ask torch for deterministic kernels; returns the thread
    count. Call it at the start of a training worker's loop, before any tensor is computed."""
    threads = worker_threads(reserved_cpus() if cpus is None else cpus)
    torch.set_num_threads(threads)
    if torch.device(device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            import torch.utils.deterministic as deterministic
        except ImportError:  # torch < 2.1: no such setting, and nothing filled
            return threads
        # a property of the module's own class in torch, absent from its stub
        deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    return threads
