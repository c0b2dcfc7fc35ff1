"""TileGrid: the one mapping between grid cells and level-0 pixels."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from nic.slides import TileGrid


@pytest.mark.parametrize(
    "base_mpp, expected_size",
    [(0.5, 128.0), (0.25, 256.0), (0.499, 128 * 0.5 / 0.499), (0.51, 128 * 0.5 / 0.51), (1.0, 64.0)],
)
def test_level0_tile_size(base_mpp, expected_size):
    grid = TileGrid(10_000, 8_000, base_mpp, 0.5, 128)
    assert grid.level0_tile_size == pytest.approx(expected_size)
    assert grid.cols == int(10_000 // expected_size)
    assert grid.rows == int(8_000 // expected_size)
    assert grid.shape == (grid.rows, grid.cols)
    assert grid.count == grid.rows * grid.cols


def test_quarter_micron_slide_tiles_are_256_level0_px():
    grid = TileGrid(1024, 600, 0.25, 0.5, 128)
    assert grid.shape == (2, 4)
    assert grid.origin(0, 0) == (0, 0)
    assert grid.origin(1, 3) == (768, 256)
    assert grid.index(767, 255) == (0, 2)
    assert grid.index(768, 256) == (1, 3)


def test_non_integer_scale_origins_are_rounded_from_exact_positions():
    """0.499 um/px (small_HE.svs): 128.256 level-0 px per tile; no error accumulates across the slide."""
    grid = TileGrid(100_000, 100_000, 0.499, 0.5, 128)
    size = 128 * 0.5 / 0.499
    cols = np.arange(grid.cols)
    xs, ys = grid.origins(cols, cols)
    assert np.array_equal(xs, np.floor(cols * size + 0.5).astype(np.int64))
    assert np.array_equal(xs, ys)
    assert np.abs(xs - cols * size).max() <= 0.5
    steps = np.diff(xs)
    assert set(steps.tolist()) <= {128, 129}  # tiles abut: no gaps, no overlaps in level-0 px


@pytest.mark.parametrize("base_mpp", [0.5, 0.25, 0.499, 0.51, 0.2437, 0.3])
def test_index_is_the_inverse_of_origin_on_every_pixel(base_mpp):
    grid = TileGrid(5_000, 3_000, base_mpp, 0.5, 128)
    xs = np.arange(0, 5_000)
    _, cols = grid.indices(xs, np.zeros_like(xs))
    origins = grid.col_origins()
    # every pixel lies in the tile whose [origin, next origin) holds it
    inside = cols < grid.cols
    c = cols[inside]
    assert np.all(origins[c] <= xs[inside])
    nxt = np.append(origins, grid.origin(0, grid.cols)[0])
    assert np.all(xs[inside] < nxt[c + 1])
    # and each origin maps back to its own tile
    rows_back, cols_back = grid.indices(origins, np.zeros_like(origins))
    assert np.array_equal(cols_back, np.arange(grid.cols))
    assert np.all(rows_back == 0)
    for row, col in [(0, 0), (3, 7), (grid.rows - 1, grid.cols - 1)]:
        assert grid.index(*grid.origin(row, col)) == (row, col)


def test_vectorised_origins_match_scalar_origin():
    grid = TileGrid(7_777, 5_555, 0.4987, 0.5, 128)
    rows, cols = grid.all_cells()
    xs, ys = grid.origins(rows, cols)
    for i in range(0, rows.size, 97):
        assert grid.origin(int(rows[i]), int(cols[i])) == (xs[i], ys[i])
    assert rows.dtype == np.int32 and cols.dtype == np.int32
    assert rows.size == grid.count
    assert np.all(np.diff(rows.astype(np.int64) * grid.cols + cols) == 1)  # row-major


def test_only_whole_tiles_count():
    assert TileGrid(16, 16, 0.5, 0.5, 128).shape == (0, 0)
    assert TileGrid(127, 5_000, 0.5, 0.5, 128).shape == (39, 0)
    assert TileGrid(128, 128, 0.5, 0.5, 128).shape == (1, 1)
    assert TileGrid(255, 256, 0.5, 0.5, 128).shape == (2, 1)
    # 0.499 um/px: one tile needs 128.256 level-0 px, so 128 px is not enough
    assert TileGrid(128, 128, 0.499, 0.5, 128).shape == (0, 0)
    assert TileGrid(129, 129, 0.499, 0.5, 128).shape == (1, 1)
    # the last whole tile ends inside the slide (up to the half pixel of rounding)
    grid = TileGrid(2_220, 2_967, 0.499, 0.5, 128)
    assert grid.shape == (23, 17)
    x, y = grid.origin(grid.rows - 1, grid.cols - 1)
    assert x + grid.level0_tile_size <= 2_220 + 0.5 and y + grid.level0_tile_size <= 2_967 + 0.5


def test_index_outside_the_slide_is_outside_the_grid():
    grid = TileGrid(1_000, 1_000, 0.5, 0.5, 128)
    assert grid.index(-1, -1) == (-1, -1)
    assert grid.index(1_000, 0)[1] == 7  # beyond the last whole tile (cols == 7)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="um/px"):
        TileGrid(100, 100, 0.0, 0.5, 128)
    with pytest.raises(ValueError, match="tile_px"):
        TileGrid(100, 100, 0.5, 0.5, 0)


def test_grid_is_frozen_and_picklable():
    grid = TileGrid(3_000, 2_000, 0.499, 0.5, 128)
    with pytest.raises(AttributeError):
        grid.rows = 3  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(grid)) == grid
