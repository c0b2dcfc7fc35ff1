"""Running a Ray Train `TorchTrainer` so that it can neither outlive its stage nor wait for ever.

Two failure modes seen in practice, both on a busy machine:

- **A leaked run.** `TorchTrainer.fit()` starts a `TrainController` actor owned by the calling
  process and blocks on it. When the call ends early (an RPC timeout raised in the driver while the
  controller is still alive and training, an exception in a sibling fold thread, Ctrl-C in a thread
  that Ray's own SIGINT handler does not cover, a Tune trial stopped mid-fold), nothing stops the
  controller: it keeps its workers and their placement group, and in a long-lived process (the test
  session, a notebook, `nic tune`'s trial actor) every later run waits behind it.
  `OwnedTorchTrainer` keeps the controller's handle and kills it whenever `fit()` leaves by an
  exception; Ray's detached placement-group cleaner then removes the workers' placement group.
  Every controller alive in this process is in a registry, so a stage that fails or is interrupted
  can abort all of its runs at once (`abort_running_trainers`).
- **A run that waits for ever.** A trainer asks for `num_workers x resources`; when the cluster
  cannot hold them, Train V2 times the worker group's start out (60 s) and retries without limit
  (`FailureConfig.controller_failure_limit` defaults to -1). `wait_for_resources` fails at once
  when the cluster does not have the resources at all, waits a bounded time when they exist but
  are held, and names what holds them; the controller's retries are bounded by the same timeout.

`WorkerPool` gives the same two guarantees to long-lived actors that run work a trainer would
give a fresh worker group (nic's single-worker folds): bounded resource waits, and every actor
killed when its pool closes or the process aborts its runs.

The controller-start code mirrors Ray 2.60's `DataParallelTrainer._initialize_and_run_controller`
(the only change: the handle is kept). If a future Ray moves that seam, `OwnedTorchTrainer` falls
back to Ray's own code and only loses the kill-on-exception guarantee.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ray.train.torch import TorchTrainer

#: Exit code of a stage that could not get the resources it asked for (not the input's fault: 2).
EXIT_RESOURCES = 3
DEFAULT_START_TIMEOUT_S = 60.0
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"

_LIVE: dict[int, Any] = {}  # id(handle) -> TrainController handle, for every fit() running in this process
_LIVE_LOCK = threading.Lock()


class ResourceError(RuntimeError):
    """The cluster cannot give a stage the workers it asks for, within the configured time."""


def _kill(handle: Any, grace_s: float = 10.0) -> None:
    """Stop a controller: Train's own `abort` first (it shuts the worker group down and removes its
    placement group, then exits), a hard kill if that fails. A hard kill alone is not enough on an
    embedded instance: the placement group outlives its creator, and Ray's placement-group cleaner
    cannot notice the controller's death without the dashboard's state API, so the CPUs would stay
    reserved for the rest of the process's life."""
    import ray

    try:
        ray.get(handle.abort.remote(), timeout=grace_s)
    except Exception:  # abort exits the actor, so its call "fails"; or it was already dead
        pass
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already dead, or Ray shut down: nothing left to stop
        pass
    remove_placement_groups_of(handle._actor_id.hex())


