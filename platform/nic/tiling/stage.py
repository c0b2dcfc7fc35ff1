"""`nic tile`: a collection of slides -> per-slide tile coordinates, overviews and one manifest.

Each slide is planned and written where it is tiled: the tile coordinates of even a 100,000 px
slide are a few MB, so writing them where they are computed avoids shuffling rows back to one
place. On a Ray cluster (an address, or Ray already running in this process) slides go out in
batches as Ray tasks; an embedded run uses local worker processes instead (nic.tiling.local),
since starting Ray would cost more than tiling dozens of slides. Only manifest rows stream back to
the driver, which keeps the manifest current on disk so a killed job still says what it
finished; a re-run skips slides whose outputs are complete. On an
object store a re-run decides that from the manifest and a listing of the bucket (`TileResume`),
without downloading the tile files and overviews it can vouch for.
"""

from __future__ import annotations

from pathlib import Path

from nic.artifacts import STATUS_OK, STATUS_SKIPPED, stable_hash
from nic.config.identity import config_identity
from nic.config.tile import TileConfig
from nic.logs import stage_logger
from nic.runtime import Progress, connect, use_ray
from nic.slides.inputs import SlideInput, expand_slide_inputs
from nic.slides.stage import (
    CRASH,
    MANIFEST_NAME,
    ListingResume,
    ManifestRow,
    ManifestSaver,
    failed_row,
    finish,
    partition,
    prepare_out,
    previous_rows,
    vouched_row,
)
from nic.stage_io import stage_storage
from nic.storage import ensure_local
from nic.tiling.worker import (
    MANIFEST_SCHEMA,
    completed_row,
    overview_path,
    tile_one_slide,
    tile_slides,
    tiles_path,
)

log = stage_logger("tile")
LOST_REASON = "the worker processing this slide died repeatedly (crash inside the slide library?); no output written"
#: Seconds between saves of the manifest while slides finish.
MANIFEST_EVERY_S = 10.0


class TileResume(ListingResume):
    """Which slides an earlier run left complete in `out`: `completed_row` on the local files; on an
    object store, the earlier manifest vouches for a slide whose tile file and overview are in the
    bucket's listing, the tile file with the size the manifest recorded (`file_bytes`), both not
    newer than the manifest, and whose row says ok or skipped with the same options. Other slides'
    files are fetched and checked as local ones (see nic.compress.stage.GridResume)."""

    def __init__(self, out: Path, options_hash: str, previous: dict[str, dict]) -> None:
        super().__init__(out, previous)
        self.options_hash = options_hash

    def check(self, slide_id: str, path: str) -> ManifestRow | None:
        previous = self.previous.get(slide_id)
        files = (tiles_path(self.out, slide_id), overview_path(self.out, slide_id))
        if self.listing is not None and not all(f.exists() for f in files):
            listed = [self.listing.get(f.relative_to(self.out).as_posix()) for f in files]
            remote = [r for r in listed if r is not None]
            if len(remote) < len(listed):
                return None
            row = previous or {}
            times = [r.mtime_ns for r in remote if r.mtime_ns is not None]
            if (row.get("status") in (STATUS_OK, STATUS_SKIPPED) and row.get("options_hash") == self.options_hash
                    and row.get("tiles") is not None and row.get("file_bytes") is not None
                    and int(row["file_bytes"]) == remote[0].size and self.manifest_mtime_ns is not None
                    and len(times) == len(remote) and max(times) <= self.manifest_mtime_ns):
                self.vouched += 1
                return vouched_row(row, path)
            for f in files:
                if not f.exists():
                    ensure_local(f, missing_ok=True)
            self.fetched += 1
        return completed_row(self.out, slide_id, path, self.options_hash, previous)


def options_hash_of(config: TileConfig) -> str:
    """The resume key of every tile file: the slide options' identity, which alone decides a
    slide's tile grid (recorded in each file's metadata as `nic.options_hash`)."""
    return stable_hash(config_identity(config.slide))


@stage_storage(lazy=("tiles", "thumbnails"))
def run_tile(config: TileConfig) -> int:
    out = Path(config.out)
    prepare_out(out, config, "tile_config.yaml")
    options_hash = options_hash_of(config)

    inputs = expand_slide_inputs(config.slides)
    manifest_path = out / MANIFEST_NAME
    resume = TileResume(out, options_hash, previous_rows(manifest_path))
    part = partition(inputs, lambda item: None if config.overwrite else resume.check(item.slide_id, item.path))
    log.info(f"[tile] {len(inputs)} inputs: {len(part.todo)} to tile, {part.describe()}{resume.describe()}")
    if part.todo:
        tile = _tile_on_ray if _use_ray(config) else _tile_locally
        tile(config, part.todo, out, options_hash, part.results, part.order, manifest_path)
    return finish("tile", inputs, part.results, manifest_path, MANIFEST_SCHEMA, config.strict)


