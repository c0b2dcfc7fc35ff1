"""Reading feature grids back: one slide as a dense (C, H, W) array, the list of slides, the manifest.

Plain pyarrow only (no Ray), so training code, notebooks and other tools read grids the same way.
Every function takes a folder or an object-store URI of a grid store (fetched through nic.storage).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from nic.grids.dihedral import check_transform
from nic.grids.schema import PART_NAME, GridError, GridMeta, manifest_path, slide_file, tiles_dir
from nic.storage import display, ensure_local, local_path, remote_files, remote_kind, written_here


def list_slides(grids_dir: str | Path) -> list[str]:
    """Ids of the slides that have a complete grid in `grids_dir`, sorted.

    Grid files only appear once complete (see writer), so the folder listing is the truth; the
    manifest says in addition why the other slides have none. On an object store that is a listing
    of the bucket (nothing is downloaded), plus grids written on this node and not uploaded yet."""
    grids_dir = local_path(grids_dir)
    listing = remote_files(tiles_dir(grids_dir))
    if listing is not None:
        ids = {rel.split("/")[0].split("=", 1)[1] for rel in listing
               if rel.startswith("slide_id=") and rel.endswith(f"/{PART_NAME}") and rel.count("/") == 1}
        ids.update(p.parent.name.split("=", 1)[1] for p in tiles_dir(grids_dir).glob(f"slide_id=*/{PART_NAME}")
                   if written_here(p))
        if not ids and remote_kind(grids_dir) == "missing" and not grids_dir.exists():
            raise GridError(f"{display(grids_dir)}: no such grid folder")
        return sorted(ids)
    root = tiles_dir(grids_dir)
    if not grids_dir.exists():
        raise GridError(f"{display(grids_dir)}: no such grid folder")
    if not root.exists():
        return []
    return sorted(
        p.parent.name.split("=", 1)[1]
        for p in root.glob(f"slide_id=*/{PART_NAME}")
    )


def _grid_path(grids_dir: str | Path, slide_id: str, fetch: bool = True) -> Path:
    grids_dir = local_path(grids_dir)
    path = slide_file(grids_dir, slide_id)
    if fetch or not path.exists():  # a copy dropped from a full mirror is fetched again
        ensure_local(path, missing_ok=True)
    if not path.exists():
        known = list_slides(grids_dir)
        hint = f" (it holds {len(known)} slides, e.g. {', '.join(known[:3])})" if known else " (it holds none)"
        raise GridError(f"{display(path)}: slide {slide_id!r} has no grid in {display(grids_dir)}{hint}")
    return path


def read_grid_meta(grids_dir: str | Path, slide_id: str, fetch: bool = True) -> GridMeta:
    """The metadata of one slide's grid file (shape, tile px, um/px, encoder, transforms).
    `fetch=False` skips the object-store check (for a store already fetched as a whole)."""
    path = _grid_path(grids_dir, slide_id, fetch)
    return read_file_meta(path)


def read_file_meta(path: str | Path) -> GridMeta:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise GridError(f"{path}: not a readable Parquet file: {exc}") from None
    return GridMeta.from_metadata(schema.metadata, path)


def verify_grid_file(path: str | Path) -> GridMeta:
    """GridMeta of a grid file whose row count matches what its metadata promises, else GridError.

    This is the check resume relies on: a file is complete when it has tiles x transforms rows."""
    meta = read_file_meta(path)
    try:
        num_rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise GridError(f"{path}: not a readable Parquet file: {exc}") from None
    if num_rows != meta.expected_rows:
        raise GridError(f"{path}: {num_rows} rows, but its metadata promises {meta.tiles} tiles x "
                        f"{len(meta.transforms)} transforms")
    if meta.head_columns:
        missing = [c for c in meta.head_columns if c not in pq.read_schema(path).names]
        if missing:
            raise GridError(f"{path}: head columns {missing} named in its metadata are missing")
    return meta


def load_grid(grids_dir: str | Path, slide_id: str, transform: int = 0,
              fetch: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(grid, mask) of one slide: float32 (C, H, W) with zeros off tissue, and the bool (H, W) tissue
    mask (True where a tile was encoded). `transform` (0-7, see nic.grids.dihedral) selects one of
    the 8 rotations/flips when the slide was compressed with them. On an object store the file is
    fetched when it changed; `fetch=False` skips that check (for a store already fetched as a whole)."""
    transform = check_transform(transform)
    path = _grid_path(grids_dir, slide_id, fetch)
    meta = read_file_meta(path)
    if transform not in meta.transforms:
        raise GridError(f"{path}: transform {transform} was not written (it holds {list(meta.transforms)}; "
                        "compress with dihedral: true to get all 8)")
    try:
        table = pq.read_table(path, columns=["row", "col", "embedding"], filters=[("transform", "=", transform)])
    except (OSError, pa.ArrowException) as exc:
        raise GridError(f"{path}: cannot read grid rows: {exc}") from None
    if table.num_rows != meta.tiles:  # never a grid with tiles silently missing
        raise GridError(f"{path}: {table.num_rows} rows of transform {transform}, but its metadata promises "
                        f"{meta.tiles} tiles (a damaged or replaced grid file; re-run nic compress)")
    h, w = meta.shape(transform)
    c = meta.embedding_dim
    grid = np.zeros((c, h, w), dtype=np.float32)
    mask = np.zeros((h, w), dtype=bool)
    if table.num_rows:
        rows = table.column("row").to_numpy()
        cols = table.column("col").to_numpy()
        emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        emb = emb.reshape(table.num_rows, c).astype(np.float32)
        if rows.min() < 0 or rows.max() >= h or cols.min() < 0 or cols.max() >= w:
            raise GridError(f"{path}: tile positions outside the {h} x {w} grid its metadata declares")
        grid[:, rows, cols] = emb.T
        mask[rows, cols] = True
    return grid, mask