def _remove_groups_where(keep_out: Callable[[Any], bool]) -> int:
    """Remove every live placement group whose GCS record `keep_out` does not reject. Reads the GCS
    table directly: the Python listing does not show who created a group or whether it is dead."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        import ray._private.state as ray_state
        from ray.core.generated import gcs_pb2

        table = ray_state.state._connect_and_get_accessor().get_placement_group_table()
        states = gcs_pb2.PlacementGroupTableData.PlacementGroupState
        removed = 0
        for raw in table:
            data = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if states.Name(data.state) == "REMOVED" or keep_out(data):
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
            removed += 1
        return removed
    except Exception:  # a Ray whose internals moved, or Ray not running
        return 0


def remove_placement_groups_of(actor_id: str) -> int:
    """Remove the live placement groups an actor created (Train's controller creates its workers'
    group). They outlive their creator, so a killed controller would keep its workers' CPUs
    reserved."""
    return _remove_groups_where(lambda data: data.creator_actor_id.hex() != actor_id)


def remove_orphaned_placement_groups() -> int:
    """Remove live placement groups whose creating actor is dead (not detached ones). A group made
    by an actor lives until both that actor and its job are gone, so in a long-lived driver the
    group of a Train controller that died with its owner (a Tune trial stopped by ASHA, a trial
    actor killed) would hold its CPUs for the rest of the job. A driver's groups (Tune's own trial
    reservations) have a nil creator actor and count as "creator dead" from the start: spared."""
    return _remove_groups_where(lambda data: not data.creator_actor_id.strip(b"\xff") or data.is_detached
                                or not data.creator_actor_dead)


def abort_running_trainers() -> int:
    """Kill every Train controller started from this process that is still running, and every
    actor of its open WorkerPools; returns how many. The controllers' workers die with them (they
    are the controller's actors) and Ray's placement-group cleaner removes their reservations."""
    with _LIVE_LOCK:
        handles = list(_LIVE.values())
        _LIVE.clear()
        pools = list(_POOLS.values())
    for handle in handles:
        _kill(handle)
    stopped = sum(pool.close() for pool in pools)
    remove_orphaned_placement_groups()
    return len(handles) + stopped


def running_trainers() -> int:
    with _LIVE_LOCK:
        return len(_LIVE)


class OwnedTorchTrainer(TorchTrainer):
    """A TorchTrainer whose controller never outlives `fit()` when fit() ends by an exception."""

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        try:
            import ray
            from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
            from ray.train.v2._internal.constants import (
                DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                get_env_vars_to_propagate,
            )
            from ray.train.v2._internal.execution.controller import TrainController
        except ImportError:  # a Ray whose internals moved: its own code, without the guarantee
            # Ray Train v2's method: ray.train.torch exports v2's TorchTrainer at run time, mypy reads v1's
            return super()._initialize_and_run_controller(**controller_init_kwargs)  # type: ignore[misc]

        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        controller_cls = ray.remote(
            num_cpus=0,
            # RAY_NODE_ID_KEY lives in the compiled _raylet module; its .pyi stub omits it
            label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},  # type: ignore[attr-defined]
            runtime_env={"env_vars": env_vars},
        )(TrainController)
        # Any: Ray's types do not carry an actor handle's remote methods (run, get_result)
        controller: Any = controller_cls.remote(**controller_init_kwargs)
        with _LIVE_LOCK:
            _LIVE[id(controller)] = controller
        # Ray's own SIGINT handler is not installed: it keeps the controller's handle alive (so the
        # finished controller would outlive fit() until the next run replaced the handler) and
        # turns Ctrl-C into exit 0. A KeyboardInterrupt raised in ray.get ends up in `finally`.
        finished = False
        try:
            ray.get(controller.run.remote())
            result = ray.get(controller.get_result.remote())
            finished = True
            return result
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(id(controller), None)
            if finished:  # its work is done and its result fetched: nothing of it may stay alive
                try:
                    ray.kill(controller, no_restart=True)
                except Exception:  # already gone, or Ray shut down
                    pass
            else:
                _kill(controller)


# ---------------------------------------------------------------------------- worker pools

_POOLS: dict[int, WorkerPool] = {}  # id(pool) -> every WorkerPool of this process not closed yet


class WorkerPool:
    """Long-lived actors of one class, each reserving one training worker's resources, each lent to
    one caller at a time: work that a TorchTrainer would give a fresh worker group per run (nic's
    single-worker folds, nic.train.downstream_loop.FoldRunner) reuses a process whose Python and
    torch are already up. Actors start on demand (at most one per concurrent caller) and idle ones
    are reused.

    The trainer's guarantees hold here too: an actor is started only once `wait_for_resources` sees
    its resources free (at once ResourceError when the cluster has not got them, after `timeout_s`
    when others hold them) and must be up within that time again; `close()` kills every actor, and
    `abort_running_trainers` closes every open pool of the process (a stage failing or interrupted
    mid-fold). Actors die with their owner (a Tune trial actor stopped by ASHA) and hold no
    placement group. They are scheduled outside any placement group of the caller (a Tune trial's
    reservation is not theirs)."""

    def __init__(self, actor_cls: type, resources: dict[str, float], timeout_s: float, *args: Any) -> None:
        import ray

        self._resources = {k: v for k, v in resources.items() if v}
        self._timeout_s = timeout_s
        self._args = args
        custom = {k: v for k, v in self._resources.items() if k not in ("CPU", "GPU")}
        # Any: ray.remote of a class is typed as the class itself, not an actor class with .remote
        self._cls: Any = ray.remote(actor_cls).options(
            num_cpus=self._resources.get("CPU", 0), num_gpus=self._resources.get("GPU", 0),
            resources=custom or None, max_restarts=0, scheduling_strategy="DEFAULT")
        self._idle: list[Any] = []
        self._actors: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.closed = False
        with _LIVE_LOCK:
            _POOLS[id(self)] = self

    def acquire(self, what: str) -> Any:
        """An idle actor, or a new one once its resources are free (ResourceError if they are not)."""
        import ray
        from ray.exceptions import GetTimeoutError

        with self._lock:
            if self.closed:
                raise RuntimeError(f"{what}: the worker pool was stopped")
            if self._idle:
                return self._idle.pop()
        wait_for_resources(1, self._resources, self._timeout_s, what)
        actor = self._cls.remote(*self._args)
        with self._lock:
            if self.closed:
                ray.kill(actor, no_restart=True)
                raise RuntimeError(f"{what}: the worker pool was stopped")
            self._actors[id(actor)] = actor
        try:
            # Free a moment ago; placed and started (a new process importing torch) well within this.
            ray.get(actor.__ray_ready__.remote(), timeout=max(self._timeout_s, 60.0))
        except GetTimeoutError:
            self.discard(actor)
            raise ResourceError(f"{what}: a worker of {_fmt(self._resources)} did not start within "
                                f"{max(self._timeout_s, 60.0):g} s; held by: {describe_holders()}") from None
        except BaseException:
            self.discard(actor)
            raise
        return actor

    def release(self, actor: Any) -> None:
        """Give an actor back for the next caller."""
        with self._lock:
            if not self.closed and id(actor) in self._actors:
                self._idle.append(actor)
                return
        self.discard(actor)

    def discard(self, actor: Any) -> None:
        """Kill an actor that must not be reused (its process died, or its work was interrupted)."""
        import ray

        with self._lock:
            self._actors.pop(id(actor), None)
            self._idle = [a for a in self._idle if a is not actor]
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead, or Ray shut down
            pass

    def close(self) -> int:
        """Kill every actor (busy ones too: their callers' ray.get then fails); returns how many."""
        import ray

        with self._lock:
            self.closed = True
            actors = list(self._actors.values())
            self._actors.clear()
            self._idle.clear()
        with _LIVE_LOCK:
            _POOLS.pop(id(self), None)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead, or Ray shut down
                pass
        return len(actors)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------- resources


def _fmt(resources: dict[str, float], zeros: bool = False) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if v or zeros) or "nothing"


