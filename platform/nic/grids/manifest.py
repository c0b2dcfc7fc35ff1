"""The grid store's manifest (grids/slides.parquet): one row per input slide, whatever happened to it.

Same conventions as `nic tile`'s manifest (status ok | failed | skipped, a reason naming the file,
error_kind), plus what a grid consumer needs to trust a grid: encoder name and hash, C, transforms.
"""

from __future__ import annotations

import pyarrow as pa

from nic.artifacts import STATUS_FAILED, STATUS_SKIPPED
from nic.grids.schema import GridMeta
from nic.storage import display

MANIFEST_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("path", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error_kind", pa.string()),
        ("mpp", pa.float64()),
        ("base_mpp", pa.float64()),
        ("level", pa.int32()),
        ("rows", pa.int32()),
        ("cols", pa.int32()),
        ("tile_px", pa.int32()),
        ("tiles", pa.int64()),
        ("seconds", pa.float64()),
        ("encoder_name", pa.string()),
        ("encoder_hash", pa.string()),
        ("embedding_dim", pa.int32()),
        ("dihedral", pa.bool_()),
        ("options_hash", pa.string()),
        ("file", pa.string()),
        ("file_bytes", pa.int64()),
    ]
)


def failed_row(slide_id: str, path: str, reason: str, kind: str = "error", seconds: float = 0.0,
               encoder_name: str | None = None, encoder_hash: str | None = None) -> dict:
    return {"slide_id": slide_id, "path": display(path), "status": STATUS_FAILED, "reason": reason, "error_kind": kind,
            "seconds": seconds, "encoder_name": encoder_name, "encoder_hash": encoder_hash}


def grid_row(meta: GridMeta, status: str, seconds: float, file: str, reason: str = "",
             file_bytes: int | None = None) -> dict:
    """The manifest row of a slide whose grid file is complete (status ok, or skipped when an
    earlier run made it). `file_bytes`, the grid file's size, lets a re-run on an object store
    trust the grid from a listing of the bucket without downloading it (nic.compress.stage)."""
    return {
        "slide_id": meta.slide_id, "path": meta.path, "status": status,
        "reason": reason or ("already complete" if status == STATUS_SKIPPED else ""), "error_kind": None,
        "mpp": meta.mpp, "base_mpp": meta.base_mpp, "level": meta.level, "rows": meta.rows, "cols": meta.cols,
        "tile_px": meta.tile_px, "tiles": meta.tiles, "seconds": seconds, "encoder_name": meta.encoder_name,
        "encoder_hash": meta.encoder_hash, "embedding_dim": meta.embedding_dim,
        "dihedral": len(meta.transforms) == 8, "options_hash": meta.options_hash, "file": file,
        "file_bytes": file_bytes,
    }
