"""`nic compress`: slides -> Parquet feature grids (one file per slide) and an honest manifest.

Re-running skips slides whose grid is complete and was made by the same encoder (content hash),
the same slide options and the same transforms; anything else is re-encoded. Every input slide
gets exactly one manifest row; a slide that fails keeps no grid, so the grid store and the
manifest's ok/skipped rows always agree.

On an object store (`--out s3://...`) a re-run does not download the grids to decide that
(`GridResume`): the earlier manifest vouches for each grid whose object in the bucket's listing
has the size the manifest recorded and is not newer than the manifest; only a grid it cannot
vouch for (another size, newer, no row, a row of another encoder) is fetched and verified as a
local one would be. A stale grid is deleted from the bucket too.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from nic import storage
from nic.artifacts import (
    DUPLICATE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    read_manifest,
    stable_hash,
    write_bytes_atomic,
    write_json_atomic,
    write_manifest,
)
from nic.compress.actors import PRECISION_CODES
from nic.compress.collector import EncoderFacts, SlideCollector
from nic.config.base import ConfigError, dump_config
from nic.config.compress import CompressConfig
from nic.config.identity import config_identity
from nic.grids.dihedral import ALL_TRANSFORMS
from nic.grids.manifest import MANIFEST_SCHEMA, failed_row, grid_row
from nic.grids.reader import verify_grid_file
from nic.grids.schema import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TILES_DIR,
    GridError,
    check_slide_id,
    manifest_path,
    slide_file,
)
from nic.grids.writer import clean_staging, remove_slide_grid
from nic.logs import stage_logger
from nic.runtime import Progress, connect
from nic.stage_io import stage_storage
from nic.storage import display, ensure_local, remote_files, remove

if TYPE_CHECKING:
    from nic.encoders.artifact import EncoderInfo

LOST_REASON = ("tiles never came back from the encoder pool (the actor processing them died repeatedly, "
               "e.g. a crash inside the slide library); no grid written")
MANIFEST_EVERY_S = 5.0
RUN_STATS = "compress_run.json"
log = stage_logger("compress")


def encoder_facts(config: CompressConfig) -> EncoderFacts:
    """Load the encoder once in the driver: its hash decides resume, its C sizes the grid files."""
    try:
        from nic.encoders import load_encoder
        from nic.encoders.external import resolve_encoder
    except ImportError as exc:
        raise ConfigError(f"nic.encoders is not available: {exc}") from None
    try:
        # Your own encoder is resolved once, here (its spec beside it merged with the encoder_*
        # options, paths made absolute); the actors load exactly that spec.
        spec = resolve_encoder(config.encoder, config.encoder_overrides())
        _, info = load_encoder(spec if spec is not None else config.encoder, device="cpu")
    except ConfigError:
        raise
    except Exception as exc:
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise ConfigError(f"cannot load encoder {config.encoder!r}: {detail}") from None
    where = f" ({info.external['spec'] or info.external['model']})" if info.external else ""
    tile_px = getattr(info, "tile_px", None)
    if tile_px and int(tile_px) != config.slide.tile_px:
        raise ConfigError(f"encoder {info.name!r}{where} takes {tile_px} px tiles but slide.tile_px is "
                          f"{config.slide.tile_px}; set --set slide.tile_px={tile_px}")
    mpp = getattr(info, "mpp", None)
    if mpp and abs(float(mpp) - config.slide.target_mpp) > config.slide.mpp_tolerance * float(mpp):
        raise ConfigError(f"encoder {info.name!r}{where} was trained at {mpp:g} um/px but slide.target_mpp is "
                          f"{config.slide.target_mpp:g}; set --set slide.target_mpp={mpp:g}")
    columns = head_map_columns(config.encoder, info) if config.heads else ()
    return EncoderFacts(name=str(info.name), content_hash=str(info.content_hash),
                        embedding_dim=int(info.embedding_dim), head_columns=columns,
                        ref=spec if spec is not None else config.encoder,
                        record=dict(info.external) if info.external else None)


def head_map_columns(encoder: str, info: EncoderInfo) -> tuple[str, ...]:
    """The head-map columns of `--heads` (ConfigError, so exit 2, for an encoder without heads)."""
    from nic.encoders.head_maps import HeadsUnavailable, check_has_heads, load_head_mapper

    try:
        check_has_heads(encoder, info)  # built-ins and unsupervised kinds stop here
        return load_head_mapper(encoder).columns
    except HeadsUnavailable as exc:
        raise ConfigError(str(exc)) from None


def options_hash_of(config: CompressConfig) -> str:
    """What besides the encoder decides a grid's content. Head maps enter only when asked for (with
    the sha256 of the heads they come from), so grids made without them keep their hash, and a
    grid made without heads (or with other heads) is redone by a run with --heads."""
    options = {"slide": config_identity(config.slide), "format": FORMAT_VERSION}
    if config.heads:
        from nic.encoders.artifact import read_info, sha256_file
        from nic.encoders.head_maps import check_has_heads

        options["heads"] = sha256_file(check_has_heads(config.encoder, read_info(config.encoder)))
    return stable_hash(options)


def completed_row(out: Path, slide_id: str, path: str, facts: EncoderFacts, options_hash: str,
                  transforms: tuple[int, ...], previous: dict | None = None) -> tuple[dict | None, str]:
    """(skipped manifest row, "") when an earlier run left a complete grid made the same way, else
    (None, why it must be (re)encoded). `previous` is the earlier manifest's row of the slide: a grid
    whose tile count disagrees with it (for the same encoder and options) was replaced since, and
    is not trusted."""
    target = slide_file(out, slide_id)
    if not target.exists():
        return None, "new"
    try:
        meta = verify_grid_file(target)
    except GridError as exc:
        return None, f"incomplete or unreadable grid ({exc})"
    if meta.encoder_hash != facts.content_hash:
        return None, f"encoder changed ({meta.encoder_name} {meta.encoder_hash[:8]} -> {facts.name} {facts.content_hash[:8]})"
    if meta.options_hash != options_hash:
        return None, "slide options changed"
    if tuple(meta.transforms) != transforms:
        return None, "dihedral option changed"
    if meta.slide_id != slide_id:
        return None, "file belongs to another slide id"
    if previous and previous.get("status") != STATUS_FAILED and previous.get("tiles") is not None \
            and previous.get("encoder_hash") == meta.encoder_hash and previous.get("options_hash") == meta.options_hash \
            and int(previous["tiles"]) != meta.tiles:
        return None, (f"tile count disagrees with the manifest ({target} holds {meta.tiles} tiles, "
                      f"{manifest_path(out).name} says {int(previous['tiles'])})")
    meta = type(meta)(**{**meta.__dict__, "path": display(path)})
    return grid_row(meta, STATUS_SKIPPED, 0.0, str(target.relative_to(out)), file_bytes=target.stat().st_size), ""


class GridResume:
    """Which slides an earlier run left complete in `out`: `completed_row` on each grid file for a
    local store; for an object store (a mirror path) from the manifest and one listing of the
    bucket, so that a re-run over thousands of finished slides downloads no grid.

    A grid object is vouched for by the earlier manifest's row of its slide when the row says ok or
    skipped, names this file, was made by this encoder with these options and transforms, records
    the object's size (`file_bytes`), and the object is not newer than the manifest (nic uploads a
    manifest after the grids it describes, so a grid replaced since is newer). A grid the manifest
    cannot vouch for is fetched and verified as a local one (truncated, another slide's, another
    tile count than the row: redone). A local file is verified in place: the mirror keeps there
    only current copies and grids written on this node and not uploaded yet."""

    def __init__(self, out: Path, facts: EncoderFacts, options_hash: str, transforms: tuple[int, ...],
                 previous: dict[str, dict]) -> None:
        self.out, self.facts, self.options_hash, self.transforms = out, facts, options_hash, transforms
        self.previous = previous
        # None for a local store; and with the whole output fetched first, as before issue 16 item 6
        self.listing = None if storage.PREFETCH_OUTPUTS else remote_files(out)
        manifest = (self.listing or {}).get(MANIFEST_NAME)
        self.manifest_mtime_ns = manifest.mtime_ns if manifest else None
        self.vouched = 0  # decided from the manifest and the listing
        self.fetched = 0  # grids downloaded to be verified

    def check(self, slide_id: str, path: str) -> tuple[dict | None, str]:
        """(skipped manifest row, "") for a complete grid, else (None, why it must be (re)encoded)."""
        previous = self.previous.get(slide_id)
        target = slide_file(self.out, slide_id)
        if self.listing is not None and not target.exists():
            rel = target.relative_to(self.out).as_posix()
            remote = self.listing.get(rel)
            if remote is None:
                return None, "new"
            row = self._vouched(previous, rel, remote.size, remote.mtime_ns, path)
            if row is not None:
                self.vouched += 1
                return row, ""
            ensure_local(target, missing_ok=True)
            self.fetched += 1
        return completed_row(self.out, slide_id, path, self.facts, self.options_hash, self.transforms, previous)

    def _vouched(self, row: dict | None, rel: str, size: int, mtime_ns: int | None, path: str) -> dict | None:
        if not row or row.get("status") not in (STATUS_OK, STATUS_SKIPPED) or row.get("tiles") is None:
            return None
        if row.get("file") != rel or row.get("file_bytes") is None or int(row["file_bytes"]) != size:
            return None
        if row.get("encoder_hash") != self.facts.content_hash or row.get("options_hash") != self.options_hash:
            return None
        if bool(row.get("dihedral")) != (len(self.transforms) == len(ALL_TRANSFORMS)):
            return None
        if mtime_ns is None or self.manifest_mtime_ns is None or mtime_ns > self.manifest_mtime_ns:
            return None
        return {**row, "path": display(path), "status": STATUS_SKIPPED, "reason": "already complete",
                "error_kind": None, "seconds": 0.0}

    def drop(self, slide_id: str) -> None:
        """Delete a slide's grid (stale, or of an input that is no longer usable) here and, on an
        object store, from the bucket, so that no later run or reader takes it for complete."""
        remove_slide_grid(self.out, slide_id)
        rel = slide_file(self.out, slide_id).relative_to(self.out).as_posix()
        if self.listing is not None and self.listing.pop(rel, None) is not None:
            remove(slide_file(self.out, slide_id))

    def describe(self) -> str:
        if self.listing is None:
            return ""
        return (f"; decided from the manifest and a listing of {display(self.out)}: {self.vouched} grid(s) vouched "
                f"for without a download, {self.fetched} fetched to be verified")


@stage_storage(lazy=(TILES_DIR,))
def run_compress(config: CompressConfig) -> int:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_staging(out)
    write_bytes_atomic(out / "compress_config.yaml", dump_config(config).encode())
    facts = encoder_facts(config)
    transforms = ALL_TRANSFORMS if config.dihedral else (0,)
    options_hash = options_hash_of(config)

    from nic.slides.inputs import expand_slide_inputs, note_aliases

    inputs = expand_slide_inputs(config.slides)
    previous = _previous_rows(manifest_path(out))
    resume = GridResume(out, facts, options_hash, transforms, previous)
    order = [item.slide_id for item in inputs]
    results: dict[str, dict] = {}
    todo: list[tuple[str, str]] = []
    redo: Counter[str] = Counter()
    for item in inputs:
        if item.duplicate_of:  # the same file under the same id again: one row, encoded once
            results[item.slide_id] = {**failed_row(item.slide_id, item.path, item.note or "", DUPLICATE, 0.0,
                                                   facts.name, facts.content_hash), "status": STATUS_SKIPPED}
            continue
        error = item.error
        if error is None:
            try:
                check_slide_id(item.slide_id)
            except GridError as exc:
                error = f"{item.path}: {exc}"
        if error:
            results[item.slide_id] = failed_row(item.slide_id, item.path, error, "input", 0.0,
                                                facts.name, facts.content_hash)
            if _safe_id(item.slide_id):
                resume.drop(item.slide_id)
            continue
        done, why = (None, "overwrite") if config.overwrite else resume.check(item.slide_id, item.path)
        if done:
            results[item.slide_id] = done
            continue
        redo[why.split(" (")[0]] += 1
        if why not in ("new", "overwrite"):
            resume.drop(item.slide_id)  # stale: it must not look complete
        todo.append((item.slide_id, item.path))

    path = manifest_path(out)
    reasons = ", ".join(f"{n} {why}" for why, n in redo.items())
    dups = sum(r.get("error_kind") == DUPLICATE for r in results.values())
    log.info(f"[compress] {len(inputs)} inputs: {len(todo)} to encode{f' ({reasons})' if reasons else ''}, "
             f"{sum(r['status'] == STATUS_SKIPPED for r in results.values()) - dups} already complete, "
             f"{sum(r['status'] == STATUS_FAILED for r in results.values())} unusable"
             + (f", {dups} repeating another input (same file, same id)" if dups else "") + "; "
             f"encoder {facts.name} ({facts.content_hash[:8]}, C={facts.embedding_dim})"
             + (", 8 rotations/flips" if config.dihedral else "")
             + (f", {len(facts.head_columns)} head-map columns" if facts.head_columns else "")
             + resume.describe())
    if todo:
        stats = _compress_on_ray(config, todo, out, facts, options_hash, transforms, results, order, path)
        # Tiles lost with a worker or a node (not a slide's own error): one more pass over just
        # those slides, so losing a node mid-job loses no slide. A slide that kills its actor
        # every time fails again here, with the same reason.
        lost = [(sid, p) for sid, p in todo
                if results[sid]["status"] == STATUS_FAILED and LOST_REASON in str(results[sid].get("reason", ""))]
        if lost:
            log.info(f"[compress] {len(lost)} slide(s) lost their tiles with a worker or node; encoding them once more")
            for sid, _ in lost:
                remove_slide_grid(out, sid)
            stats["retry"] = _compress_on_ray(config, lost, out, facts, options_hash, transforms, results, order,
                                              path)
        # What this run did and how fast (both passes), for benchmarks and whoever sizes the next run.
        write_json_atomic(out / RUN_STATS, stats)
    note_aliases(results, inputs)
    _save_manifest(path, order, results)
    return _summarise(results, order, path, config.strict)


def _safe_id(slide_id: str) -> bool:
    try:
        check_slide_id(slide_id)
    except GridError:
        return False
    return True


def _compress_on_ray(config: CompressConfig, todo: list[tuple[str, str]], out: Path, facts: EncoderFacts,
                     options_hash: str, transforms: tuple[int, ...], results: dict[str, dict],
                     order: list[str], path: Path) -> dict:
    """One pass of the Ray Data pipeline over `todo`; fills `results`, returns the pass's stats."""
    from nic.compress.pipeline import build_dataset, free_cpus, iter_encoded, max_node_cpus, plan_pool

    info = connect(config.ray, config.verbose)
    pool = plan_pool(config, info, max_node_cpus(), free_cpus())
    log.info(f"[compress] {pool.describe()}")

    collector = SlideCollector(out, facts, transforms, options_hash, dict(todo))
    progress = Progress("compress", total=len(todo), unit="slides")
    unit = "tiles" if len(transforms) == 1 else f"tile encodings (x{len(transforms)} transforms)"
    start = time.monotonic()
    last_save = start
    first_batch = None
    try:
        for batch in iter_encoded(build_dataset(config, todo, pool, transforms, facts.embedding_dim,
                                                facts.head_columns, encoder=facts.ref,
                                                encoder_hash=facts.content_hash)):
            if first_batch is None:
                first_batch = (time.monotonic(), collector.tiles_done)
            finished = collector.add_batch(batch)
            for sid in finished:
                results[sid] = collector.results[sid]
            rate = collector.tiles_done / max(time.monotonic() - start, 1e-9)
            progress.update(collector.finished, extra=f"{collector.tiles_done} {unit} ({rate:.0f}/s)")
            if finished and time.monotonic() - last_save > MANIFEST_EVERY_S:
                _save_manifest(path, order, results)
                last_save = time.monotonic()
        lost_reason = LOST_REASON
    except KeyboardInterrupt:  # keep what is finished on record; the re-run resumes from it
        _save_manifest(path, order, results)
        raise
    except Exception as exc:  # the pool itself failed (e.g. the encoder cannot load on the workers)
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        lost_reason = f"the encoder pipeline failed before this slide was done: {detail[:2000]}"
    collector.fail_unfinished([sid for sid, _ in todo], lost_reason)
    results.update({sid: collector.results[sid] for sid, _ in todo})
    end = time.monotonic()
    rate = collector.tiles_done / max(end - start, 1e-9)
    steady = None  # only meaningful when encoding lasted a while after the first batch
    if first_batch is not None and end - first_batch[0] > 2.0:
        steady = (collector.tiles_done - first_batch[1]) / (end - first_batch[0])
    stats = {
        "pool": asdict(pool), "slides": len(todo), "tile_encodings": collector.tiles_done,
        "transforms": len(transforms), "wall_s": end - start,
        "first_batch_s": None if first_batch is None else first_batch[0] - start,
        "tiles_per_s": rate, "steady_tiles_per_s": steady, "duplicate_rows_ignored": collector.duplicates,
        "actor_read_s": collector.actor_read_s, "actor_encode_s": collector.actor_encode_s,
        "precision": sorted(name for name, code in PRECISION_CODES.items() if code in collector.precision_codes),
        "cluster": asdict(info), "retry": None,
    }
    progress.finish(extra=f"{collector.tiles_done} {unit} ({rate:.0f}/s)"
                    + (f", {collector.duplicates} duplicate rows from retried tasks ignored"
                       if collector.duplicates else ""))
    return stats


