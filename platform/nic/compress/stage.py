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

Where the tiles are encoded: on a cluster (an address, or Ray already running in this process, as
in `nic pipeline`; nic.runtime.use_ray, tile's rule too) by the Ray Data pipeline
(`_compress_on_ray`, nic.compress.pipeline), with one more pass over slides whose tiles were lost
with a worker or node; otherwise by one encoder in this process (nic.compress.local), which
writes the same grids and rows without the seconds Ray takes to start, and where a crash of the
process ends the run and the re-run resumes from the saved manifest and grids.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from nic.artifacts import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED, stable_hash, write_json_atomic
from nic.compress.collector import EncoderFacts
from nic.compress.driver import EncodingPass, pipeline_failed
from nic.compress.local import compress_locally
from nic.config.base import ConfigError
from nic.config.compress import CompressConfig
from nic.config.identity import config_identity
from nic.grids.dihedral import ALL_TRANSFORMS
from nic.grids.manifest import MANIFEST_SCHEMA, GridRow, grid_row
from nic.grids.reader import verify_grid_file
from nic.grids.schema import FORMAT_VERSION, TILES_DIR, GridError, check_slide_id, manifest_path, slide_file
from nic.grids.writer import clean_staging, remove_slide_grid
from nic.logs import stage_logger
from nic.runtime import connect, local_gpu_count, use_ray
from nic.slides.inputs import SlideInput, expand_slide_inputs
from nic.slides.stage import (
    ListingResume,
    ManifestRow,
    finish,
    partition,
    prepare_out,
    previous_rows,
    vouched_row,
)
from nic.stage_io import stage_storage
from nic.storage import display, ensure_local, remove

if TYPE_CHECKING:
    from nic.encoders.artifact import EncoderInfo

LOST_REASON = ("tiles never came back from the encoder pool (the actor processing them died repeatedly, "
               "e.g. a crash inside the slide library); no grid written")
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
    except Exception as exc:  # your own encoder's code can raise anything: it is your input (exit 2),
        # and the original traceback stays chained, so <out>/compress.log shows where it came from
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise ConfigError(f"cannot load encoder {config.encoder!r}: {detail}") from exc
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
                  transforms: tuple[int, ...], previous: dict | None = None) -> tuple[GridRow | None, str]:
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


class GridResume(ListingResume):
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

    noun = "grid(s)"

    def __init__(self, out: Path, facts: EncoderFacts, options_hash: str, transforms: tuple[int, ...],
                 previous: dict[str, dict]) -> None:
        super().__init__(out, previous)
        self.facts, self.options_hash, self.transforms = facts, options_hash, transforms
        self.redo: Counter[str] = Counter()  # why slides are (re)encoded, for the opening line

    def decide(self, item: SlideInput, overwrite: bool) -> ManifestRow | None:
        """The skipped row of a slide whose grid is complete, or None to (re)encode it, counting
        why; a stale grid is deleted first, so it cannot look complete (`partition`'s check)."""
        done, why = (None, "overwrite") if overwrite else self.check(item.slide_id, item.path)
        if done:
            return done
        self.redo[why.split(" (")[0]] += 1
        if why not in ("new", "overwrite"):
            self.drop(item.slide_id)
        return None

    def check(self, slide_id: str, path: str) -> tuple[ManifestRow | None, str]:
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

    def _vouched(self, row: dict | None, rel: str, size: int, mtime_ns: int | None, path: str) -> ManifestRow | None:
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
        return vouched_row(row, path)

    def drop(self, slide_id: str) -> None:
        """Delete a slide's grid (stale, or of an input that is no longer usable) here and, on an
        object store, from the bucket, so that no later run or reader takes it for complete."""
        remove_slide_grid(self.out, slide_id)
        rel = slide_file(self.out, slide_id).relative_to(self.out).as_posix()
        if self.listing is not None and self.listing.pop(rel, None) is not None:
            remove(slide_file(self.out, slide_id))


