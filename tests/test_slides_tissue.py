"""Tissue detection on a real H&E slide and on synthetic slides with known tissue geometry."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from nic.config.slides import SlideOptions, TissueOptions
from nic.slides import (
    TileGrid,
    TileReader,
    TissueMask,
    composite_on_white,
    detect_tissue,
    open_slide,
    plan_slide,
    tile_tissue_fractions,
)
from slide_factory import tissue_like, write_tiled_tiff

# ---------------------------------------------------------------- the real slide


@pytest.fixture(scope="module")
def he_plan(real_slide):
    return plan_slide(real_slide, SlideOptions())


def test_real_slide_tissue_amount_is_plausible(he_plan):
    # a skin section on white glass: about 40 % of the slide is tissue (measured 0.39)
    assert 0.25 < he_plan.tissue.fraction < 0.55
    assert he_plan.grid.shape == (23, 17)
    assert 100 <= he_plan.tile_count <= 220  # of 391 tiles (measured 154)
    assert 0.05 <= he_plan.tissue.threshold_value < 0.5
    assert he_plan.tissue.mask.shape == (186, 139)  # 2967 x 2220 px at ~8 um/px
    assert he_plan.tissue.downsample == pytest.approx(16.0, rel=0.01)


def test_real_slide_white_corners_out_tissue_centre_in(he_plan):
    f = he_plan.fractions
    for corner in [(0, 0), (0, 16), (22, 0), (22, 16), (5, 1), (15, 15)]:
        assert f[corner] < 0.05, corner
        assert not he_plan.keep[corner]
    for centre in [(10, 9), (15, 9), (18, 8), (20, 10), (3, 9)]:
        assert f[centre] > 0.95, centre
        assert he_plan.keep[centre]


def test_real_slide_kept_tiles_look_like_tissue(he_plan, real_slide):
    """Read every tile: tissue tiles are coloured and darker, background tiles grey-white."""
    rows, cols = he_plan.grid.all_cells()
    with TileReader.from_plan(he_plan) as reader:
        tiles = reader.read(rows, cols).astype(np.int32)
    brightness = tiles.reshape(rows.size, -1).mean(axis=1)
    mx, mn = tiles.max(axis=-1), tiles.min(axis=-1)
    sat = ((mx - mn) / np.maximum(mx, 1)).reshape(rows.size, -1).mean(axis=1)
    f = he_plan.fractions[rows, cols]
    empty, full = f == 0, f >= 0.999
    assert empty.sum() > 100 and full.sum() > 80
    assert brightness[empty].min() > 225 and np.percentile(sat[empty], 95) < 0.03
    assert np.percentile(brightness[full], 90) < 200 and np.median(sat[full]) > 0.2


def test_plan_pickles_for_ray(he_plan):
    back = pickle.loads(pickle.dumps(he_plan))
    assert back.grid == he_plan.grid and back.resolution == he_plan.resolution
    assert np.array_equal(back.fractions, he_plan.fractions) and np.array_equal(back.tissue.mask, he_plan.tissue.mask)


def test_plan_tiles_are_the_kept_cells_in_row_major_order(he_plan):
    rows, cols, xs, ys, tissue = he_plan.tiles()
    assert rows.dtype == np.int32 and cols.dtype == np.int32
    assert xs.dtype == np.int64 and ys.dtype == np.int64 and tissue.dtype == np.float32
    assert rows.size == he_plan.tile_count
    order = rows.astype(np.int64) * he_plan.grid.cols + cols
    assert np.all(np.diff(order) > 0)
    assert np.all(he_plan.keep[rows, cols]) and np.all(tissue >= 0.5)
    ex, ey = he_plan.grid.origins(rows, cols)
    assert np.array_equal(xs, ex) and np.array_equal(ys, ey)


# ---------------------------------------------------------------- synthetic known geometry

W, H = 2048, 1536  # level-0 px at 0.5 um/px: 16 x 12 tiles of 128 px


def _write_known_slide(folder, levels):
    rng = np.random.default_rng(3)
    image = np.clip(242 + rng.normal(0, 2, (H, W, 3)), 0, 255).astype(np.uint8)  # glass
    image[:64] = rng.integers(0, 12, (64, W, 3))  # scanner black border along the top
    tissue = tissue_like(H, W, seed=5)
    image[256:768, 256:1024] = tissue[256:768, 256:1024]  # A: tiles rows 2-5, cols 2-7
    image[512:1280, 1344:1856] = tissue[512:1280, 1344:1856]  # B: rows 4-9, half of cols 10 and 14
    image[1024:1408, 256:768] = (120, 120, 120)  # grey, unsaturated: a shadow or fold, not tissue
    image[1408:1456, 1600:1648] = tissue[1408:1456, 1600:1648]  # 24 um speck: below min_object_um2
    path = write_tiled_tiff(folder / f"known{levels}.tiff", image, 0.5, tile=256, levels=levels)
    expected = np.zeros((12, 16), np.float32)
    expected[2:6, 2:8] = 1.0
    expected[4:10, 11:14] = 1.0
    expected[4:10, 10] = 0.5
    expected[4:10, 14] = 0.5
    return path, expected


@pytest.fixture(scope="module")
def known_slides(tmp_path_factory):
    """The same known layout written as a single-level slide and as a 3-level pyramid."""
    folder = tmp_path_factory.mktemp("known")
    return {levels: _write_known_slide(folder, levels) for levels in (1, 3)}


@pytest.mark.parametrize("levels", [1, 3])
def test_known_rectangles_give_known_fractions(known_slides, levels):
    path, expected = known_slides[levels]
    plan = plan_slide(path, SlideOptions())
    assert plan.grid.shape == expected.shape
    err = np.abs(plan.fractions - expected)
    # edges may move by one mask pixel (16 level-0 px = 1/8 tile) through JPEG and morphology
    assert err.max() <= 0.13, np.round(plan.fractions, 2)
    assert err.mean() < 0.01
    assert np.array_equal(plan.keep, expected >= 0.5)
    assert plan.tile_count == 24 + 18 + 12
    # the black border, the grey patch and the speck are not tissue
    mask = plan.tissue.mask
    ds = plan.tissue.downsample
    assert not mask[: int(64 / ds)].any()
    assert not mask[int(1024 / ds) : int(1408 / ds), int(256 / ds) : int(768 / ds)].any()
    assert not mask[int(1408 / ds) : int(1456 / ds), int(1600 / ds) : int(1648 / ds)].any()


def test_mask_level_follows_mask_mpp(known_slides):
    path, _ = known_slides[3]  # levels at 0.5, 1, 2 um/px
    with open_slide(path) as slide:
        coarse = detect_tissue(slide, TissueOptions(mask_mpp=8.0), 0.5, path)
        fine = detect_tissue(slide, TissueOptions(mask_mpp=1.0), 0.5, path)
    assert coarse.level == 2 and coarse.downsample == pytest.approx(16.0)
    assert coarse.mask.shape == (96, 128)
    assert fine.level == 1 and fine.downsample == pytest.approx(2.0)
    assert fine.mask.shape == (768, 1024)
    assert fine.mpp == pytest.approx(1.0)
    # same tissue at both resolutions
    assert abs(coarse.fraction - fine.fraction) < 0.01


def test_empty_slide_plans_with_no_tiles(tmp_path):
    rng = np.random.default_rng(0)
    image = np.clip(238 + rng.normal(0, 4, (600, 800, 3)), 0, 255).astype(np.uint8)
    path = write_tiled_tiff(tmp_path / "blank.tiff", image, 0.5, levels=2)
    plan = plan_slide(path, SlideOptions())
    assert plan.grid.shape == (4, 6)
    assert plan.tile_count == 0 and not plan.tissue.mask.any()
    assert plan.tissue.threshold_value >= 0.05  # the min_saturation floor holds against noise
    assert all(a.size == 0 for a in plan.tiles())


def test_threshold_option_sets_keep(known_slides):
    path, _ = known_slides[3]
    strict = plan_slide(path, SlideOptions(tissue=TissueOptions(threshold=0.9)))
    loose = plan_slide(path, SlideOptions(tissue=TissueOptions(threshold=0.3)))
    assert strict.tile_count == 42 and loose.tile_count == 54


# ---------------------------------------------------------------- fractions and background


def _brute_fractions(mask: np.ndarray, dsx: float, dsy: float, grid: TileGrid) -> np.ndarray:
    """Exact area overlap, tile by tile, mask pixel by mask pixel."""
    out = np.zeros(grid.shape)
    size = grid.level0_tile_size
    xe = np.arange(mask.shape[1] + 1) * dsx
    ye = np.arange(mask.shape[0] + 1) * dsy
    for r in range(grid.rows):
        for c in range(grid.cols):
            x0, y0 = grid.origin(r, c)
            ox = np.clip(np.minimum(xe[1:], x0 + size) - np.maximum(xe[:-1], x0), 0, None)
            oy = np.clip(np.minimum(ye[1:], y0 + size) - np.maximum(ye[:-1], y0), 0, None)
            out[r, c] = (oy[:, None] * ox[None, :] * mask).sum() / (size * size)
    return out


@pytest.mark.parametrize("base_mpp, dsx, dsy", [(0.5, 16.0, 16.0), (0.499, 7.3, 6.9), (0.25, 32.0, 31.5)])
def test_fractions_are_exact_area_weights(base_mpp, dsx, dsy):
    rng = np.random.default_rng(1)
    mask = rng.random((60, 80)) > 0.6
    grid = TileGrid(int(80 * dsx), int(60 * dsy), base_mpp, 0.5, 128)
    tm = TissueMask(mask=mask, downsample=(dsx + dsy) / 2, threshold_value=0.1, downsample_xy=(dsx, dsy))
    fast = tile_tissue_fractions(tm, grid, chunk_rows=7)  # small chunks exercise the chunking
    assert fast.dtype == np.float32 and fast.shape == grid.shape
    np.testing.assert_allclose(fast, _brute_fractions(mask, dsx, dsy, grid), atol=1e-5)


def test_fractions_of_empty_grid_and_scalar_downsample():
    tm = TissueMask(mask=np.ones((1, 1), bool), downsample=16.0, threshold_value=0.1)
    assert tm.downsample_xy == (16.0, 16.0)
    assert tile_tissue_fractions(tm, TileGrid(16, 16, 0.5, 0.5, 128)).shape == (0, 0)


def test_transparent_background_becomes_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 128)
    rgb = composite_on_white(rgba)
    assert rgb.shape == (2, 3, 3)
    assert tuple(rgb[0, 0]) == (200, 100, 50)
    assert np.all(rgb[1] == 255)  # alpha 0 -> white, not black
    assert tuple(rgb[0, 1]) == (227, 177, 152)  # half transparent: halfway to white


@pytest.mark.parametrize("factor", [2, 3, 4, 6, 16])
def test_area_reduction_is_the_rounded_mean_of_each_block(factor):
    from nic.slides.tissue import _reduce_area

    rng = np.random.default_rng(factor)
    block = rng.integers(0, 256, (5 * factor + 1, 7 * factor - 1, 3), dtype=np.uint8)  # partial edges
    got = _reduce_area(block, factor)
    padded = np.pad(block, ((0, (-block.shape[0]) % factor), (0, (-block.shape[1]) % factor), (0, 0)), mode="edge")
    h, w = padded.shape[0] // factor, padded.shape[1] // factor
    means = padded.reshape(h, factor, w, factor, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(got, np.floor(means + 0.5).astype(np.uint8))


def _close_by_distance(mask: np.ndarray, radius: float) -> np.ndarray:
    """The reference closing: two Euclidean distance transforms (what `_close` does for big radii)."""
    from scipy import ndimage

    dilated = ndimage.distance_transform_edt(~mask) <= radius
    return dilated if dilated.all() else ndimage.distance_transform_edt(dilated) > radius


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.0, 2.5, 4.0, 4.0100250626566414, 5.0])
def test_closing_with_a_disk_gives_the_distance_transform_pixels(radius):
    """Small radii take the structuring-element path; it must give the same mask as the distance
    transforms, edges included (tissue at the border is not eroded), for sparse and dense masks."""
    from nic.slides.tissue import _DISK_MAX_RADIUS, _close

    assert radius <= _DISK_MAX_RADIUS
    rng = np.random.default_rng(int(radius * 100))
    for density in (0.03, 0.3, 0.7):
        mask = rng.random((97, 61)) < density
        mask[:, 0] = True  # tissue touching the edge
        np.testing.assert_array_equal(_close(mask, radius), _close_by_distance(mask, radius))
    full = np.ones((8, 9), bool)
    np.testing.assert_array_equal(_close(full, radius), full)


def test_closing_fills_gaps_narrower_than_the_disk():
    from nic.slides.tissue import _close

    mask = np.zeros((40, 40), bool)
    mask[10:30, 5:18] = True
    mask[10:30, 21:35] = True  # a 3 px gap: closed by radius 2, not by radius 1
    assert _close(mask, 2.0)[20, 19] and not _close(mask, 1.0)[20, 19]
    assert not _close(mask, 2.0)[5, 19]  # nothing grows outside
