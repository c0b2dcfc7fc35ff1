"""One named per-tile value of a grid as an (H, W) map: a head-map column or an embedding channel.

This is what `nic grids show --channel NAME` draws. Names are a grid's head columns (`head:<task>`
or `head:<task>=<class>`, written by `nic compress --heads`) or `embedding:<i>`, the i-th number
of the embedding. Plain pyarrow, like the rest of nic.grids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nic.grids.dihedral import check_transform
from nic.grids.reader import _grid_path, load_grid, read_file_meta
from nic.grids.schema import GridError, GridMeta

EMBEDDING_PREFIX = "embedding:"


def channel_names(meta: GridMeta) -> list[str]:
    """Every name `load_channel` accepts for a grid: its head columns, then its embedding channels."""
    return list(meta.head_columns) + [f"{EMBEDDING_PREFIX}{i}" for i in range(meta.embedding_dim)]


def _describe(meta: GridMeta) -> str:
    heads = ", ".join(meta.head_columns) if meta.head_columns else "none (compress with --heads for head maps)"
    return f"head columns: {heads}; embedding channels: {EMBEDDING_PREFIX}0..{meta.embedding_dim - 1}"


def load_channel(grids_dir: str | Path, slide_id: str, name: str, transform: int = 0,
                 fetch: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(values, mask): float32 (H, W) with NaN off tissue, and the bool (H, W) tissue mask.
    GridError naming the grid and the names it has when `name` is not one of them."""
    transform = check_transform(transform)
    path = _grid_path(grids_dir, slide_id, fetch)
    meta = read_file_meta(path)
    if name.startswith(EMBEDDING_PREFIX):
        index = name[len(EMBEDDING_PREFIX):]
        if not index.isdigit() or int(index) >= meta.embedding_dim:
            raise GridError(f"{path}: no channel {name!r} ({_describe(meta)})")
        grid, mask = load_grid(grids_dir, slide_id, transform, fetch=False)
        return np.where(mask, grid[int(index)], np.nan).astype(np.float32), mask
    if name not in meta.head_columns:
        raise GridError(f"{path}: no channel {name!r} ({_describe(meta)})")
    if transform not in meta.transforms:
        raise GridError(f"{path}: transform {transform} was not written (it holds {list(meta.transforms)})")
    try:
        table = pq.read_table(path, columns=["row", "col", name], filters=[("transform", "=", transform)])
    except (OSError, pa.ArrowException) as exc:
        raise GridError(f"{path}: cannot read column {name!r}: {exc}") from None
    h, w = meta.shape(transform)
    values = np.full((h, w), np.nan, np.float32)
    mask = np.zeros((h, w), bool)
    rows, cols = table.column("row").to_numpy(), table.column("col").to_numpy()
    values[rows, cols] = table.column(name).to_numpy()
    mask[rows, cols] = True
    return values, mask
