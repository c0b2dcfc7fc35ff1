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

import os
import sys
import time
from collections import Counter
from pathlib import Path

from nic import storage
from nic.artifacts import (
    DUPLICATE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    clean_stale_temporaries,
    read_manifest,
    stable_hash,
    write_bytes_atomic,
    write_manifest,
)
from nic.config.base import dump_config
from nic.config.identity import config_identity
from nic.config.tile import TileConfig
from nic.logs import stage_logger
from nic.runtime import Progress, connect
from nic.slides.inputs import SlideInput, expand_slide_inputs, note_aliases
from nic.stage_io import stage_storage
from nic.storage import display, ensure_local, remote_files
from nic.tiling.worker import (
    MANIFEST_SCHEMA,
    completed_row,
    failed_row,
    overview_path,
    tile_one_slide,
    tile_slides,
    tiles_path,
)

MANIFEST_NAME = "slides.parquet"
log = stage_logger("tile")
LOST_REASON = "the worker processing this slide died repeatedly (crash inside the slide library?); no output written"


class TileResume:
    """Which slides an earlier run left complete in `out`: `completed_row` on the local files; on an
    object store, the earlier manifest vouches for a slide whose tile file and overview are in the
    bucket's listing, the tile file with the size the manifest recorded (`file_bytes`), both not
    newer than the manifest, and whose row says ok or skipped with the same options. Other slides'
    files are fetched and checked as local ones (see nic.compress.stage.GridResume)."""

    def __init__(self, out: Path, options_hash: str, previous: dict[str, dict]) -> None:
        self.out, self.options_hash, self.previous = out, options_hash, previous
        self.listing = None if storage.PREFETCH_OUTPUTS else remote_files(out)  # None: a local out
        manifest = (self.listing or {}).get(MANIFEST_NAME)
        self.manifest_mtime_ns = manifest.mtime_ns if manifest else None
        self.vouched = 0
        self.fetched = 0

    def check(self, slide_id: str, path: str) -> dict | None:
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
                return {**row, "path": display(path), "status": STATUS_SKIPPED, "reason": "already complete",
                        "error_kind": None, "seconds": 0.0}
            for f in files:
                if not f.exists():
                    ensure_local(f, missing_ok=True)
            self.fetched += 1
        return completed_row(self.out, slide_id, path, self.options_hash, previous)

    def describe(self) -> str:
        if self.listing is None:
            return ""
        return (f"; decided from the manifest and a listing of {display(self.out)}: {self.vouched} slide(s) vouched "
                f"for without a download, {self.fetched} fetched to be verified")


def options_hash_of(config: TileConfig) -> str:
    """The resume key of every tile file: the slide options' identity, which alone decides a
    slide's tile grid (recorded in each file's metadata as `nic.options_hash`)."""
    return stable_hash(config_identity(config.slide))


@stage_storage(lazy=("tiles", "thumbnails"))
def run_tile(config: TileConfig) -> int:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    write_bytes_atomic(out / "tile_config.yaml", dump_config(config).encode())
    options_hash = options_hash_of(config)

    inputs = expand_slide_inputs(config.slides)
    previous = _previous_rows(out / MANIFEST_NAME)
    resume = TileResume(out, options_hash, previous)
    results: dict[str, dict] = {}
    todo: list[SlideInput] = []
    for item in inputs:
        if item.error:
            results[item.slide_id] = failed_row(item.slide_id, item.path, item.error, "input")
            continue
        if item.duplicate_of:  # the same file under the same id again: one row, not processed twice
            results[item.slide_id] = {**failed_row(item.slide_id, item.path, item.note or "", DUPLICATE),
                                      "status": STATUS_SKIPPED}
            continue
        done = None if config.overwrite else resume.check(item.slide_id, item.path)
        if done:
            results[item.slide_id] = done
        else:
            todo.append(item)

    order = [item.slide_id for item in inputs]
    manifest_path = out / MANIFEST_NAME
    dups = sum(r.get("error_kind") == DUPLICATE for r in results.values())
    log.info(f"[tile] {len(inputs)} inputs: {len(todo)} to tile, "
             f"{sum(r['status'] == STATUS_SKIPPED for r in results.values()) - dups} already complete, "
             f"{sum(r['status'] == STATUS_FAILED for r in results.values())} unusable"
             + (f", {dups} repeating another input (same file, same id)" if dups else "") + resume.describe())
    if todo:
        tile = _tile_on_ray if _use_ray(config) else _tile_locally
        tile(config, todo, out, options_hash, results, order, manifest_path)
    note_aliases(results, inputs)
    _save_manifest(manifest_path, order, results)
    return _summarise(results, order, manifest_path, config.strict)


