"""`nic compress` without Ray: one encoder in this process, what an embedded run uses.

Why (issue 16, "small jobs start fast"): with no cluster to use (no address, no Ray running in
this process: nic.runtime.use_ray) Ray gives compress nothing on one machine that it needs, and
starting it costs more than a small job's work: `ray.init`, Ray Data and the encoder actor take
about 6 s, so 8 small slides took 28.6 s on Ray against 19.7 s for a plain DataLoader loop.

The work is done by the same code as on Ray, so the grids and manifest rows are the same:

- each slide is planned by `plan_one` (nic.compress.actors: tissue detection, one light row per
  tissue tile, or the slide's one error row), here in the driver's thread, slide after slide, as
  the encoder needs more rows;
- the light rows are cut into batches as Ray Data cuts them for its actor pool (`ray_batches`):
  slides, in input order, are gathered until they hold at least `batch_size` rows, and each such
  group is cut into batches of `batch_size` rows and a smaller last one. On CPU a tile's
  embedding can depend on the size of its batch (CompressConfig.preserve_order), so the same
  batches give the same embeddings, bit for bit. Ray also splits a slide's rows into blocks of
  about one encoded batch's bytes (nic.compress.pipeline.block_bytes) before grouping them, which
  is not copied here: for a slide of more tiles than about 1.5 such blocks the batches after its
  first differ, and a few embedding values of the reference encoder in float32 may then differ by
  one float16 step, as they may between two `batch_size` settings (grids made either way are
  accepted by a re-run);
- ONE `EncoderActor`, built with the arguments the pipeline gives its actors (encoder, hash,
  transforms, head columns, precision), encodes them. It is called from a few threads
  (`read_parallelism`, default 2): one reads and decodes a batch's pixels (OpenSlide and JPEG
  decoding release the GIL) while another runs the model, one forward pass at a time (the
  actor's lock). Its torch threads are the CPUs it is given (`cpus_per_actor`, else `ray.num_cpus`,
  else every CPU of the machine); at most `read_parallelism + 1` batches are in flight, as on
  Ray, so memory stays bounded however many slides there are;
- its output batches go to the same collector, manifest saver and progress lines as Ray's
  (nic.compress.driver.EncodingPass), and the stats to the same `compress_run.json` keys
  (`pool` and `cluster` say `"mode": "local"`).

What differs from Ray: there is no retry pass. On Ray, tiles lost with an actor or a node are
retried, and their slides encoded once more; here nothing can be lost but with the whole process
(a segfault in a slide library, the OOM killer, a kill), and that ends the run: the grids written
so far and the manifest, saved every few seconds, stay, and the re-run resumes from them,
skipping every complete slide. A slide that fails to read gets its failed row from the actor, as
on Ray. An error of the encoder itself (it cannot load, a forward pass raises) ends the pass:
every unfinished slide fails with the reason Ray gives when its pipeline fails ("the encoder
pipeline failed before this slide was done: ..."). One encoder runs on one device (the first
GPU, when one is used); `pool_size` and `plan_concurrency` apply to Ray only.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nic.compress.actors import ROW_COLUMNS, EncoderActor, plan_one, torch_threads
from nic.compress.collector import EncoderFacts
from nic.compress.driver import EncodingPass, pipeline_failed
from nic.config.base import ConfigError
from nic.config.compress import CompressConfig
from nic.logs import stage_logger
from nic.runtime import local_gpu_count
from nic.slides.stage import ManifestRow

log = stage_logger("compress")

#: The reason of a slide still unfinished after every batch came back: cannot happen but by a bug.
LOST_REASON = "its tiles never came back from the local encoder (a bug in nic); no grid written"


@dataclass(frozen=True)
class LocalPlan:
    """How a local run uses this machine: logged at the start, recorded as `pool` in
    compress_run.json (the keys of nic.compress.pipeline.PoolPlan that mean something here)."""

    mode: str
    use_gpu: bool
    pool_size: int
    cpus_per_actor: float
    threads: int  # torch threads of the encoder
    read_parallelism: int  # threads calling the encoder: batches worked on at once
    batches_in_flight: int
    batch_size: int

    def describe(self) -> str:
        device = "the first GPU" if self.use_gpu else "CPU"
        return (f"local run (no Ray): 1 encoder on {device} with {self.threads} torch thread(s), "
                f"{self.read_parallelism} batch(es) of {self.batch_size} tiles at once "
                f"({self.batches_in_flight} in flight); slides planned in this process")


def local_plan(config: CompressConfig) -> LocalPlan:
    """The local counterpart of nic.compress.pipeline.plan_pool: the CPUs and GPU an embedded Ray
    instance would have (`ray.num_cpus`, `ray.num_gpus`, else this machine's), all for one encoder."""
    available = config.ray.num_cpus or os.cpu_count() or 1
    cpus = min(float(config.cpus_per_actor), float(available)) if config.cpus_per_actor else float(available)
    gpus = config.ray.num_gpus if config.ray.num_gpus is not None else local_gpu_count()
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    if use_gpu and gpus < 1:
        raise ConfigError("use_gpu is true but this machine has no GPU (or ray.num_gpus is 0); drop --use-gpu")
    threads = torch_threads(cpus)
    read_parallelism = config.read_parallelism or (max(2, threads) if use_gpu else 2)
    return LocalPlan(mode="local", use_gpu=bool(use_gpu), pool_size=1, cpus_per_actor=cpus, threads=threads,
                     read_parallelism=read_parallelism, batches_in_flight=read_parallelism + 1,
                     batch_size=config.batch_size)


def ray_batches(parts: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The encoder's input batches from the planned slides, cut as Ray Data cuts them for an actor
    pool (map_batches gathers input blocks until they hold at least `batch_size` rows, and each
    task cuts its bundle into batches of `batch_size` and a smaller last one), each slide taken as
    one block. Lazy: a slide is planned only when the batches before it are taken."""
    pending: list[dict[str, np.ndarray]] = []
    rows = 0
    for part in parts:
        pending.append(part)
        rows += len(part["slide_id"])
        if rows >= batch_size:
            yield from _cut(pending, batch_size)
            pending, rows = [], 0
    if pending:
        yield from _cut(pending, batch_size)


def _cut(parts: list[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    rows = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in ROW_COLUMNS}
    n = len(rows["slide_id"])
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in rows.items()}


def compress_locally(config: CompressConfig, todo: list[tuple[str, str]], out: Path, facts: EncoderFacts,
                     options_hash: str, transforms: tuple[int, ...], results: dict[str, ManifestRow],
                     order: list[str], path: Path) -> dict:
    """One pass over `todo` in this process; the arguments, `results` and returned stats of
    nic.compress.stage._compress_on_ray. Ctrl-C saves the manifest of what is finished and
    re-raises; the re-run resumes from it."""
    import torch

    plan = local_plan(config)
    log.info(f"[compress] {plan.describe()}")
    run = EncodingPass(out, facts, transforms, options_hash, todo, results, order, path)
    torch_threads_before = torch.get_num_threads()  # the encoder sets them for this whole process
    try:
        lost_reason = _encode(config, todo, facts, transforms, plan, run)
    except KeyboardInterrupt:  # keep what is finished on record; the re-run resumes from it
        run.saver.save()
        raise
    finally:
        torch.set_num_threads(torch_threads_before)
    cluster = {"mode": "local", "address": None, "embedded": True,
               "num_cpus": float(config.ray.num_cpus or os.cpu_count() or 1),
               "num_gpus": float(1 if plan.use_gpu else 0), "num_nodes": 1}
    return {"pool": asdict(plan), **run.end(lost_reason), "cluster": cluster, "retry": None}


def _encode(config: CompressConfig, todo: list[tuple[str, str]], facts: EncoderFacts, transforms: tuple[int, ...],
            plan: LocalPlan, run: EncodingPass) -> str:
    """Plan, batch and encode every slide of `todo`, handing each output batch to `run` in the
    order the batches were cut; returns the reason for the slides left unfinished (none are, but
    by a bug, when every batch came back; all of them when the encoder failed)."""
    pool = ThreadPoolExecutor(max_workers=plan.read_parallelism, thread_name_prefix="nic-compress")
    actor: EncoderActor | None = None
    try:
        actor = EncoderActor(facts.ref, config.slide, dict(todo), transforms=transforms, use_gpu=plan.use_gpu,
                             mixed_precision=config.mixed_precision, threads=plan.threads,
                             head_columns=facts.head_columns, encoder_hash=facts.content_hash)
        in_flight: deque[Future] = deque()
        for batch in ray_batches((plan_one(sid, p, config.slide) for sid, p in todo), plan.batch_size):
            if len(in_flight) >= plan.batches_in_flight:
                run.add(in_flight.popleft().result())
            in_flight.append(pool.submit(actor, batch))
        while in_flight:
            run.add(in_flight.popleft().result())
        reason = LOST_REASON
    except Exception as exc:  # the encoder failed as a whole (cannot load, a forward pass raised)
        reason = pipeline_failed(exc)
    except BaseException:  # Ctrl-C: the batches being encoded end within seconds; not waited for
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True, cancel_futures=True)
    if actor is not None:
        actor.close()  # every thread is done: its readers can be closed
    return reason
