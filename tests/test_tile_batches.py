"""`nic tile` on Ray (a cluster, or Ray already running): slides go out in batches per task; each
slide keeps its own row, a batch whose worker dies is split so only the crashing slide is lost, and
the files are those of the local path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import nic.tiling.stage as tile_stage
from nic.cli.main import main
from nic.tiling.stage import LOST_REASON, batch_size
from nic.tiling.worker import tile_slides

pytestmark = pytest.mark.usefixtures("ray_session")


def test_batch_size_keeps_about_four_tasks_per_cpu_and_at_most_16_slides():
    assert batch_size(1, 2) == 1
    assert batch_size(64, 2) == 8
    assert batch_size(10_000, 8) == 16
    assert batch_size(5, 0) == 1


@pytest.fixture()
def mixed(shared_slides, tmp_path) -> Path:
    """Five copies of the real slide with an unreadable and a too-small slide between them."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(5):
        (folder / f"he{i}.svs").symlink_to(shared_slides / "small_HE.svs")
    (folder / "he2x.svs").symlink_to(shared_slides / "unreadable.svs")
    (folder / "he3x.svs").symlink_to(shared_slides / "small.svs")
    return folder


def _rows(out: Path) -> dict[str, dict]:
    return {r["slide_id"]: r for r in pq.read_table(out / "slides.parquet").to_pylist()}


def test_a_failing_slide_in_a_batch_gets_its_own_row_and_the_files_match_the_local_path(
        mixed, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(tile_stage, "batch_size", lambda slides, cpus: 3)  # 7 slides: batches of 3, 3, 1
    ray_out = tmp_path / "ray"
    assert main(["tile", "--slides", str(mixed), "--out", str(ray_out), "--thumbnail-px", "160"]) == 0
    rows = _rows(ray_out)
    assert {sid: r["status"] for sid, r in rows.items()} == {
        **{f"he{i}": "ok" for i in range(5)}, "he2x": "failed", "he3x": "failed"}
    assert rows["he2x"]["error_kind"] == "unreadable" and rows["he3x"]["error_kind"] == "too_small"

    monkeypatch.setattr(tile_stage, "_use_ray", lambda config: False)
    local_out = tmp_path / "local"
    assert main(["tile", "--slides", str(mixed), "--out", str(local_out), "--thumbnail-px", "160"]) == 0
    local = _rows(local_out)
    for sid, row in rows.items():
        assert {k: v for k, v in row.items() if k != "seconds"} == \
            {k: v for k, v in local[sid].items() if k != "seconds"}
        if row["status"] == "ok":
            assert (ray_out / "tiles" / f"{sid}.parquet").read_bytes() == \
                (local_out / "tiles" / f"{sid}.parquet").read_bytes()
            np.testing.assert_array_equal(np.asarray(Image.open(ray_out / "thumbnails" / f"{sid}.png")),
                                          np.asarray(Image.open(local_out / "thumbnails" / f"{sid}.png")))


def _crash_on_doomed(items: list[dict], *args) -> list[dict]:
    """tile_slides, except that a slide named 'doomed' kills its worker process (a segfault)."""
    if any(item["slide_id"] == "doomed" for item in items):
        os._exit(139)
    return tile_slides(items, *args)


def test_a_batch_whose_worker_dies_is_split_and_only_the_crashing_slide_is_lost(
        real_slide, tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "doomed", "c"):
        (folder / f"{name}.svs").symlink_to(real_slide)
    monkeypatch.setattr(tile_stage, "batch_size", lambda slides, cpus: 4)  # all four in one task
    monkeypatch.setattr(tile_stage, "tile_slides", _crash_on_doomed)
    out = tmp_path / "o"
    try:
        assert main(["tile", "--slides", str(folder), "--out", str(out), "--thumbnail-px", "128"]) == 0
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    rows = _rows(out)
    assert {sid: r["status"] for sid, r in rows.items()} == {"a": "ok", "b": "ok", "c": "ok", "doomed": "failed"}
    assert rows["doomed"]["error_kind"] == "crash" and LOST_REASON in rows["doomed"]["reason"]
    assert sorted(p.stem for p in (out / "tiles").glob("*.parquet")) == ["a", "b", "c"]
