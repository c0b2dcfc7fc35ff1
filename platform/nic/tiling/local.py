"""Tiling slides in a few local worker processes, without Ray: what an embedded `nic tile` uses.

Why: on one machine Ray gives `nic tile` nothing beyond process isolation, and starting it (the
Ray import, `ray.init`, its worker processes, Ray Data) costs more than tiling dozens of slides
(issue 16: 12 s for one slide that takes 0.3 CPU-s). Here each worker is a child process that takes
one slide at a time over a pipe and sends its manifest row back. A worker that dies (a segfault in
a slide library, the OOM killer) costs only the slide it held: that slide is retried on a fresh
worker, like a Ray task with `max_retries`, and after that reported as lost; the others go on.

Workers are forked where the platform allows it (Linux): they start in milliseconds with the
driver's imports already done. Elsewhere they are spawned and import the tiling code themselves.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

#: Attempts after the first for a slide whose worker died, as Ray's `max_retries` on the Ray path.
MAX_RETRIES = 2
#: A manifest row (nic.slides.stage.ManifestRow for `nic tile`): this module only passes it on.
Row = TypeVar("Row")
#: What one worker does with one slide: (item, *args) -> manifest row. Never raises for a bad slide.
SlideWork = Callable[..., Any]


def _serve(conn: Connection, work: SlideWork, args: tuple) -> None:
    """A worker's loop: slides in, rows out, until the driver sends None or goes away."""
    # Ctrl-C reaches the whole process group; the driver decides what happens to the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if item is None:
            return
        conn.send(work(item, *args))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    item: dict | None = None  # the slide it holds
    attempt: int = 0  # earlier attempts of that slide


def _context() -> Any:
    """fork where it is available and safe enough (Linux), else spawn."""
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def run_local(items: Iterable[dict], work: Callable[..., Row], args: tuple, workers: int,
              on_row: Callable[[Row], None], max_retries: int = MAX_RETRIES) -> list[dict]:
    """Run `work(item, *args)` for every item on up to `workers` child processes; `on_row` gets each
    row as it arrives (in the driver). Returns the items whose worker died on every attempt.

    `work` and `args` must be picklable where workers are spawned (a module-level function)."""
    ctx = _context()
    queue: deque[tuple[dict, int]] = deque((item, 0) for item in items)
    lost: list[dict] = []
    pool: list[_Worker] = []

    def start() -> _Worker:
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(theirs, work, args), daemon=True, name="nic-tile-worker")
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        pool.append(worker)
        return worker

    def retire(worker: _Worker) -> None:
        pool.remove(worker)
        worker.conn.close()
        worker.process.join(timeout=1)

    try:
        for _ in range(min(max(1, workers), len(queue))):
            start()
        while True:
            for worker in list(pool):
                if worker.item is not None or not queue:
                    continue
                if not worker.process.is_alive():  # died after its last row: no slide lost
                    retire(worker)
                    start()
                    continue
                worker.item, worker.attempt = queue.popleft()
                try:
                    worker.conn.send(worker.item)
                except OSError:  # died just now; the slide never reached it, so no attempt is spent
                    queue.appendleft((worker.item, worker.attempt))
                    retire(worker)
                    start()
            busy = [w for w in pool if w.item is not None]
            if not busy:
                break
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                row = _receive(worker.conn)  # a row sent just before a death still counts
                if row is not None:
                    worker.item = None
                    on_row(row)
                elif worker.process.sentinel in ready:
                    item, attempt = worker.item, worker.attempt
                    assert item is not None
                    retire(worker)
                    if attempt < max_retries:
                        queue.appendleft((item, attempt + 1))
                    else:
                        lost.append(item)
                    if queue and len(pool) < workers:
                        start()
    finally:
        for worker in pool:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in pool:
            worker.process.join(timeout=5)
            if worker.process.is_alive():  # interrupted mid-slide: a re-run cleans its temporaries
                worker.process.terminate()
                worker.process.join(timeout=5)
            worker.conn.close()
    return lost


def _receive(conn: Connection) -> Any:
    """The row waiting on `conn`, or None when there is none or the pipe broke."""
    try:
        return conn.recv() if conn.poll() else None
    except (EOFError, OSError):
        return None


def local_workers(requested: float | None, slides: int) -> int:
    """Worker processes for `slides` slides: the CPUs asked for (`ray.num_cpus`), else the CPUs this
    process may run on; never more than the slides."""
    if requested:
        cpus = int(requested)
    elif hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, slides))
