"""The grid format on its own (no Ray): write, read back, metadata, dihedral geometry, readers, picture."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nic.grids import (
    GridError,
    GridMeta,
    grid_shape,
    list_slides,
    load_grid,
    read_grid_meta,
    transform_image,
    transform_positions,
    verify_grid_file,
)
from nic.grids.schema import slide_file, staging_dir
from nic.grids.writer import clean_staging, grid_table, write_slide_grid

C = 5


def make_meta(slide_id: str, rows: int, cols: int, tiles: int, transforms=(0,), path: str = "") -> GridMeta:
    return GridMeta(slide_id=slide_id, path=path, rows=rows, cols=cols, tile_px=128, mpp=0.5, level=0,
                    tiles=tiles, embedding_dim=C, encoder_name="test", encoder_hash="abc123",
                    transforms=tuple(transforms), base_mpp=0.25, options_hash="opt")


def write_random_slide(grids: Path, slide_id: str, rows=4, cols=6, seed=0, path: str = ""):
    """A slide with tissue in a random subset of cells and known per-cell embeddings."""
    rng = np.random.default_rng(seed)
    keep = rng.random((rows, cols)) < 0.6
    keep[0, 0] = True
    r, c = np.nonzero(keep)
    emb = rng.normal(size=(len(r), C)).astype(np.float16)
    meta = make_meta(slide_id, rows, cols, len(r), path=path)
    # rows given in a scrambled order: the writer sorts them
    perm = rng.permutation(len(r))
    table = grid_table(meta, r[perm], c[perm], c[perm] * 256, r[perm] * 256, np.full(len(r), 0.9)[perm], emb[perm])
    write_slide_grid(grids, table, meta)
    return keep, r, c, emb


def test_roundtrip_dense_grid_and_metadata(tmp_path):
    grids = tmp_path / "grids"
    keep, r, c, emb = write_random_slide(grids, "s1")
    grid, mask = load_grid(grids, "s1")
    assert grid.dtype == np.float32 and grid.shape == (C, 4, 6)
    assert mask.dtype == bool and (mask == keep).all()
    np.testing.assert_array_equal(grid[:, r, c].T, emb.astype(np.float32))
    assert (grid[:, ~mask] == 0).all()

    table = pq.read_table(slide_file(grids, "s1"))
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[5]"
    assert [f.name for f in table.schema][:7] == ["slide_id", "row", "col", "x", "y", "tissue", "embedding"]
    assert table.schema.field("row").type == "int32" and table.schema.field("x").type == "int64"
    raw = table.schema.metadata
    assert raw[b"nic.rows"] == b"4" and raw[b"nic.cols"] == b"6" and raw[b"nic.encoder_hash"] == b'"abc123"'
    meta = read_grid_meta(grids, "s1")
    assert (meta.rows, meta.cols, meta.tile_px, meta.mpp, meta.tiles) == (4, 6, 128, 0.5, int(keep.sum()))
    assert verify_grid_file(slide_file(grids, "s1")) == meta
    assert list_slides(grids) == ["s1"]


def test_writer_refuses_inconsistent_rows(tmp_path):
    meta = make_meta("s", 2, 2, 2)
    emb = np.zeros((2, C), np.float16)
    with pytest.raises(GridError, match="duplicate tile positions"):
        grid_table(meta, [0, 0], [1, 1], [0, 0], [0, 0], [1, 1], emb)
    with pytest.raises(GridError, match="outside its 2 x 2 grid"):
        grid_table(meta, [0, 2], [0, 0], [0, 0], [0, 0], [1, 1], emb)
    with pytest.raises(GridError, match="expected 2 tiles"):
        grid_table(meta, [0], [0], [0], [0], [1], emb[:1])
    with pytest.raises(GridError, match="cannot name a grid partition"):
        slide_file(tmp_path, "a/b")


def test_stale_temporary_is_never_a_grid(tmp_path):
    grids = tmp_path / "grids"
    write_random_slide(grids, "s1")
    staging_dir(grids).mkdir(parents=True, exist_ok=True)
    (staging_dir(grids) / "s2.1234abcd.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert list_slides(grids) == ["s1"]
    with pytest.raises(GridError, match="s2"):
        load_grid(grids, "s2")
    assert clean_staging(grids) == 1 and not any(staging_dir(grids).iterdir())


def test_truncated_grid_file_is_reported_with_its_name(tmp_path):
    grids = tmp_path / "grids"
    write_random_slide(grids, "s1")
    path = slide_file(grids, "s1")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GridError, match="part-0.parquet"):
        verify_grid_file(path)
    other = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), other)
    with pytest.raises(GridError, match="not a nic grid file"):
        verify_grid_file(other)


def test_dihedral_positions_follow_numpy_rotations():
    for h, w in [(3, 5), (4, 4), (1, 7)]:
        cells = np.arange(h * w).reshape(h, w)
        r, c = np.divmod(np.arange(h * w), w)
        for k in range(8):
            moved = transform_image(cells, k)
            r2, c2 = transform_positions(r, c, (h, w), k)
            assert moved.shape == grid_shape(h, w, k)
            np.testing.assert_array_equal(moved[r2, c2], cells[r, c])
    # the 8 transforms are distinct on an asymmetric image
    img = np.arange(12).reshape(3, 4)
    assert len({transform_image(img, k).tobytes() + bytes(transform_image(img, k).shape) for k in range(8)}) == 8


def test_all_transforms_in_one_file(tmp_path):
    grids = tmp_path / "grids"
    rows, cols = 3, 5
    r, c = np.array([0, 1, 2, 2]), np.array([0, 4, 1, 3])
    base = np.arange(len(r) * C, dtype=np.float16).reshape(len(r), C)
    parts = []
    for k in range(8):
        rk, ck = transform_positions(r, c, (rows, cols), k)
        parts.append((rk, ck, base + k, np.full(len(r), k)))
    cat = [np.concatenate(p) for p in zip(*parts)]
    meta = make_meta("d", rows, cols, len(r), transforms=range(8))
    write_slide_grid(grids, grid_table(meta, cat[0], cat[1], cat[1], cat[0], np.ones(len(cat[0])), cat[2], cat[3]),
                     meta)
    ident, mask0 = load_grid(grids, "d", 0)
    for k in range(8):
        grid, mask = load_grid(grids, "d", k)
        assert grid.shape == (C, *grid_shape(rows, cols, k))
        # grid k is the identity grid moved by transform k (plus k, to tell them apart)
        np.testing.assert_array_equal(mask, transform_image(mask0, k))
        np.testing.assert_array_equal(grid[:, mask] - k, transform_image(ident, k, axes=(1, 2))[:, mask])
    with pytest.raises(ValueError, match="0-7"):
        load_grid(grids, "d", 8)
    write_random_slide(grids, "plain")
    with pytest.raises(GridError, match="dihedral"):
        load_grid(grids, "plain", 3)


READERS = textwrap.dedent(
    """
    import sys, json
    import duckdb, polars as pl, pyarrow.dataset as ds, pyarrow.parquet as pq
    root = sys.argv[1]
    out = {}
    t = ds.dataset(root + "/tiles", format="parquet", partitioning="hive").to_table()
    out["pyarrow"] = sorted(set(t.column("slide_id").to_pylist())), t.num_rows
    out["pyarrow_meta"] = pq.read_schema(root + "/tiles/slide_id=s1/part-0.parquet").metadata[b"nic.rows"].decode()
    con = duckdb.connect()
    n, c0 = con.execute(
        f"select count(*), sum(embedding[1]) from read_parquet('{root}/tiles/*/*.parquet', hive_partitioning=true)"
        " where slide_id = 's1'").fetchone()
    out["duckdb"] = n, float(c0)
    kv = con.execute(f"select value from parquet_kv_metadata('{root}/tiles/slide_id=s2/part-0.parquet')"
                     " where key = 'nic.cols'").fetchone()[0]
    out["duckdb_meta"] = kv.decode() if isinstance(kv, bytes) else kv
    df = pl.scan_parquet(root + "/tiles/**/*.parquet", hive_partitioning=True).filter(pl.col("slide_id") == "s2").collect()
    out["polars"] = df.height, str(df.schema["embedding"])
    out["manifest"] = pl.read_parquet(root + "/slides.parquet").height
    out["ray_imported"] = "ray" in sys.modules
    print(json.dumps(out))
    """
)


def test_plain_pyarrow_duckdb_polars_read_the_store_without_ray(tmp_path):
    import json

    grids = tmp_path / "grids"
    keep1, _, _, emb1 = write_random_slide(grids, "s1", seed=1)
    keep2, *_ = write_random_slide(grids, "s2", rows=5, cols=3, seed=2)
    (staging_dir(grids)).mkdir(exist_ok=True)
    (staging_dir(grids) / "s3.deadbeef.parquet.tmp").write_bytes(b"junk")
    pq.write_table(pa.table({"slide_id": ["s1", "s2"], "status": ["ok", "ok"]}), grids / "slides.parquet")
    script = tmp_path / "readers.py"
    script.write_text(READERS)
    proc = subprocess.run([sys.executable, str(script), str(grids)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["pyarrow"] == [["s1", "s2"], int(keep1.sum() + keep2.sum())]
    assert got["pyarrow_meta"] == "4"
    assert got["duckdb"][0] == int(keep1.sum())
    assert got["duckdb"][1] == pytest.approx(float(emb1[:, 0].astype(np.float64).sum()), rel=1e-3)
    assert got["duckdb_meta"] == "3"
    assert got["polars"] == [int(keep2.sum()), "Array(Float16, shape=(5,))"]
    assert got["manifest"] == 2
    assert got["ray_imported"] is False


def test_show_draws_thumbnail_beside_pca_grid(tmp_path):
    from PIL import Image

    from nic.cli.main import main
    from slide_factory import write_tiled_tiff

    image = np.full((512, 768, 3), 255, np.uint8)
    image[:256, :384] = (200, 40, 40)
    image[256:, 384:] = (40, 40, 200)
    slide = write_tiled_tiff(tmp_path / "s.tiff", image, mpp=0.5, tile=128, levels=1)
    grids = tmp_path / "grids"
    r, c = np.array([0, 0, 1, 1, 2, 3]), np.array([0, 1, 2, 3, 4, 5])
    emb = np.zeros((6, C), np.float16)
    emb[:3, 0], emb[3:, 1] = 1, 2
    meta = make_meta("s", 4, 6, 6, path=str(slide))
    write_slide_grid(grids, grid_table(meta, r, c, c * 128, r * 128, np.ones(6), emb), meta)
    out = tmp_path / "pic.png"
    assert main(["grids", "show", "--grids", str(grids), "--slide", "s", "--out", str(out)]) == 0
    pic = Image.open(out)
    assert pic.size[0] > pic.size[1] >= 300  # two panels side by side
    assert main(["grids", "show", "--grids", str(grids), "--slide", "nope", "--out", str(out)]) == 2
    assert main(["grids", "ls", "--grids", str(grids)]) == 2  # no manifest yet: a clear error


def test_pca_rgb_colours_tissue_and_whitens_background():
    from nic.grids.show import pca_rgb

    grid = np.zeros((C, 2, 3), np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    grid[0, 0, 0], grid[1, 0, 1], grid[2, 1, 0] = 5, 5, 5
    image = pca_rgb(grid, mask)
    assert image.shape == (2, 3, 3) and (image[~mask] == 1).all()
    assert image.min() >= 0 and image.max() <= 1
    assert len({tuple(np.round(image[i, j], 3)) for i, j in zip(*np.nonzero(mask))}) == 3