@stage_storage(lazy=(TILES_DIR,))
def run_compress(config: CompressConfig) -> int:
    out = Path(config.out)
    prepare_out(out, config, "compress_config.yaml", clean=clean_staging)
    facts = encoder_facts(config)
    transforms = ALL_TRANSFORMS if config.dihedral else (0,)
    options_hash = options_hash_of(config)
    inputs = expand_slide_inputs(config.slides)
    path = manifest_path(out)
    resume = GridResume(out, facts, options_hash, transforms, previous_rows(path))
    part = partition(inputs, lambda item: resume.decide(item, config.overwrite), problem=_id_problem,
                     extra=GridRow(encoder_name=facts.name, encoder_hash=facts.content_hash))
    for sid in part.unusable:  # an input that is no longer usable leaves no grid behind
        if _safe_id(sid):
            resume.drop(sid)
    todo = [(item.slide_id, item.path) for item in part.todo]
    results, order = part.results, part.order
    reasons = ", ".join(f"{n} {why}" for why, n in resume.redo.items())
    log.info(f"[compress] {len(inputs)} inputs: {len(todo)} to encode{f' ({reasons})' if reasons else ''}, "
             f"{part.describe()}; encoder {facts.name} ({facts.content_hash[:8]}, C={facts.embedding_dim})"
             + (", 8 rotations/flips" if config.dihedral else "")
             + (f", {len(facts.head_columns)} head-map columns" if facts.head_columns else "")
             + resume.describe())
    if todo:
        on_ray = _use_ray(config)
        encode = _compress_on_ray if on_ray else compress_locally
        stats = encode(config, todo, out, facts, options_hash, transforms, results, order, path)
        # Tiles lost with a worker or a node (not a slide's own error): one more pass over just
        # those slides, so losing a node mid-job loses no slide. A slide that kills its actor
        # every time fails again here, with the same reason. Only on Ray: locally nothing is lost
        # but with the whole process, and then the re-run resumes from the manifest.
        lost = [(sid, p) for sid, p in todo
                if results[sid]["status"] == STATUS_FAILED and LOST_REASON in str(results[sid].get("reason", ""))]
        if lost and on_ray:
            log.info(f"[compress] {len(lost)} slide(s) lost their tiles with a worker or node; encoding them once more")
            for sid, _ in lost:
                remove_slide_grid(out, sid)
            stats["retry"] = _compress_on_ray(config, lost, out, facts, options_hash, transforms, results, order,
                                              path)
        # What this run did and how fast (both passes), for benchmarks and whoever sizes the next run.
        write_json_atomic(out / RUN_STATS, stats)
    return finish("compress", inputs, results, path, MANIFEST_SCHEMA, config.strict)


def _use_ray(config: CompressConfig) -> bool:
    """The Ray Data pipeline when there is a cluster to use (nic.runtime.use_ray, tile's rule too),
    or when this machine has more than one GPU for it (one encoder actor per GPU; the local run
    encodes on one device); otherwise one encoder in this process (nic.compress.local), which
    writes the same grids and rows without the seconds Ray and Ray Data take to start."""
    if use_ray(config.ray):
        return True
    if config.use_gpu is False:
        return False
    gpus = config.ray.num_gpus if config.ray.num_gpus is not None else local_gpu_count()
    return gpus > 1


def _id_problem(item: SlideInput) -> str | None:
    """compress's own objection to an input: a slide id that cannot name a grid folder."""
    try:
        check_slide_id(item.slide_id)
    except GridError as exc:
        return f"{item.path}: {exc}"
    return None


def _safe_id(slide_id: str) -> bool:
    try:
        check_slide_id(slide_id)
    except GridError:
        return False
    return True


def _compress_on_ray(config: CompressConfig, todo: list[tuple[str, str]], out: Path, facts: EncoderFacts,
                     options_hash: str, transforms: tuple[int, ...], results: dict[str, ManifestRow],
                     order: list[str], path: Path) -> dict:
    """One pass of the Ray Data pipeline over `todo`; fills `results`, returns the pass's stats."""
    from nic.compress.pipeline import build_dataset, free_cpus, iter_encoded, max_node_cpus, plan_pool

    info = connect(config.ray, config.verbose)
    pool = plan_pool(config, info, max_node_cpus(), free_cpus())
    log.info(f"[compress] {pool.describe()}")

    run = EncodingPass(out, facts, transforms, options_hash, todo, results, order, path)
    try:
        for batch in iter_encoded(build_dataset(config, todo, pool, transforms, facts.embedding_dim,
                                                facts.head_columns, encoder=facts.ref,
                                                encoder_hash=facts.content_hash)):
            run.add(batch)
        lost_reason = LOST_REASON
    except KeyboardInterrupt:  # keep what is finished on record; the re-run resumes from it
        run.saver.save()
        raise
    except Exception as exc:  # the pool itself failed (e.g. the encoder cannot load on the workers)
        lost_reason = pipeline_failed(exc)
    return {"pool": asdict(pool), **run.end(lost_reason), "cluster": asdict(info), "retry": None}
