"""`nic compress` end to end on the shared local Ray: geometry, bad input, resume, manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from compress_support import (
    L_CELLS,
    colour_image,
    compress_args,
    manifest_rows,
    tile_colour,
    write_slide,
)
from nic.cli.main import main
from nic.grids import list_slides, load_grid, read_grid_meta
from nic.grids.schema import slide_file

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def colour_slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("colour")
    return write_slide(folder / "colours.tiff", colour_image())


def test_mean_rgb_puts_each_tiles_colour_at_its_row_and_col(colour_slide, tmp_path):
    out = tmp_path / "grids"
    assert main(compress_args([colour_slide], out)) == 0
    row = manifest_rows(out)["colours"]
    assert row["status"] == "ok" and row["reason"] == ""
    assert (row["rows"], row["cols"], row["tiles"], row["embedding_dim"]) == (8, 12, len(L_CELLS), 3)
    assert row["encoder_name"] == "mean-rgb" and row["encoder_hash"] and row["seconds"] > 0

    grid, mask = load_grid(out, "colours")
    assert grid.shape == (3, 8, 12) and grid.dtype == np.float32
    expected = np.zeros((8, 12), bool)
    for r, c in L_CELLS:
        expected[r, c] = True
        # mean-rgb scales colours to [-1, 1] like every encoder's input; stored as float16
        np.testing.assert_allclose(grid[:, r, c], np.array(tile_colour(r, c)) / 127.5 - 1, atol=2e-3)
    np.testing.assert_array_equal(mask, expected)
    assert (grid[:, ~mask] == 0).all()

    # level-0 corners and tissue fractions are stored with every row
    table = pq.read_table(slide_file(out, "colours")).to_pandas()
    assert ((table.x == table.col * 128) & (table.y == table.row * 128)).all()
    assert (table["tissue"] >= 0.5).all() and (table["transform"] == 0).all()
    meta = read_grid_meta(out, "colours")
    assert (meta.tile_px, meta.mpp, meta.tiles, meta.transforms) == (128, 0.5, len(L_CELLS), (0,))


def _corrupt_level0_tiles(src: Path, dst: Path) -> None:
    """Zero the compressed bytes of every level-0 tile, leaving the coarser levels (read for
    tissue detection) intact: planning succeeds, reading tiles in the actor fails."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    with open(dst, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset)
            fh.write(b"\x00" * count)


def test_real_fixtures_and_bad_slides_each_get_one_honest_row(shared_slides, colour_slide, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = colour_slide.read_bytes()
    (bad / "truncated.tiff").write_bytes(data[: len(data) // 3])
    write_slide(bad / "white.tiff", np.full((512, 512, 3), 255, np.uint8), levels=1)
    _corrupt_level0_tiles(colour_slide, bad / "corrupt.tiff")
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(colour_slide, good / "colours.tiff")
    out = tmp_path / "grids"
    args = compress_args([shared_slides, bad, good, tmp_path / "missing.svs"], out)
    assert main(args) == 0  # some slides succeeded; failures are recorded, not fatal

    rows = manifest_rows(out)
    assert set(rows) == {"small_HE", "small", "unreadable", "unopenable", "boxes", "truncated", "white",
                         "corrupt", "colours", "missing"}
    assert rows["small_HE"]["status"] == "ok" and rows["small_HE"]["tiles"] > 20
    assert rows["colours"]["status"] == "ok"
    expected_kind = {"small": "too_small", "unreadable": "unreadable", "unopenable": "unopenable",
                     "boxes": "bad_mpp", "white": "no_tissue", "corrupt": "unreadable", "missing": "input"}
    for sid, kind in expected_kind.items():
        assert rows[sid]["status"] == "failed", (sid, rows[sid])
        assert rows[sid]["error_kind"] == kind, (sid, rows[sid]["reason"])
    for sid, r in rows.items():
        if r["status"] == "failed":
            assert Path(r["path"]).name in r["reason"], f"{sid}: the reason names the file: {r['reason']}"
            assert not slide_file(out, sid).exists()
    assert rows["truncated"]["status"] == "failed" and rows["truncated"]["error_kind"] in (
        "unopenable", "unreadable", "not_a_slide")
    assert list_slides(out) == ["colours", "small_HE"]
    assert main(["grids", "ls", "--grids", str(out)]) == 0
    picture = tmp_path / "small_HE.png"
    assert main(["grids", "show", "--grids", str(out), "--slide", "small_HE", "--out", str(picture)]) == 0
    assert picture.stat().st_size > 10_000

    # strict: any failure makes the exit code non-zero; complete slides are skipped, not redone
    assert main(args + ["--strict"]) == 1
    rows = manifest_rows(out)
    assert rows["small_HE"]["status"] == "skipped" and rows["colours"]["status"] == "skipped"
    assert rows["corrupt"]["status"] == "failed"


def test_nothing_usable_exits_non_zero(shared_slides, tmp_path):
    out = tmp_path / "grids"
    assert main(compress_args([shared_slides / "small.svs", tmp_path / "nope.svs"], out)) == 1
    assert {r["status"] for r in manifest_rows(out).values()} == {"failed"}


def test_bad_config_is_a_clear_error(colour_slide, tmp_path, capsys):
    out = tmp_path / "grids"
    assert main(compress_args([colour_slide], out, "mean-rgb", "--set", "slide.tile_px=64")) == 2
    assert "slide.tile_px=128" in capsys.readouterr().err
    assert main(compress_args([colour_slide], out, str(tmp_path / "no-encoder"))) == 2
    assert "no-encoder" in capsys.readouterr().err
    assert main(compress_args([colour_slide], out, "mean-rgb", "--batch-size", "0")) == 2