def _previous_rows(path: Path) -> dict[str, dict]:
    """The earlier run's manifest rows by slide id ({} when there is none or it is unreadable)."""
    try:
        return {row["slide_id"]: row for row in read_manifest(path)}
    except Exception:  # a damaged manifest is rewritten; the grids are verified on their own
        return {}


def _save_manifest(path: Path, order: list[str], results: dict[str, dict]) -> None:
    write_manifest(path, [results[sid] for sid in order if sid in results], MANIFEST_SCHEMA)


def _summarise(results: dict[str, dict], order: list[str], path: Path, strict: bool) -> int:
    counts = Counter(r["status"] for r in results.values())
    dups = sum(r.get("error_kind") == DUPLICATE for r in results.values())
    counts[STATUS_SKIPPED] -= dups  # a repeated input is no slide of its own
    tiles = sum(int(r.get("tiles") or 0) for r in results.values() if r["status"] != STATUS_FAILED)
    log.info(f"[compress] done: {counts[STATUS_OK]} ok, {counts[STATUS_SKIPPED]} skipped (already complete), "
             f"{counts[STATUS_FAILED]} failed" + (f", {dups} duplicate input(s) skipped" if dups else "")
             + f"; {tiles} tissue tiles; manifest: {display(path)}")
    for sid in order:
        row = results.get(sid)
        if row and row["status"] == STATUS_FAILED:
            log.warning(f"[compress]   failed {sid}: {row['reason']}")
    if counts[STATUS_OK] + counts[STATUS_SKIPPED] == 0:
        log.error("[compress] no slide succeeded")
        return 1
    return 1 if strict and counts[STATUS_FAILED] else 0