def describe_holders(limit: int = 8) -> str:
    """Who holds the cluster's CPUs/GPUs now: placement groups (with their bundles) and named
    actors. Read from the GCS tables, which need no dashboard (an embedded instance has none);
    best effort, never raises."""
    try:
        from ray.util.placement_group import placement_group_table

        parts = []
        for pg_id, pg in placement_group_table().items():
            if pg.get("state") != "CREATED":
                continue
            held: dict[str, float] = {}
            for bundle in (pg.get("bundles") or {}).values():
                for k, v in bundle.items():
                    if k in ("CPU", "GPU"):
                        held[k] = held.get(k, 0.0) + float(v)
            if held:
                parts.append(f"placement group {pg.get('name') or pg_id[:12]} ({_fmt(held)})")
        shown = parts[:limit] + ([f"{len(parts) - limit} more placement groups"] if len(parts) > limit else [])
        return "; ".join(shown) or "no placement group (tasks or actors outside placement groups)"
    except Exception as exc:  # a diagnostic, not a requirement
        return f"(could not list holders: {type(exc).__name__})"


def wait_for_resources(workers: int, per_worker: dict[str, float], timeout_s: float, what: str,
                       poll_s: float = 1.0) -> None:
    """Return once `workers x per_worker` are free in the cluster; raise ResourceError at once when
    the cluster does not have them in all, or after `timeout_s` when others hold them.

    The check is over the cluster's totals (a placement group may still not fit one node; Train's
    own bounded retries cover that). It is what keeps a 4-worker request on a 2-CPU machine from
    waiting for ever with nothing on the screen."""
    import ray

    need = {k: v * workers for k, v in per_worker.items() if v}
    total = ray.cluster_resources()
    short = {k: v for k, v in need.items() if total.get(k, 0.0) + 1e-9 < v}
    ask = f"{workers} worker(s) x {_fmt(per_worker)}"
    if short:
        raise ResourceError(f"{what}: {ask} requested, but the whole Ray cluster has "
                            f"{_fmt({k: total.get(k, 0.0) for k in need}, zeros=True)}; ask for fewer workers or CPUs per "
                            "worker, or connect to a larger cluster (--address)")
    deadline = time.monotonic() + max(0.0, timeout_s)
    remove_orphaned_placement_groups()  # CPUs held by a dead run's group are free, not "held"
    while True:
        free = ray.available_resources()
        if all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
            return
        if time.monotonic() >= deadline:
            raise ResourceError(
                f"{what}: {ask} requested, {_fmt({k: free.get(k, 0.0) for k in need}, zeros=True)} free of "
                f"{_fmt({k: total.get(k, 0.0) for k in need})} after waiting {timeout_s:g} s; held by: "
                f"{describe_holders()}. Raise ray.resource_timeout_s to wait longer")
        time.sleep(poll_s)


def resource_failure(exc: BaseException, what: str) -> ResourceError | None:
    """A ResourceError for a Train failure that was the cluster's (its worker group never started
    within the bounded retries), else None."""
    failure = getattr(exc, "controller_failure", None)
    names = {type(exc).__name__, type(failure).__name__}
    if "WorkerGroupStartupTimeoutError" in names or "ResourceError" in names:
        return exc if isinstance(exc, ResourceError) else ResourceError(
            f"{what}: the workers could not be started within ray.resource_timeout_s ({failure or exc}); "
            f"held by: {describe_holders()}")
    return None


def controller_failure_limit(timeout_s: float) -> int:
    """How many times Train may retry starting its worker group (each attempt waits the worker-group
    start timeout) within `timeout_s`: at least once, never unbounded."""
    start = float(os.environ.get(_START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
    return max(1, math.ceil(timeout_s / max(start, 1.0)))
