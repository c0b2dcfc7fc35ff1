"""Every input accounted for when several inputs name one file (links, repeated paths, a folder plus
a glob): links under other names are slides of their own ids, repeats of a file under the same id
are `skipped` rows naming the row they repeat; `nic tile` and `nic compress` apply the same rule.
Real OpenSlide on the real fixture small_HE.svs, real Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nic.cli.main import main

pytestmark = pytest.mark.usefixtures("ray_session")


def _links(folder: Path, target: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"L{i:02d}.svs").symlink_to(target)
    return folder


def _rows(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "slides.parquet").to_pylist()
    assert len({r["slide_id"] for r in rows}) == len(rows)
    return {r["slide_id"]: r for r in rows}


def _check(rows: dict[str, dict], folder: Path, first_status: str) -> None:
    assert list(rows) == ["L00", "L01", "L02", "L00@3", "L01@4", "L02@5", "L00@6"]
    assert [rows[s]["status"] for s in ("L00", "L01", "L02")] == [first_status] * 3
    for sid in ("L01", "L02"):
        assert f"the same file as {folder / 'L00.svs'} (slide 'L00')" in rows[sid]["reason"]
    for sid, first in (("L00@3", "L00"), ("L01@4", "L01"), ("L02@5", "L02"), ("L00@6", "L00")):
        row = rows[sid]
        assert row["status"] == "skipped" and row["error_kind"] == "duplicate", row
        assert f"the same file as input {folder / (first + '.svs')}" in row["reason"]
        assert f"slide id '{first}'" in row["reason"] and "processed once" in row["reason"]


def test_tile_gives_every_input_a_row(real_slide, tmp_path, capsys):
    folder = _links(tmp_path / "links", real_slide, 3)
    out = tmp_path / "tiles-out"
    args = ["tile", "--slides", str(folder), str(folder / "*.svs"), str(folder / "L00.svs"), "--out", str(out),
            "--thumbnail-px", "128"]
    assert main(args) == 0
    rows = _rows(out)
    _check(rows, folder, "ok")
    assert "3 ok, 0 skipped (already complete), 0 failed, 4 duplicate input(s) skipped" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "tiles").iterdir()) == ["L00.parquet", "L01.parquet", "L02.parquet"]
    assert len({rows[s]["tiles"] for s in ("L00", "L01", "L02")}) == 1
    # re-run: the slides are complete, the repeats are still repeats
    assert main(args) == 0
    rows = _rows(out)
    _check(rows, folder, "skipped")
    assert rows["L01"]["reason"].startswith("already complete; the same file as")
    # a repeated input never counts as a success: one missing file named twice fails the run
    assert main(["tile", "--slides", str(tmp_path / "gone.svs"), str(tmp_path / "gone.svs"),
                 "--out", str(tmp_path / "gone-out")]) == 1
    gone = _rows(tmp_path / "gone-out")
    assert [(r["status"], r["error_kind"]) for r in gone.values()] == [("failed", "input"), ("skipped", "duplicate")]


def test_compress_gives_every_input_a_row(real_slide, tmp_path, capsys):
    folder = _links(tmp_path / "links", real_slide, 3)
    out = tmp_path / "grids"
    args = ["compress", "--slides", str(folder), str(folder / "*.svs"), str(folder / "L00.svs"),
            "--encoder", "mean-rgb", "--out", str(out), "--set", "batch_size=64"]
    assert main(args) == 0
    rows = _rows(out)
    _check(rows, folder, "ok")
    assert "4 duplicate input(s) skipped" in capsys.readouterr().err
    from nic.grids import list_slides

    assert list_slides(out) == ["L00", "L01", "L02"]
    assert main(["grids", "ls", "--grids", str(out)]) == 0
    assert "disagree" not in capsys.readouterr().out, "a duplicate row has no grid, and says so"
