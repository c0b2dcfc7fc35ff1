"""The grid store's manifest (grids/slides.parquet): one row per input slide, whatever happened to it.

The base manifest of every slide stage (nic.slides.stage: status ok | failed | skipped, a reason
naming the file, error_kind), plus what a grid consumer needs to trust a grid: encoder name and
hash, C, transforms.
"""

from __future__ import annotations

import pyarrow as pa

from nic.artifacts import STATUS_SKIPPED
from nic.grids.schema import GridMeta
from nic.slides.stage import ALREADY_COMPLETE, ManifestRow, manifest_schema
from nic.slides.stage import failed_row as slide_failed_row


class GridRow(ManifestRow, total=False):
    """A row of the grid store's manifest: the base columns and the grid's own."""

    tile_px: int
    encoder_name: str | None  # also on a failed row: which encoder the run was for
    encoder_hash: str | None
    embedding_dim: int
    dihedral: bool
    file: str  # the grid file, relative to the store


MANIFEST_SCHEMA = manifest_schema(GridRow, {
    "cols": [("tile_px", pa.int32())],
    "seconds": [("encoder_name", pa.string()), ("encoder_hash", pa.string()), ("embedding_dim", pa.int32()),
                ("dihedral", pa.bool_())],
    "options_hash": [("file", pa.string())],
})


def failed_row(slide_id: str, path: str, reason: str, kind: str = "error", seconds: float = 0.0,
               encoder_name: str | None = None, encoder_hash: str | None = None) -> GridRow:
    """nic.slides.stage.failed_row with the encoder the run was for."""
    return {**slide_failed_row(slide_id, path, reason, kind, seconds), "encoder_name": encoder_name,
            "encoder_hash": encoder_hash}


def grid_row(meta: GridMeta, status: str, seconds: float, file: str, reason: str = "",
             file_bytes: int | None = None) -> GridRow:
    """The manifest row of a slide whose grid file is complete (status ok, or skipped when an
    earlier run made it). `file_bytes`, the grid file's size, lets a re-run on an object store
    trust the grid from a listing of the bucket without downloading it (nic.compress.stage)."""
    return {
        "slide_id": meta.slide_id, "path": meta.path, "status": status,
        "reason": reason or (ALREADY_COMPLETE if status == STATUS_SKIPPED else ""), "error_kind": None,
        "mpp": meta.mpp, "base_mpp": meta.base_mpp, "level": meta.level, "rows": meta.rows, "cols": meta.cols,
        "tile_px": meta.tile_px, "tiles": meta.tiles, "seconds": seconds, "encoder_name": meta.encoder_name,
        "encoder_hash": meta.encoder_hash, "embedding_dim": meta.embedding_dim,
        "dihedral": len(meta.transforms) == 8, "options_hash": meta.options_hash, "file": file,
        "file_bytes": file_bytes,
    }
