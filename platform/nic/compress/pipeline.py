"""The Ray Data pipeline of `nic compress` and how it is sized to the cluster.

    slides (one row each)
      -> map_batches(plan_slides)        tasks: tissue detection, one light row per tissue tile,
                                         emitted in blocks of about one batch
      -> map_batches(EncoderActor)       actor pool: read pixels, encode, float16 embeddings
      -> driver (iter_batches)           SlideCollector writes each slide once all its tiles are in

No row ever holds pixels, so the object store carries coordinates and embeddings only.

Block size matters here. Ray Data hands an actor one bundle of blocks per task, so a 100,000 px
slide planned into one 150,000-row block would be encoded by one actor while the others idle (and a
killed actor would redo all of it); but every block also costs the driver bookkeeping, so blocks
of a few embeddings each waste CPU (measured: 0.4 ms of driver CPU per tile with ~80-row output
blocks). The dataset is therefore built with a target block size of about one batch of *encoded*
rows (capped at 4 batches of light rows): the planning task streams out blocks of 1-4 batches that
the whole pool shares, and each encoded batch comes back as about one block.
(`Dataset.repartition(target_num_rows_per_block=...)` would cut the planned blocks too, but in
Ray 2.60 it runs as separate 1-CPU tasks that cannot fuse with fractional-CPU planning, and on a
2-CPU machine those deadlock against the encoder actor's reservation.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from nic.config.base import ConfigError
from nic.config.compress import CompressConfig
from nic.logs import stage_logger
from nic.runtime import RayInfo, quiet_ray_data

log = stage_logger("compress")

#: CPU share of one planning task on a small machine: tissue detection is short (a coarse level,
#: once per slide), and reserving a whole CPU for it would leave a 2-core laptop's encoder one core.
SMALL_PLAN_CPUS = 0.5
#: Above this many CPUs per actor, more actors beat more threads (conv layers on 128 px tiles stop
#: scaling with threads well before that).
MAX_CPUS_PER_ACTOR = 8.0
CPUS_PER_ACTOR_LARGE = 4.0
#: Bytes of one light tile row in Arrow (ids, coordinates, per-slide facts), to size blocks.
LIGHT_ROW_BYTES = 120
#: Planned blocks hold at most this many batches of light rows.
MAX_BATCHES_PER_BLOCK = 4


def block_bytes(batch_size: int, embedding_dim: int, transforms: int) -> int:
    """Target block size: one batch of encoded rows, at most MAX_BATCHES_PER_BLOCK of light rows."""
    encoded_row = LIGHT_ROW_BYTES + 2 * embedding_dim * transforms
    return max(16 * 1024, batch_size * min(encoded_row, MAX_BATCHES_PER_BLOCK * LIGHT_ROW_BYTES))
#: Retries of an encoder task whose actor died (the actor itself is restarted without limit): a
#: batch that kills its actor every time is given up on, and its slide reported as failed.
ACTOR_TASK_RETRIES = 3


@dataclass(frozen=True)
class PoolPlan:
    """How the pipeline uses the cluster (printed at start, recorded in benchmarks)."""

    use_gpu: bool
    pool_size: int
    cpus_per_actor: float
    threads: int
    plan_concurrency: int
    plan_cpus: float
    read_parallelism: int
    batch_size: int

    def describe(self) -> str:
        device = "GPU" if self.use_gpu else "CPU"
        return (f"{self.pool_size} encoder actor(s) on {device}, {self.cpus_per_actor:g} CPU(s) and "
                f"{self.threads} torch thread(s) each, {self.read_parallelism} batch(es) of {self.batch_size} "
                f"tiles in flight per actor; {self.plan_concurrency} planning task(s) of {self.plan_cpus:g} CPU")


def plan_pool(config: CompressConfig, cluster: RayInfo, max_node_cpus: float | None = None,
              free_cpus: float | None = None) -> PoolPlan:
    """Defaults that use a laptop's few cores and a GPU cluster's GPUs well; explicit config wins.

    The pool is sized to the CPUs that are free when the job starts (`free_cpus`, if given and at
    least 1), not the cluster's total: inside a Ray Tune trial or beside another job, sizing to the
    total would reserve CPUs that never come free, and the planning tasks would wait forever
    behind the encoder actors. Planning + actors always fit in what the sizing assumed."""
    from nic.compress.actors import torch_threads

    if cluster.num_cpus < 1 and not (config.pool_size and config.cpus_per_actor):
        raise ConfigError(
            f"the Ray cluster has {cluster.num_cpus:g} CPUs right now (an autoscaling cluster before its "
            "workers start?): set pool_size and cpus_per_actor (and use_gpu) explicitly")
    total = max(0.25, cluster.num_cpus)
    if free_cpus is not None and 1.0 <= free_cpus < total:
        total = free_cpus
    node_cpus = max(0.25, min(max_node_cpus or total, total))
    use_gpu = config.use_gpu if config.use_gpu is not None else cluster.num_gpus > 0
    if use_gpu and cluster.num_gpus < 1:
        raise ConfigError("use_gpu is true but the Ray cluster has no GPU; drop --use-gpu or add GPU nodes")
    plan_cpus = SMALL_PLAN_CPUS if total <= 4 else 1.0
    if total < 2:  # a tiny allotment: planning gets a quarter of it
        plan_cpus = round(total / 4, 2)
    plan_concurrency = config.plan_concurrency or max(1, int(total // 8))
    available = max(total - plan_concurrency * plan_cpus, total / 2)
    if use_gpu:
        pool_size = config.pool_size or max(1, int(cluster.num_gpus))
        cpus = config.cpus_per_actor or max(min(1.0, available), min(CPUS_PER_ACTOR_LARGE, available / pool_size))
    else:
        if config.cpus_per_actor:
            cpus = config.cpus_per_actor
        elif available <= MAX_CPUS_PER_ACTOR:
            cpus = min(available, node_cpus - min(plan_cpus, node_cpus / 4))
        else:
            cpus = min(CPUS_PER_ACTOR_LARGE, node_cpus)
        pool_size = config.pool_size or max(1, int(math.floor(available / cpus + 1e-9)))
    cpus = round(float(cpus), 2)
    biggest_node = max_node_cpus or cluster.num_cpus
    if biggest_node >= 1 and cpus > biggest_node + 1e-9:  # unknown on an empty autoscaling cluster
        raise ConfigError(f"cpus_per_actor={cpus:g} does not fit on a node ({biggest_node:g} CPUs at most)")
    needed = pool_size * cpus + plan_cpus
    if needed > total + 1e-6:
        log.warning(f"[compress] warning: {pool_size} actor(s) x {cpus:g} CPUs + planning need {needed:g} CPUs, "
                    f"{total:g} are free: until an autoscaler adds nodes, actors and planning tasks wait for each "
                    f"other's CPUs and the job can stall; lower pool_size or cpus_per_actor")
    read_parallelism = config.read_parallelism or (max(2, torch_threads(cpus)) if use_gpu else 2)
    return PoolPlan(use_gpu=bool(use_gpu), pool_size=int(pool_size), cpus_per_actor=cpus,
                    threads=torch_threads(cpus), plan_concurrency=int(plan_concurrency), plan_cpus=plan_cpus,
                    read_parallelism=read_parallelism, batch_size=config.batch_size)


def free_cpus() -> float:
    """CPUs not reserved by anyone right now."""
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def max_node_cpus() -> float:
    """CPUs of the biggest alive node (an actor must fit on one node)."""
    import ray

    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(cpus) if cpus else 1.0


def build_dataset(config: CompressConfig, todo: list[tuple[str, str]], pool: PoolPlan,
                  transforms: tuple[int, ...], embedding_dim: int, head_columns: tuple[str, ...] = (),
                  encoder: Any = None, encoder_hash: str | None = None):
    """The lazy Dataset of encoded tile rows for slides `todo` ((slide_id, path) pairs); with
    `head_columns` (`--heads`) the rows also carry the encoder's head outputs. `encoder` is what the
    actors load (default `config.encoder`; your own encoder's resolved EncoderSpec), and
    `encoder_hash` the content hash they must find (an encoder replaced during the job fails)."""
    import ray

    quiet_ray_data()  # connect leaves Ray Data alone (not imported) for the stages that do not use it
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size, ctx.max_errored_blocks, ctx.execution_options.preserve_order
    # All three are sealed into the dataset when it is created (a deep copy of the context), so they
    # are set for this dataset only and restored right after. Block size: see the module
    # docstring. Errored blocks: a batch whose actor dies on every retry is dropped instead of
    # failing the job; the driver reports its slides as failed. Order: the actors' input is then
    # the planned blocks in slide order whatever the timing, and Ray Data cuts its batches from
    # that sequence alone, so a batch holds the same tiles in every run: a tile's embedding
    # can depend on its batch's size on CPU (config field preserve_order).
    # a float32 head value weighs as much as two float16 embedding numbers
    ctx.target_max_block_size = block_bytes(pool.batch_size, embedding_dim + 2 * len(head_columns), len(transforms))
    ctx.max_errored_blocks = -1
    ctx.execution_options.preserve_order = config.preserve_order
    try:
        return _pipeline(config, todo, pool, transforms, head_columns, encoder, encoder_hash)
    finally:
        ctx.target_max_block_size, ctx.max_errored_blocks, ctx.execution_options.preserve_order = saved


def _pipeline(config: CompressConfig, todo: list[tuple[str, str]], pool: PoolPlan, transforms: tuple[int, ...],
              head_columns: tuple[str, ...] = (), encoder: Any = None, encoder_hash: str | None = None):
    import warnings

    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from nic.compress.actors import EncoderActor, plan_slides

    slides = ray.data.from_items([{"slide_id": sid, "path": path} for sid, path in todo],
                                 override_num_blocks=max(1, len(todo)))
    chunks = slides.map_batches(
        # Ray types fn as taking the batch alone; `options` comes through fn_kwargs
        plan_slides,  # type: ignore[arg-type]
        batch_size=1, fn_kwargs={"options": config.slide}, num_cpus=pool.plan_cpus,
        compute=TaskPoolStrategy(size=pool.plan_concurrency), batch_format="numpy",
    )
    compute = ActorPoolStrategy(
        size=pool.pool_size,
        max_tasks_in_flight_per_actor=pool.read_parallelism + 1,
        max_concurrent_calls_per_actor=pool.read_parallelism,
        enable_true_multi_threading=pool.read_parallelism > 1,
    )
    with warnings.catch_warnings():
        # max_task_retries has no named parameter in Ray 2.60's map_batches; the kwargs route
        # warns that it is deprecated but is the only way to bound retries of a poison batch.
        warnings.simplefilter("ignore")
        return chunks.map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                "encoder": config.encoder if encoder is None else encoder, "encoder_hash": encoder_hash,
                "options": config.slide, "paths": dict(todo),
                "transforms": transforms, "use_gpu": pool.use_gpu,
                "mixed_precision": config.mixed_precision, "threads": pool.threads,
                "head_columns": head_columns,
            },
            batch_size=pool.batch_size, batch_format="numpy", compute=compute,
            num_cpus=pool.cpus_per_actor, num_gpus=1 if pool.use_gpu else None,
            max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES,
            # one actor per node before two on one: spreads reading and encoding over the cluster
            scheduling_strategy="SPREAD",
        )


def iter_encoded(dataset) -> Iterator[dict[str, np.ndarray]]:
    """Output batches as they are produced (any order), as numpy dicts."""
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
