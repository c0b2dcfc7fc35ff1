"""Tiling one slide: plan it, write its tile coordinates and overview, return its manifest row.

Runs inside a Ray Data task. Nothing a slide does may escape as an exception: every failure
becomes a manifest row with a reason, so one broken slide never stops a job over thousands.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nic.artifacts import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    atomic_path,
    is_no_space,
    no_space_message,
    write_parquet_atomic,
)
from nic.slides.stage import ALREADY_COMPLETE, ManifestRow, failed_row, manifest_schema, no_tissue_error
from nic.storage import display, publish

TILE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("tissue", pa.float32()),
    ]
)


class TileRow(ManifestRow, total=False):
    """A row of `nic tile`'s manifest: the base columns and where the slide's resolution came from."""

    mpp_source: str


MANIFEST_SCHEMA = manifest_schema(TileRow, {"base_mpp": [("mpp_source", pa.string())]})

META_PREFIX = "nic."
#: zlib level of the overview PNGs: level 1 encodes in about half the time of PIL's default 6 for
#: files ~8 % larger; the pixels are the same. Encoding was the biggest single cost of a slide.
PNG_LEVEL = 1


def tiles_path(out: Path, slide_id: str) -> Path:
    return out / "tiles" / f"{slide_id}.parquet"


def overview_path(out: Path, slide_id: str) -> Path:
    return out / "thumbnails" / f"{slide_id}.png"


def completed_row(out: Path, slide_id: str, path: str, options_hash: str,
                  previous: dict | None = None) -> TileRow | None:
    """The manifest row of a slide finished by an earlier run with the same options, else None.

    The tile file is written last, so its existence with matching metadata means complete. A
    truncated or unreadable file, one of another slide, or one whose tile count disagrees with
    the earlier manifest's row for the same options (`previous`) is redone, not trusted."""
    target = tiles_path(out, slide_id)
    if not (target.exists() and overview_path(out, slide_id).exists()):
        return None
    try:
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(target).metadata or {}).items()}
        if meta.get(META_PREFIX + "options_hash") != options_hash:
            return None
        if meta.get(META_PREFIX + "slide_id", slide_id) != slide_id:
            return None
        if pq.ParquetFile(target).metadata.num_rows != int(meta[META_PREFIX + "tiles"]):
            return None
        if previous and previous.get("status") != STATUS_FAILED and previous.get("options_hash") == options_hash \
                and previous.get("tiles") is not None and int(previous["tiles"]) != int(meta[META_PREFIX + "tiles"]):
            return None
    except Exception:  # unreadable leftovers are redone, not trusted
        return None
    return {
        "slide_id": slide_id, "path": display(path), "status": STATUS_SKIPPED, "reason": ALREADY_COMPLETE,
        "mpp": float(meta[META_PREFIX + "mpp"]), "base_mpp": float(meta[META_PREFIX + "base_mpp"]),
        "mpp_source": meta[META_PREFIX + "mpp_source"], "level": int(meta[META_PREFIX + "level"]),
        "rows": int(meta[META_PREFIX + "rows"]), "cols": int(meta[META_PREFIX + "cols"]),
        "tiles": int(meta[META_PREFIX + "tiles"]), "seconds": 0.0, "options_hash": options_hash,
        "file_bytes": target.stat().st_size,
    }


def tile_one_slide(item: dict[str, Any], options: Any, out: Path, thumbnail_px: int,
                   options_hash: str) -> ManifestRow:
    from nic.slides import SlideError, open_slide, plan_slide

    start = time.perf_counter()
    slide_id, path = item["slide_id"], item["path"]
    try:
        plan = plan_slide(path, options, slide_id=slide_id)
        rows, cols, xs, ys, tissue = plan.tiles()
        table = pa.table(
            {"slide_id": [slide_id] * len(rows), "row": rows, "col": cols, "x": xs, "y": ys, "tissue": tissue},
            schema=TILE_SCHEMA,
        )
        res = plan.resolution
        meta = {
            "slide_id": slide_id, "path": display(path), "tile_px": plan.grid.tile_px, "mpp": res.target_mpp,
            "base_mpp": res.base_mpp, "mpp_source": res.mpp_source, "level": res.level,
            "rows": plan.grid.rows, "cols": plan.grid.cols, "tiles": len(rows), "options_hash": options_hash,
        }
        table = table.replace_schema_metadata({META_PREFIX + k: str(v) for k, v in meta.items()})

        with open_slide(path) as slide:
            overview = _render(slide, plan, thumbnail_px)
        with atomic_path(overview_path(out, slide_id)) as tmp:
            overview.save(tmp, format="PNG", compress_level=PNG_LEVEL)
        if not len(rows):  # the overview stays, so a person can see why
            raise no_tissue_error(path, plan, options)
        write_parquet_atomic(tiles_path(out, slide_id), table)  # last: marks the slide complete
        # On an object store, this node uploads what it wrote (the driver's node cannot see it).
        publish(overview_path(out, slide_id))
        publish(tiles_path(out, slide_id))
        row: TileRow = {
            "slide_id": slide_id, "path": display(path), "status": STATUS_OK, "reason": "", "error_kind": None,
            "mpp": res.target_mpp, "base_mpp": res.base_mpp, "mpp_source": res.mpp_source,
            "level": res.level, "rows": plan.grid.rows, "cols": plan.grid.cols, "tiles": len(rows),
            "seconds": time.perf_counter() - start, "options_hash": options_hash,
            "file_bytes": tiles_path(out, slide_id).stat().st_size,
        }
        return row
    except SlideError as exc:
        return failed_row(slide_id, path, str(exc), exc.kind, time.perf_counter() - start)
    except Exception as exc:  # a bug or an unforeseen file problem: report it, keep the job going
        if is_no_space(exc):  # a full disk: the file it could not write, not a traceback line
            return failed_row(slide_id, path, f"{path}: {no_space_message(exc, display(out))}", "no_space",
                              time.perf_counter() - start)
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return failed_row(slide_id, path, f"{path}: unexpected error: {detail}", "error",
                          time.perf_counter() - start)


def tile_slides(items: list[dict[str, Any]], options: Any, out: Path, thumbnail_px: int,
                options_hash: str) -> list[ManifestRow]:
    """Several slides in one Ray task (a task costs tens of ms; a slide a few hundred): one row
    each, a failing slide's row among the others' (tile_one_slide never raises)."""
    return [tile_one_slide(item, options, out, thumbnail_px, options_hash) for item in items]


def _render(slide, plan, thumbnail_px: int):
    from nic.tiling.overview import render_overview

    return render_overview(slide, plan, thumbnail_px)
