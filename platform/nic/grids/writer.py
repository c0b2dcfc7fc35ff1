"""Writing one slide's grid file so that it is either complete or absent.

The file is written under grids/.staging/ and renamed into grids/tiles/slide_id=<id>/ only when
whole, with its GridMeta in the Parquet metadata; a killed job leaves at most a staging temporary,
which no reader and no resume check ever mistakes for a grid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nic.artifacts import NoSpaceError, is_no_space
from nic.grids.schema import GridError, GridMeta, slide_dir, slide_file, staging_dir, tile_schema


def grid_table(
    meta: GridMeta,
    row: np.ndarray,
    col: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    tissue: np.ndarray,
    embedding: np.ndarray,
    transform: np.ndarray | None = None,
    heads: np.ndarray | None = None,
) -> pa.Table:
    """The Arrow table of one slide's tiles, sorted by (transform, row, col), metadata attached.

    `heads` (n, len(meta.head_columns)) are the head-map values, one float32 column each.
    Checks that the arrays agree with `meta` (row count, C, positions inside the grid) so that a bug
    upstream fails here rather than producing a grid that reads back wrong."""
    n = len(row)
    transform = np.zeros(n, dtype=np.int8) if transform is None else np.asarray(transform, dtype=np.int8)
    embedding = np.asarray(embedding)
    if embedding.ndim != 2 or embedding.shape != (n, meta.embedding_dim):
        raise GridError(f"slide {meta.slide_id}: embeddings of shape {embedding.shape}, "
                        f"expected ({n}, {meta.embedding_dim})")
    if n != meta.expected_rows:
        raise GridError(f"slide {meta.slide_id}: {n} rows, expected {meta.tiles} tiles x "
                        f"{len(meta.transforms)} transforms = {meta.expected_rows}")
    n_heads = len(meta.head_columns)
    heads = np.zeros((n, 0), np.float32) if heads is None and not n_heads else np.asarray(heads, dtype=np.float32)
    if heads.shape != (n, n_heads):
        raise GridError(f"slide {meta.slide_id}: head values of shape {heads.shape}, expected ({n}, {n_heads}) "
                        f"for head columns {list(meta.head_columns)}")
    if any(len(a) != n for a in (col, x, y, tissue, transform)):
        raise GridError(f"slide {meta.slide_id}: columns of different lengths")
    row = np.asarray(row, dtype=np.int32)
    col = np.asarray(col, dtype=np.int32)
    for k in meta.transforms:
        sel = transform == k
        h, w = meta.shape(k)
        if sel.sum() != meta.tiles:
            raise GridError(f"slide {meta.slide_id}: transform {k} has {int(sel.sum())} rows, expected {meta.tiles}")
        if n and (row[sel].min(initial=0) < 0 or row[sel].max(initial=0) >= h
                  or col[sel].min(initial=0) < 0 or col[sel].max(initial=0) >= w):
            raise GridError(f"slide {meta.slide_id}: tile positions outside its {h} x {w} grid (transform {k})")
        cells = row[sel].astype(np.int64) * w + col[sel]
        if len(np.unique(cells)) != len(cells):
            raise GridError(f"slide {meta.slide_id}: duplicate tile positions under transform {k}")
    order = np.lexsort((col, row, transform))
    emb16 = np.ascontiguousarray(embedding[order], dtype=np.float16)
    schema = tile_schema(meta.embedding_dim, meta.head_columns)
    columns = [
        pa.array(np.full(n, meta.slide_id, dtype=object), pa.string()),
        pa.array(row[order]),
        pa.array(col[order]),
        pa.array(np.asarray(x, dtype=np.int64)[order]),
        pa.array(np.asarray(y, dtype=np.int64)[order]),
        pa.array(np.asarray(tissue, dtype=np.float32)[order]),
        pa.FixedSizeListArray.from_arrays(pa.array(emb16.reshape(-1)), meta.embedding_dim),
        pa.array(transform[order]),
    ] + [pa.array(np.ascontiguousarray(heads[order, j])) for j in range(n_heads)]
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(meta.to_metadata()))


def write_slide_grid(grids_dir: str | Path, table: pa.Table, meta: GridMeta) -> Path:
    """Write a table from grid_table() as the slide's grid file, atomically; returns its path.

    One row group per transform, so reading one transform touches only its own bytes."""
    target = slide_file(grids_dir, meta.slide_id)
    staging = staging_dir(grids_dir)
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f"{meta.slide_id}.{uuid.uuid4().hex[:8]}.parquet.tmp"
    try:
        pq.write_table(table, tmp, row_group_size=max(1, meta.tiles), compression="zstd")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    except Exception as exc:
        if is_no_space(exc):  # name the grid, not its temporary
            raise NoSpaceError(target) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def remove_slide_grid(grids_dir: str | Path, slide_id: str) -> bool:
    """Delete a slide's grid (a stale or now-invalid one), so the store holds only what the manifest
    calls complete. Returns whether anything was removed."""
    folder = slide_dir(grids_dir, slide_id)
    if not folder.exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def clean_staging(grids_dir: str | Path) -> int:
    """Remove temporaries of a killed run; returns how many were removed."""
    folder = staging_dir(grids_dir)
    removed = 0
    if folder.exists():
        for tmp in folder.iterdir():
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed
