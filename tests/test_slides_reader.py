"""TileReader gives OpenSlide's pixels on both paths, fast path included, edges and odd scales too."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from nic.config.slides import SlideOptions
from nic.slides import (
    TileGrid,
    TileReader,
    open_slide,
    plan_slide,
    read_region_rgb,
    read_tiles,
    resolve_resolution,
)
from slide_factory import tissue_like, write_tiled_tiff

P = 128


@pytest.fixture(scope="module")
def texture():
    return tissue_like(1100, 1400, seed=11)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, texture):
    """Synthetic slides: name -> path. Sizes are chosen so tiles straddle file tiles and slide edges."""
    folder = tmp_path_factory.mktemp("reader")
    spec = {
        # name: (height, width, mpp, levels, file tile, compression)
        "straddle": (1000, 1300, 0.49, 1, 256, "jpeg"),  # 130.6 level-0 px per tile, exact within 10 %
        "overrun": (753, 1004, 0.51, 2, 256, "jpeg"),  # 125.5 px per tile: last row/col run 2 px past the edge
        "pyramid40x": (1100, 1400, 0.25, 3, 128, "jpeg"),  # level 1 (0.5 um/px) read directly
        "lossless": (700, 900, 0.5, 1, 192, "deflate"),
        "single40x": (1100, 1400, 0.25, 1, 256, "jpeg"),  # scale 2 from level 0
        "between": (1100, 1400, 0.2, 3, 256, "jpeg"),  # level 1 = 0.4 um/px, scale 1.25
        "odd": (1000, 1300, 0.3, 1, 256, "jpeg"),  # scale 1.667, 213.3 level-0 px per tile
        "coarse": (500, 700, 1.0, 1, 256, "jpeg"),  # upsampled x2
    }
    out = {}
    for name, (h, w, mpp, levels, tile, comp) in spec.items():
        out[name] = write_tiled_tiff(folder / f"{name}.tiff", texture[:h, :w], mpp, tile=tile, levels=levels,
                                     compression=comp)
    return out


def _setup(path, **options):
    with open_slide(path) as slide:
        res = resolve_resolution(slide, SlideOptions(**options), path)
        width, height = slide.dimensions
    return res, TileGrid(width, height, res.base_mpp, res.target_mpp, P)


def _openslide_tiles(path, res, grid, rows, cols):
    """Reference: one OpenSlide read_region per tile at the tile's level-0 origin, on white."""
    xs, ys = grid.origins(rows, cols)
    with open_slide(path) as slide:
        return np.stack([read_region_rgb(slide, (x, y), res.level, (P, P)) for x, y in zip(xs, ys)])


def test_real_svs_direct_path_equals_openslide(real_slide):
    plan = plan_slide(real_slide, SlideOptions())
    rows, cols = plan.grid.all_cells()
    with TileReader.from_plan(plan) as reader:
        assert reader.mode == "direct"  # Aperio JPEG, photometric RGB, shared JPEGTables
        tiles = reader.read(rows, cols)
        stats = reader.stats
    ref = _openslide_tiles(real_slide, plan.resolution, plan.grid, rows, cols)
    # imagecodecs and OpenSlide both decode with libjpeg-turbo, same colour space: bit-identical
    assert np.array_equal(tiles, ref)
    # 240 px file tiles, 128.256 px NIC tiles: many NIC tiles straddle file tiles, each decoded once
    xs, ys = plan.grid.origins(rows, cols)
    touched = {(ty, tx) for x, y in zip(xs, ys)
               for ty in range(y // 240, (y + P - 1) // 240 + 1) for tx in range(x // 240, (x + P - 1) // 240 + 1)}
    assert stats.decoded == len(touched) and stats.cache_hits > stats.decoded


@pytest.mark.parametrize("name, level", [("straddle", 0), ("overrun", 0), ("pyramid40x", 1), ("lossless", 0)])
def test_direct_path_equals_openslide_on_synthetic_slides(slides, name, level):
    path = slides[name]
    res, grid = _setup(path)
    assert res.exact and res.level == level
    rows, cols = grid.all_cells()
    with TileReader(path, res, grid) as reader:
        assert reader.mode == "direct", reader.direct_reason
        tiles = reader.read(rows, cols)
    assert np.array_equal(tiles, _openslide_tiles(path, res, grid, rows, cols))


def test_direct_path_edges_are_white(slides, texture):
    path = slides["overrun"]
    res, grid = _setup(path)
    assert grid.shape == (6, 8)
    last = read_tiles(path, res, grid, [5], [7])[0]
    x, y = grid.origin(5, 7)
    assert (x + P, y + P) == (1006, 755)  # 2 px past the 1004 x 753 slide on both sides
    assert np.all(last[:, -2:] == 255) and np.all(last[-2:, :] == 255)
    assert last[:-2, :-2].mean() < 220  # the rest is tissue texture


def test_lossless_direct_tiles_are_the_source_pixels(slides, texture):
    path = slides["lossless"]
    res, grid = _setup(path)
    rows, cols = grid.all_cells()
    tiles = read_tiles(path, res, grid, rows, cols)
    xs, ys = grid.origins(rows, cols)
    for i in range(rows.size):
        assert np.array_equal(tiles[i], texture[ys[i] : ys[i] + P, xs[i] : xs[i] + P])


def test_region_path_equals_direct_path_when_exact(slides):
    for name in ("straddle", "overrun", "pyramid40x"):
        path = slides[name]
        res, grid = _setup(path)
        rows, cols = grid.all_cells()
        direct = read_tiles(path, res, grid, rows, cols)
        with TileReader(path, res, grid, direct=False, max_region_px=300) as reader:  # many small blocks
            assert reader.mode == "region"
            region = reader.read(rows, cols)
        assert np.array_equal(direct, region), name


def test_region_path_downsamples_by_area_average(slides):
    """0.25 um/px single level -> 0.5: each tile is the 2 x 2 mean of OpenSlide's 256 px region."""
    path = slides["single40x"]
    res, grid = _setup(path)
    assert res.level == 0 and res.scale == pytest.approx(2.0)
    rows, cols = grid.all_cells()
    with TileReader(path, res, grid) as reader:
        assert reader.mode == "region"
        tiles = reader.read(rows, cols).astype(np.int32)
    xs, ys = grid.origins(rows, cols)
    with open_slide(path) as slide:
        for i in range(rows.size):
            big = read_region_rgb(slide, (xs[i], ys[i]), 0, (2 * P, 2 * P)).astype(np.float64)
            mean = big.reshape(P, 2, P, 2, 3).mean(axis=(1, 3))
            assert np.abs(tiles[i] - mean).max() <= 1.0  # PIL's fixed-point rounding


@pytest.mark.parametrize("name, level, scale", [("between", 1, 1.25), ("odd", 0, 0.5 / 0.3), ("coarse", 0, 0.5)])
def test_region_path_matches_a_resize_of_openslides_region(slides, name, level, scale):
    path = slides[name]
    res, grid = _setup(path)
    assert res.level == level and not res.exact and res.scale == pytest.approx(scale)
    rows, cols = grid.all_cells()
    tiles = read_tiles(path, res, grid, rows, cols).astype(np.int32)
    xs, ys = grid.origins(rows, cols)
    ds, span, margin = res.level_downsample, P * res.scale, 4
    resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BICUBIC
    diffs = []
    with open_slide(path) as slide:
        for i in range(rows.size):
            lx, ly = xs[i] / ds, ys[i] / ds  # whole level pixels for these slides
            assert lx == int(lx) and ly == int(ly)
            size = math.ceil(span) + 2 * margin
            loc = (int(round((lx - margin) * ds)), int(round((ly - margin) * ds)))
            region = Image.fromarray(read_region_rgb(slide, loc, level, (size, size)))
            ref = np.asarray(region.resize((P, P), resample, box=(margin, margin, margin + span, margin + span)))
            diffs.append(np.abs(tiles[i] - ref.astype(np.int32)))
    diffs = np.stack(diffs)
    # same pixels, same filter; PIL's float coefficients depend slightly on where the box sits in the
    # region it cuts from, so a value may round the other way (measured: max 1, mean < 0.02)
    assert diffs.max() <= 1 and diffs.mean() < 0.05, (diffs.max(), diffs.mean())


def test_order_is_the_callers_and_duplicates_work(slides):
    path = slides["straddle"]
    res, grid = _setup(path)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, grid.rows, 40)
    cols = rng.integers(0, grid.cols, 40)
    rows[5], cols[5] = rows[3], cols[3]
    for direct in (None, False):
        with TileReader(path, res, grid, direct=direct) as reader:
            batch = reader.read(rows, cols)
            one_by_one = np.stack([reader.read([r], [c])[0] for r, c in zip(rows, cols)])
        assert np.array_equal(batch, one_by_one)
        assert np.array_equal(batch[5], batch[3])


def test_tiny_cache_still_reads_correctly(slides):
    path = slides["straddle"]
    res, grid = _setup(path)
    rows, cols = grid.all_cells()
    with TileReader(path, res, grid, cache_bytes=1) as reader:  # 4 file tiles
        small = reader.read(rows, cols)
        decoded = reader.stats.decoded
    with TileReader(path, res, grid) as reader:
        big = reader.read(rows, cols)
        # the 7 x 9 grid of 130.6 px tiles ends at x 1173, y 912: 5 x 4 file tiles of 256 px
        assert reader.stats.decoded == 5 * 4
    assert np.array_equal(small, big)
    assert decoded >= 20


def test_direct_required_but_impossible(slides):
    path = slides["single40x"]
    res, grid = _setup(path)
    with pytest.raises(ValueError, match="direct tile reading not possible: the level is not at the target"):
        TileReader(path, res, grid, direct=True)


def test_grid_and_resolution_must_agree(slides):
    path = slides["straddle"]
    res, grid = _setup(path)
    other = TileGrid(grid.width, grid.height, 0.5, res.target_mpp, P)
    with pytest.raises(ValueError, match="disagree"):
        TileReader(path, res, other)


def test_bad_requests(slides):
    path = slides["straddle"]
    res, grid = _setup(path)
    reader = TileReader(path, res, grid)
    assert reader.read([], []).shape == (0, P, P, 3)
    with pytest.raises(IndexError, match=r"tile \(0, 99\) is outside the 7 x 9 grid"):
        reader.read([0], [99])
    with pytest.raises(ValueError, match="differ in length"):
        reader.read([0, 1], [0])
    reader.close()
    with pytest.raises(RuntimeError, match="closed"):
        reader.read([0], [0])