def _use_ray(config: TileConfig) -> bool:
    """Ray when there is a cluster to use (an address, or Ray already started in this process, as
    in `nic pipeline` and the tests); otherwise local worker processes (nic.tiling.local), which
    give the same files and rows without the seconds Ray takes to start."""
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class _Collector:
    """Takes rows as slides finish: progress, and the manifest saved every 10 s (not per slide) so a
    killed job still says what it finished."""

    def __init__(self, total: int, results: dict[str, dict], order: list[str], manifest_path: Path) -> None:
        self.results, self.order, self.manifest_path = results, order, manifest_path
        self.progress = Progress("tile", total=total, unit="slides")
        self.tiles = 0
        self.last_save = time.monotonic()

    def add(self, row: dict) -> None:
        self.results[row["slide_id"]] = row
        self.tiles += int(row.get("tiles") or 0)
        self.progress.update(self.progress.done + 1, extra=f"{self.tiles} tissue tiles")
        if time.monotonic() - self.last_save > 10:
            _save_manifest(self.manifest_path, self.order, self.results)
            self.last_save = time.monotonic()

    def finish(self, todo: list[SlideInput]) -> None:
        for item in todo:
            if item.slide_id not in self.results:
                self.results[item.slide_id] = failed_row(item.slide_id, item.path, f"{item.path}: {LOST_REASON}",
                                                         "crash")
        self.progress.finish(extra=f"{self.tiles} tissue tiles")


def _tile_locally(config: TileConfig, todo: list[SlideInput], out: Path, options_hash: str,
                  results: dict[str, dict], order: list[str], manifest_path: Path) -> None:
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
                 results: dict[str, dict], order: list[str], manifest_path: Path) -> None:
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


def _previous_rows(path: Path) -> dict[str, dict]:
    """The earlier run's manifest rows by slide id ({} when there is none or it is unreadable)."""
    try:
        return {row["slide_id"]: row for row in read_manifest(path)}
    except Exception:  # a damaged manifest is rewritten; the tile files are checked on their own
        return {}


def _save_manifest(path: Path, order: list[str], results: dict[str, dict]) -> None:
    write_manifest(path, [results[sid] for sid in order if sid in results], MANIFEST_SCHEMA)


def _summarise(results: dict[str, dict], order: list[str], manifest_path: Path, strict: bool) -> int:
    counts = Counter(r["status"] for r in results.values())
    dups = sum(r.get("error_kind") == DUPLICATE for r in results.values())
    counts[STATUS_SKIPPED] -= dups  # a repeated input is no slide of its own
    tiles = sum(int(r.get("tiles") or 0) for r in results.values() if r["status"] != STATUS_FAILED)
    log.info(f"[tile] done: {counts[STATUS_OK]} ok, {counts[STATUS_SKIPPED]} skipped (already complete), "
             f"{counts[STATUS_FAILED]} failed" + (f", {dups} duplicate input(s) skipped" if dups else "")
             + f"; {tiles} tissue tiles; manifest: {display(manifest_path)}")
    for sid in order:
        row = results.get(sid)
        if row and row["status"] == STATUS_FAILED:
            log.warning(f"[tile]   failed {sid}: {row['reason']}")
    succeeded = counts[STATUS_OK] + counts[STATUS_SKIPPED]
    if succeeded == 0:
        log.error("[tile] no slide succeeded")
        return 1
    if strict and counts[STATUS_FAILED]:
        return 1
    return 0
