"""`nic tile` end to end on the real fixtures plus every kind of bad input, on a real local Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from nic.cli.main import main

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture()
def bad_inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.svs").write_bytes(b"")
    (folder / "text.svs").write_text("this is not a slide\n")
    (folder / "x.svs").mkdir()
    return folder


def manifest(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "slides.parquet").to_pylist()
    ids = [r["slide_id"] for r in rows]
    assert len(ids) == len(set(ids)), "every input exactly once"
    return {r["slide_id"]: r for r in rows}


def test_tile_real_and_bad_slides(shared_slides, bad_inputs, tmp_path):
    out = tmp_path / "tiles-out"
    args = ["tile", "--slides", str(shared_slides), str(bad_inputs), str(tmp_path / "missing.svs"),
            "--out", str(out), "--thumbnail-px", "256"]
    assert main(args) == 0

    rows = manifest(out)
    assert set(rows) == {"small_HE", "small", "unreadable", "unopenable", "boxes",
                         "empty", "text", "x", "missing"}
    good = rows["small_HE"]
    assert good["status"] == "ok" and good["reason"] == ""
    # 2220 px wide, 2967 px tall at 0.499 um/px, in 128 px tiles at 0.5 um/px (128.26 level-0 px each)
    assert (good["rows"], good["cols"]) == (23, 17)
    assert 20 < good["tiles"] < 17 * 23
    assert abs(good["mpp"] - 0.5) < 1e-9 and abs(good["base_mpp"] - 0.499) < 1e-3 and good["level"] == 0

    expected_kind = {"small": "too_small", "unreadable": "unreadable", "unopenable": "unopenable",
                     "boxes": "bad_mpp", "empty": "empty", "x": "directory", "missing": "input"}
    for sid, kind in expected_kind.items():
        row = rows[sid]
        assert row["status"] == "failed", sid
        assert row["error_kind"] == kind, (sid, row["reason"])
        assert Path(row["path"]).name in row["reason"], "the reason names the file"
    assert rows["text"]["status"] == "failed" and rows["text"]["reason"]
    assert "352.8" in rows["boxes"]["reason"] and "assume_mpp" in rows["boxes"]["reason"]

    tiles = pq.read_table(out / "tiles" / "small_HE.parquet")
    assert tiles.num_rows == good["tiles"]
    assert tiles.schema.field("row").type == "int32" and tiles.schema.field("x").type == "int64"
    assert min(tiles.column("tissue").to_pylist()) >= 0.5
    thumb = Image.open(out / "thumbnails" / "small_HE.png")
    assert max(thumb.size) == 256
    assert not (out / "tiles" / "boxes.parquet").exists()

    # strict turns any failure into a non-zero exit; the good slide is now skipped, not redone
    assert main(args + ["--strict"]) == 1
    rows = manifest(out)
    assert rows["small_HE"]["status"] == "skipped" and rows["small_HE"]["tiles"] == good["tiles"]


def test_assume_mpp_rescues_a_slide_without_usable_resolution(shared_slides, tmp_path):
    out = tmp_path / "o"
    code = main(["tile", "--slides", str(shared_slides / "boxes.tiff"), "--out", str(out),
                 "--set", "slide.assume_mpp=0.25", "--set", "slide.tile_px=32",
                 "--set", "slide.tissue.threshold=0.0"])
    row = manifest(out)["boxes"]
    assert code == 0, row["reason"]
    assert row["status"] == "ok" and row["mpp_source"] == "assumed" and row["base_mpp"] == 0.25


def test_nothing_succeeded_exits_non_zero(shared_slides, tmp_path):
    assert main(["tile", "--slides", str(shared_slides / "unopenable.tiff"), "--out", str(tmp_path / "o")]) == 1


def test_rerun_redoes_incomplete_or_changed_outputs(real_slide, tmp_path):
    out = tmp_path / "o"
    base = ["tile", "--slides", str(real_slide), "--out", str(out), "--thumbnail-px", "128"]
    assert main(base) == 0
    first = manifest(out)["small_HE"]

    # a stale temporary from a killed run is cleaned and never counts as output
    stale = out / "tiles" / ".small_HE.parquet.deadbeef.tmp"
    stale.write_bytes(b"partial")
    # a tile file without its overview (killed between the two writes) is redone
    (out / "thumbnails" / "small_HE.png").unlink()
    assert main(base) == 0
    assert manifest(out)["small_HE"]["status"] == "ok"
    assert not stale.exists()

    # changed options redo the slide; same options skip it
    assert main(base + ["--set", "slide.tissue.threshold=0.9"]) == 0
    redone = manifest(out)["small_HE"]
    assert redone["status"] == "ok" and redone["tiles"] < first["tiles"]
    assert main(base + ["--set", "slide.tissue.threshold=0.9"]) == 0
    assert manifest(out)["small_HE"]["status"] == "skipped"
    assert main(base + ["--set", "slide.tissue.threshold=0.9", "--overwrite"]) == 0
    assert manifest(out)["small_HE"]["status"] == "ok"
