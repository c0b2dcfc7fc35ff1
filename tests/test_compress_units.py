"""Compression pieces without Ray: pool sizing, the driver's collector, the actor's batch logic."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from compress_support import L_CELLS, colour_image, tile_colour, write_slide
from nic.compress.actors import EncoderActor, plan_one
from nic.compress.collector import EncoderFacts, SlideCollector
from nic.compress.pipeline import plan_pool
from nic.config.base import ConfigError
from nic.config.compress import CompressConfig
from nic.config.slides import SlideOptions
from nic.grids import load_grid, transform_positions
from nic.grids.schema import slide_file
from nic.runtime import RayInfo

OPTIONS = SlideOptions(tissue={"min_object_um2": 1000})


def cluster(cpus: float, gpus: float = 0) -> RayInfo:
    return RayInfo(address="x", embedded=True, num_cpus=cpus, num_gpus=gpus, num_nodes=1)


def config(**kw) -> CompressConfig:
    return CompressConfig(slides=["s"], encoder="mean-rgb", out="o", **kw)


def test_pool_defaults_fit_a_laptop_a_big_node_and_gpus():
    laptop = plan_pool(config(), cluster(2))
    assert (laptop.pool_size, laptop.cpus_per_actor, laptop.threads, laptop.plan_cpus) == (1, 1.5, 2, 0.5)
    assert laptop.pool_size * laptop.cpus_per_actor + laptop.plan_cpus * laptop.plan_concurrency <= 2
    big = plan_pool(config(), cluster(64), max_node_cpus=64)
    assert big.cpus_per_actor == 4 and big.threads == 4 and big.plan_concurrency == 8
    assert big.pool_size * 4 + big.plan_concurrency * big.plan_cpus <= 64 and big.pool_size == 14
    gpu = plan_pool(config(), cluster(32, gpus=4), max_node_cpus=8)
    assert gpu.use_gpu and gpu.pool_size == 4 and 1 <= gpu.cpus_per_actor <= 4
    assert gpu.read_parallelism == max(2, gpu.threads) and laptop.read_parallelism == 2
    mine = plan_pool(config(pool_size=3, cpus_per_actor=1, batch_size=64, read_parallelism=3), cluster(8))
    assert (mine.pool_size, mine.cpus_per_actor, mine.threads, mine.batch_size, mine.read_parallelism) == (3, 1, 1, 64, 3)
    assert not plan_pool(config(use_gpu=False), cluster(8, gpus=2)).use_gpu
    with pytest.raises(ConfigError, match="no GPU"):
        plan_pool(config(use_gpu=True), cluster(8))
    with pytest.raises(ConfigError, match="does not fit on a node"):
        plan_pool(config(cpus_per_actor=16), cluster(32), max_node_cpus=8)
    with pytest.raises(ConfigError, match="autoscaling"):
        plan_pool(config(), cluster(0))
    assert plan_pool(config(pool_size=2, cpus_per_actor=4), cluster(0)).pool_size == 2


def test_pool_fits_in_the_cpus_that_are_free():
    """Inside a Tune trial (which holds a sliver of a CPU) or beside another job: actors and planning
    must fit in what is free, or planning would wait forever behind the actors."""
    for free in (1.0, 1.5, 1.99, 5.0):
        plan = plan_pool(config(), cluster(8), max_node_cpus=8, free_cpus=free)
        need = plan.pool_size * plan.cpus_per_actor + plan.plan_concurrency * plan.plan_cpus
        assert need <= free + 1e-9 and plan.pool_size >= 1, (free, plan)
    assert plan_pool(config(), cluster(8), free_cpus=0.2).pool_size >= 1  # busy now: sized to the total


def _rows(sid: str, n: int, idx, transform=0, rows=4, cols=5, c=3) -> dict[str, np.ndarray]:
    idx = np.asarray(idx)
    k = len(idx)
    return {
        "slide_id": np.array([sid] * k, object), "tile_index": idx, "n_tiles": np.full(k, n),
        "row": idx // cols, "col": idx % cols, "x": idx * 10, "y": idx * 20, "tissue": np.full(k, 0.9, np.float32),
        "grid_rows": np.full(k, rows), "grid_cols": np.full(k, cols), "tile_px": np.full(k, 128),
        "mpp": np.full(k, 0.5), "base_mpp": np.full(k, 0.25), "level": np.full(k, 1), "plan_seconds": np.full(k, 0.1),
        "error": np.array([""] * k, object), "error_kind": np.array([""] * k, object),
        "transform": np.full(k, transform, np.int8),
        "embedding": np.stack([np.full(c, i + 100 * transform, np.float16) for i in idx]) if k else np.zeros((0, c)),
    }


def _concat(*parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_collector_writes_each_slide_once_whatever_the_order_and_duplicates(tmp_path):
    facts = EncoderFacts("enc", "hash1", 3)
    col = SlideCollector(tmp_path, facts, (0,), "opt", {"a": "/a.tiff", "b": "/b.tiff"})
    assert col.add_batch(_concat(_rows("a", 6, [4, 5]), _rows("b", 2, [1]))) == []
    assert col.add_batch(_rows("a", 6, [4, 5, 0])) == []  # a retried task: rows 4, 5 again
    assert col.duplicates == 2 and col.tiles_done == 4
    assert col.add_batch(_concat(_rows("b", 2, [0]), _rows("a", 6, [1, 2, 3]))) == ["a", "b"]
    assert col.add_batch(_rows("a", 6, [2])) == [] and col.duplicates == 3  # late duplicate: ignored
    assert col.results["a"]["status"] == "ok" and col.results["a"]["tiles"] == 6
    grid, mask = load_grid(tmp_path, "a")
    assert mask.sum() == 6 and grid[0, 0, 4] == 4 and grid[0, 1, 0] == 5
    table = pq.read_table(slide_file(tmp_path, "a"))
    assert table.column("x").to_pylist() == [0, 10, 20, 30, 40, 50]  # sorted by (row, col)


def test_collector_errors_and_lost_tiles_fail_the_slide_and_drop_old_grids(tmp_path):
    facts = EncoderFacts("enc", "hash1", 3)
    old = SlideCollector(tmp_path, facts, (0,), "opt", {"a": "/a.tiff"})
    old.add_batch(_rows("a", 1, [0]))
    assert slide_file(tmp_path, "a").exists()
    col = SlideCollector(tmp_path, facts, (0,), "opt", {"a": "/a.tiff", "c": "/c.tiff"})
    bad = _rows("a", 3, [0, 1])
    bad["error"][:] = "/a.tiff: pixels cannot be read (boom)"
    bad["error_kind"][:] = "unreadable"
    assert col.add_batch(bad) == ["a"]
    assert col.results["a"]["status"] == "failed" and col.results["a"]["error_kind"] == "unreadable"
    assert not slide_file(tmp_path, "a").exists(), "a failed slide keeps no grid"
    col.add_batch(_rows("c", 4, [0, 1]))
    col.fail_unfinished(["a", "c"], "tiles never came back")
    assert col.results["c"]["status"] == "failed" and "2 of 4 tiles arrived" in col.results["c"]["reason"]
    assert col.results["a"]["reason"].startswith("/a.tiff: pixels")  # first verdict stands


def test_collector_dihedral_slots(tmp_path):
    facts = EncoderFacts("enc", "h", 3)
    col = SlideCollector(tmp_path, facts, tuple(range(8)), "opt", {"d": "/d"})
    for k in range(8):
        batch = _rows("d", 2, [0, 1], transform=k, rows=2, cols=1)
        batch["row"], batch["col"] = transform_positions(batch["row"], batch["col"], (2, 1), k)
        assert col.add_batch(batch) == ([] if k < 7 else ["d"])
    assert col.results["d"]["dihedral"] is True
    grid, mask = load_grid(tmp_path, "d", 7)
    assert mask.shape == (1, 2)


@pytest.fixture(scope="module")
def colour_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("u") / "c.tiff", colour_image())


def test_actor_reads_encodes_and_moves_tiles_for_each_transform(colour_slide):
    rows = plan_one("c", str(colour_slide), OPTIONS)
    assert rows["error"][0] == "" and len(rows["row"]) == len(L_CELLS)
    actor = EncoderActor("mean-rgb", OPTIONS, {"c": str(colour_slide)}, transforms=(0, 5), threads=1)
    shuffled = {k: v[::-1] for k, v in rows.items()}  # any order in, sorted reads inside
    out = actor(shuffled)
    assert out["embedding"].dtype == np.float16 and out["embedding"].shape == (2 * len(L_CELLS), 3)
    for k in (0, 5):
        sel = out["transform"] == k
        src_r, src_c = out["y"][sel] // 128, out["x"][sel] // 128  # the source tile of every row
        exp_r, exp_c = transform_positions(src_r, src_c, (8, 12), k)
        np.testing.assert_array_equal(out["row"][sel], exp_r)
        np.testing.assert_array_equal(out["col"][sel], exp_c)
        colours = np.array([tile_colour(r, c) for r, c in zip(src_r, src_c, strict=True)]) / 127.5 - 1
        np.testing.assert_allclose(out["embedding"][sel].astype(np.float32), colours, atol=2e-3)


def test_actor_turns_unreadable_tiles_into_an_error_row(colour_slide, tmp_path):
    rows = plan_one("c", str(colour_slide), OPTIONS)
    gone = tmp_path / "gone.tiff"
    actor = EncoderActor("mean-rgb", OPTIONS, {"c": str(gone)}, threads=1)
    out = actor(rows)
    assert set(out["error_kind"]) == {"missing"} and "gone.tiff" in out["error"][0]
    errors = plan_one("x", str(tmp_path / "nope.svs"), OPTIONS)
    assert len(errors["slide_id"]) == 1 and errors["error_kind"][0] == "missing"
    passed = actor(errors)
    assert passed["error"][0] == errors["error"][0] and passed["embedding"].shape == (1, 3)


def test_a_batch_spanning_slides_is_one_forward_pass_per_transform(colour_slide, tmp_path):
    """Splitting a batch of 256 tiles at a slide boundary into two passes costs up to 2x per tile
    on CPU; a broken slide in the batch still gets its own error rows."""
    rows_a = plan_one("a", str(colour_slide), OPTIONS)
    rows_b = plan_one("b", str(colour_slide), OPTIONS)
    rows_x = {**rows_a, "slide_id": np.full(len(rows_a["slide_id"]), "x", object)}
    batch = {k: np.concatenate([rows_a[k], rows_x[k], rows_b[k]]) for k in rows_a}
    paths = {"a": str(colour_slide), "b": str(colour_slide), "x": str(tmp_path / "gone.tiff")}
    actor = EncoderActor("mean-rgb", OPTIONS, paths, transforms=(0, 5), threads=1)
    calls = []
    encode = actor.encode
    actor.encode = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    out = actor(batch)
    assert calls == [2 * len(L_CELLS), 2 * len(L_CELLS)]  # slides a and b together, once per transform
    n = len(L_CELLS)
    for sid in ("a", "b"):
        sel = (out["slide_id"] == sid) & (out["transform"] == 0)
        assert sel.sum() == n and not any(out["error"][sel])
        colours = np.array([tile_colour(r, c) for r, c in zip(out["row"][sel], out["col"][sel], strict=True)])
        np.testing.assert_allclose(out["embedding"][sel].astype(np.float32), colours / 127.5 - 1, atol=2e-3)
    broken = out["slide_id"] == "x"
    assert broken.sum() == n and set(out["error_kind"][broken]) == {"missing"}