def verify_store(grids_dir: str | Path, slide_ids: list[str], fetch: bool = True) -> dict[str, GridMeta]:
    """The GridMeta of each slide's grid after checking that the file is complete (`verify_grid_file`)
    and agrees with the store's manifest: the same tile count and encoder as the slide's row, and
    not a slide the manifest calls failed. Else GridError naming the file and the disagreement (a
    grid replaced after the manifest was written, or a compression still under way). Slides the
    manifest does not list (grids of an earlier run's other inputs) are checked on their own."""
    try:
        frame = read_manifest(grids_dir)
        rows = {r["slide_id"]: r for r in frame.to_dict(orient="records")}
        where = display(manifest_path(local_path(grids_dir)))
    except GridError:
        rows, where = {}, ""
    metas = {}
    for slide_id in slide_ids:
        path = _grid_path(grids_dir, slide_id, fetch)
        meta = verify_grid_file(path)
        row = rows.get(slide_id)
        if row is not None:
            fix = f"; re-run nic compress --out {display(local_path(grids_dir))} to make them agree"
            tiles = row.get("tiles")
            if row.get("status") == "failed":
                raise GridError(f"{display(path)}: the manifest {where} says slide {slide_id} failed "
                                f"({row.get('reason')}), yet this grid file exists{fix}")
            if tiles is not None and tiles == tiles and int(tiles) != meta.tiles:
                raise GridError(f"{display(path)}: {meta.tiles} tiles, but the manifest {where} says slide "
                                f"{slide_id} has {int(tiles)}{fix}")
            if row.get("encoder_hash") and row["encoder_hash"] != meta.encoder_hash:
                raise GridError(f"{display(path)}: made by encoder {meta.encoder_hash[:12]}, but the manifest "
                                f"{where} says {row['encoder_hash'][:12]}{fix}")
        metas[slide_id] = meta
    return metas


def open_dataset(grids_dir: str | Path) -> ds.Dataset:
    """All grid files of a store as one pyarrow dataset (slide_id is the hive partition)."""
    root = ensure_local(tiles_dir(local_path(grids_dir)), missing_ok=True)
    if not root.exists():
        raise GridError(f"{display(grids_dir)}: no tiles/ folder, so no grids yet")
    return ds.dataset(root, format="parquet", partitioning="hive")


def read_manifest(grids_dir: str | Path) -> pd.DataFrame:
    """The manifest (slides.parquet): one row per input slide with status, reason, shape, tiles,
    seconds and encoder hash."""
    path = ensure_local(manifest_path(local_path(grids_dir)), missing_ok=True)
    if not path.exists():
        raise GridError(f"{display(path)}: no manifest; run `nic compress --out {display(grids_dir)}` first")
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise GridError(f"{path}: not a readable manifest: {exc}") from None
