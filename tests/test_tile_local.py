"""`nic tile` without Ray (an embedded run): local worker processes give the Ray path's files and
rows, and a slide that kills its worker costs only itself."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nic.cli.main import main
from nic.tiling.local import local_workers, run_local


def _echo(item: dict, tag: str) -> dict:
    return {"slide_id": item["slide_id"], "tag": tag, "pid": os.getpid()}


def _die_on(item: dict, doomed: str, marker_dir: str) -> dict:
    """Kills its own process (as a segfault in a slide library would) for the doomed slide; leaves
    one marker file per attempt so the test can count them."""
    if item["slide_id"] == doomed:
        Path(marker_dir, f"attempt-{os.getpid()}").touch()
        os._exit(139)
    return {"slide_id": item["slide_id"], "pid": os.getpid()}


def test_every_item_gets_its_row_from_the_workers():
    rows: list[dict] = []
    lost = run_local([{"slide_id": str(i)} for i in range(7)], _echo, ("x",), 3, rows.append)
    assert lost == []
    assert sorted(r["slide_id"] for r in rows) == [str(i) for i in range(7)]
    assert {r["tag"] for r in rows} == {"x"}
    assert os.getpid() not in {r["pid"] for r in rows}, "the work runs in child processes"
    assert len({r["pid"] for r in rows}) <= 3


def test_a_slide_that_kills_its_worker_is_retried_then_lost_and_the_others_finish(tmp_path):
    rows: list[dict] = []
    items = [{"slide_id": sid} for sid in ("a", "b", "doomed", "c", "d", "e")]
    lost = run_local(items, _die_on, ("doomed", str(tmp_path)), 2, rows.append, max_retries=2)
    assert lost == [{"slide_id": "doomed"}]
    assert sorted(r["slide_id"] for r in rows) == ["a", "b", "c", "d", "e"]
    assert len(list(tmp_path.glob("attempt-*"))) == 3, "the first attempt and two retries, each on a fresh worker"


def test_worker_count_follows_the_cpus_asked_for_and_the_slides():
    assert local_workers(3, 10) == 3
    assert local_workers(8, 2) == 2
    assert local_workers(None, 1) == 1
    assert 1 <= local_workers(None, 1000) <= (os.cpu_count() or 1)


def _rows(out: Path) -> dict[str, dict]:
    return {r["slide_id"]: r for r in pq.read_table(out / "slides.parquet").to_pylist()}


def test_an_embedded_tile_run_uses_no_ray_and_reports_every_slide(shared_slides, tmp_path, monkeypatch):
    """Without an address nic tile starts no Ray (this test is collected as Ray-free, where
    ray.init refuses): the good slide is tiled, each bad one gets its own failed row."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "o"
    assert main(["tile", "--slides", str(shared_slides), "--out", str(out), "--thumbnail-px", "200"]) == 0
    rows = _rows(out)
    assert rows["small_HE"]["status"] == "ok" and (rows["small_HE"]["rows"], rows["small_HE"]["cols"]) == (23, 17)
    assert {sid: rows[sid]["error_kind"] for sid in ("small", "unreadable", "unopenable", "boxes")} == {
        "small": "too_small", "unreadable": "unreadable", "unopenable": "unopenable", "boxes": "bad_mpp"}
    tiles = pq.read_table(out / "tiles" / "small_HE.parquet")
    assert tiles.num_rows == rows["small_HE"]["tiles"] > 20
    assert max(Image.open(out / "thumbnails" / "small_HE.png").size) == 200
    # a re-run skips the finished slide and redoes nothing
    assert main(["tile", "--slides", str(shared_slides), "--out", str(out), "--thumbnail-px", "200"]) == 0
    assert _rows(out)["small_HE"]["status"] == "skipped"


@pytest.fixture()
def two_copies(real_slide, tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("one", "two"):
        (folder / f"{name}.svs").symlink_to(real_slide)
    return folder


def test_local_and_in_process_tiling_write_the_same_files(two_copies, tmp_path, monkeypatch):
    """The local workers write what tile_one_slide writes in this process (the function every
    path, Ray's too, runs per slide): the same tile files byte for byte, the same overview pixels."""
    from nic.config.tile import TileConfig
    from nic.tiling.stage import options_hash_of
    from nic.tiling.worker import tile_one_slide

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "local"
    assert main(["tile", "--slides", str(two_copies), "--out", str(out), "--num-cpus", "2"]) == 0
    config = TileConfig(slides=[str(two_copies)], out=tmp_path / "direct")
    for sid in ("one", "two"):
        row = tile_one_slide({"slide_id": sid, "path": str(two_copies / f"{sid}.svs")}, config.slide,
                             config.out, config.thumbnail_px, options_hash_of(config))
        # (the stage notes in `reason` that "two" is the same file as "one")
        local = {k: v for k, v in _rows(out)[sid].items() if k not in ("seconds", "reason")}
        assert local == {k: v for k, v in row.items() if k not in ("seconds", "reason")}
        assert (out / "tiles" / f"{sid}.parquet").read_bytes() == (config.out / "tiles" / f"{sid}.parquet").read_bytes()
        np.testing.assert_array_equal(np.asarray(Image.open(out / "thumbnails" / f"{sid}.png")),
                                      np.asarray(Image.open(config.out / "thumbnails" / f"{sid}.png")))