def _use_ray(config: TileConfig) -> bool:
    """Ray when there is a cluster to use (nic.runtime.use_ray, the rule nic compress follows too);
    otherwise local worker processes (nic.tiling.local), which give the same files and rows without
    the seconds Ray takes to start. (A function of its own so a test can choose the path.)"""
    return use_ray(config.ray)


class _Collector:
    """Takes rows as slides finish: progress, and the manifest saved every MANIFEST_EVERY_S."""

    def __init__(self, total: int, results: dict[str, ManifestRow], order: list[str], manifest_path: Path) -> None:
        self.results = results
        self.progress = Progress("tile", total=total, unit="slides")
        self.tiles = 0
        self.saver = ManifestSaver(manifest_path, MANIFEST_SCHEMA, order, results, MANIFEST_EVERY_S)

    def add(self, row: ManifestRow) -> None:
        self.results[row["slide_id"]] = row
        self.tiles += int(row.get("tiles") or 0)
        self.progress.update(self.progress.done + 1, extra=f"{self.tiles} tissue tiles")
        self.saver.save_if_due()

    def finish(self, todo: list[SlideInput]) -> None:
        """Every slide without a row was lost with its worker on every attempt."""
        for item in todo:
            if item.slide_id not in self.results:
                self.results[item.slide_id] = failed_row(item.slide_id, item.path, f"{item.path}: {LOST_REASON}",
                                                         CRASH)
        self.progress.finish(extra=f"{self.tiles} tissue tiles")


def _tile_locally(config: TileConfig, todo: list[SlideInput], out: Path, options_hash: str,
                  results: dict[str, ManifestRow], order: list[str], manifest_path: Path) -> None:
    import pandas  # noqa: F401  (see below)

    from nic.tiling.local import local_workers, run_local

    # The workers are forked, so what the driver has imported they need not import again. pyarrow
    # imports pandas the first time it builds an array (each slide's tile table, the manifest): the
    # driver needs it for the manifest anyway, so it is imported once here, not once per worker.
    collector = _Collector(len(todo), results, order, manifest_path)
    run_local([{"slide_id": s.slide_id, "path": s.path} for s in todo], tile_one_slide,
              (config.slide, out, config.thumbnail_px, options_hash),
              local_workers(config.ray.num_cpus, len(todo)), collector.add)
    collector.finish(todo)


def batch_size(slides: int, cpus: int) -> int:
    """Slides per Ray task: about four tasks per CPU so the last ones balance, at most 16 slides
    (a task's fixed cost is tens of ms, a slide's a few hundred)."""
    return max(1, min(16, slides // (4 * max(1, cpus))))


def _tile_on_ray(config: TileConfig, todo: list[SlideInput], out: Path, options_hash: str,
                 results: dict[str, ManifestRow], order: list[str], manifest_path: Path) -> None:
    """Batches of slides as Ray tasks, streamed back as they finish. A batch whose worker died is
    split: each of its slides is retried alone (`max_retries`), so a slide that crashes its
    worker every time costs only itself, reported as lost."""
    import ray

    # nic tile asks for no GPU; an unset num_gpus would make connect import torch to count them.
    ray_options = config.ray if config.ray.num_gpus is not None else config.ray.model_copy(update={"num_gpus": 0})
    info = connect(ray_options, config.verbose)
    collector = _Collector(len(todo), results, order, manifest_path)
    args = (config.slide, out, config.thumbnail_px, options_hash)
    batch_task = ray.remote(num_cpus=1, max_retries=0)(tile_slides)
    single_task = ray.remote(num_cpus=1, max_retries=2)(tile_slides)
    items = [{"slide_id": s.slide_id, "path": s.path} for s in todo]
    size = batch_size(len(items), max(1, int(info.num_cpus)))
    batches = [items[i:i + size] for i in range(0, len(items), size)]
    pending = {batch_task.remote(batch, *args): (batch, False) for batch in batches}  # ref: (slides, alone)
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        batch, alone = pending.pop(ref)
        try:
            rows = ray.get(ref)
        except ray.exceptions.RayError:  # the worker (or its node) died; tile_slides never raises
            if not alone:
                pending.update({single_task.remote([item], *args): ([item], True) for item in batch})
            continue  # a slide that died alone on every retry: reported as lost by finish()
        for row in rows:
            collector.add(row)
    collector.finish(todo)
