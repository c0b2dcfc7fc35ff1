"""The streaming pyramidal TIFF writer: OpenSlide must read what it writes, and it must stream."""

from __future__ import annotations

import hashlib

import numpy as np
import openslide
import pytest
import tifffile

from nic.synth.tiff_writer import pyramid_dimensions, write_pyramidal_tiff


def gradient_fn(width: int, height: int):
    """Smooth, position-dependent pixels (JPEG keeps them close), so misplaced tiles show up."""

    def fn(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        r = (xx * 255 // max(1, width - 1)).astype(np.uint8)
        g = (yy * 255 // max(1, height - 1)).astype(np.uint8)
        b = ((xx // 64 + yy // 64) % 2 * 60 + 100).astype(np.uint8)
        return np.stack([r, g, b], axis=-1)

    return fn


def test_pyramid_dimensions_halve_down_to_about_1000px():
    assert pyramid_dimensions(1000, 800) == [(1000, 800)]
    assert pyramid_dimensions(4001, 3000) == [(4001, 3000), (2001, 1500), (1001, 750)]
    assert pyramid_dimensions(2050, 10) == [(2050, 10), (1025, 5), (513, 3)]
    dims = pyramid_dimensions(100_000, 100_000)
    assert dims[0] == (100_000, 100_000) and max(dims[-1]) <= 1024 < max(dims[-2])
    assert len(dims) == 8
    with pytest.raises(ValueError, match="positive"):
        pyramid_dimensions(0, 10)


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_openslide_reads_levels_mpp_and_pixels(tmp_path, mpp):
    width, height = 2600, 1300
    fn = gradient_fn(width, height)
    path = tmp_path / "slide.tiff"
    dims = write_pyramidal_tiff(path, width, height, fn, mpp=mpp)
    assert dims == [(2600, 1300), (1300, 650), (650, 325)]

    slide = openslide.OpenSlide(str(path))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count == 3
    assert slide.level_dimensions == ((2600, 1300), (1300, 650), (650, 325))
    assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
    assert slide.properties["openslide.level[0].tile-width"] == "256"

    truth = fn(0, 0, height, width).astype(np.float32)
    level0 = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"), np.float32)
    assert np.abs(level0 - truth).mean() < 2.0
    # Level 1 is the 2 x 2 mean of level 0.
    mean2 = (truth[0::2, 0::2] + truth[1::2, 0::2] + truth[0::2, 1::2] + truth[1::2, 1::2]) / 4
    level1 = np.asarray(slide.read_region((0, 0), 1, (1300, 650)).convert("RGB"), np.float32)
    assert np.abs(level1 - mean2).mean() < 2.0
    # A region away from the origin lands where it belongs (tile order is right).
    patch = np.asarray(slide.read_region((1900, 1000), 0, (300, 200)).convert("RGB"), np.float32)
    assert np.abs(patch - truth[1000:1200, 1900:2200]).mean() < 2.0
    slide.close()


def test_odd_sizes_and_edge_tiles(tmp_path):
    width, height = 1537, 1029  # not multiples of the tile size, odd at every level
    fn = gradient_fn(width, height)
    path = tmp_path / "odd.tiff"
    write_pyramidal_tiff(path, width, height, fn, mpp=0.5, tile_size=256)
    slide = openslide.OpenSlide(str(path))
    assert slide.level_dimensions == ((1537, 1029), (769, 515))
    corner = np.asarray(slide.read_region((1500, 1000), 0, (37, 29)).convert("RGB"), np.float32)
    assert np.abs(corner - fn(1000, 1500, 29, 37)).mean() < 3.0
    last = np.asarray(slide.read_region((1536, 1028), 1, (1, 1)).convert("RGB"), np.float32)
    assert np.abs(last[0, 0] - fn(1028, 1536, 1, 1)[0, 0]).max() < 6.0


def test_tile_fn_is_called_band_by_band_and_covers_the_slide_once(tmp_path):
    width, height = 3000, 1100
    inner = gradient_fn(width, height)
    calls: list[tuple[int, int, int, int]] = []

    def fn(y0, x0, h, w):
        calls.append((y0, x0, h, w))
        return inner(y0, x0, h, w)

    write_pyramidal_tiff(tmp_path / "s.tiff", width, height, fn, mpp=0.5, tile_size=256, region_width=1024)
    assert all(h <= 256 and w <= 1024 for _, _, h, w in calls)
    assert max(h * w for _, _, h, w in calls) < width * height / 10
    coverage = np.zeros((height, width), np.int32)
    for y0, x0, h, w in calls:
        coverage[y0 : y0 + h, x0 : x0 + w] += 1
    assert (coverage == 1).all()
    # Band order: rows never go backwards (what makes the writer stream).
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_same_pixels_give_identical_bytes_and_no_timestamp(tmp_path):
    fn = gradient_fn(1500, 1500)
    a, b = tmp_path / "a.tiff", tmp_path / "b.tiff"
    write_pyramidal_tiff(a, 1500, 1500, fn, mpp=0.5)
    write_pyramidal_tiff(b, 1500, 1500, fn, mpp=0.5, workers=2)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    with tifffile.TiffFile(a) as tif:
        assert len(tif.pages) == 2
        for page in tif.pages:
            assert "DateTime" not in page.tags
            assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    assert not list(tmp_path.glob(".*.tmp")), "the spool file must be removed"


def test_bad_tile_fn_output_is_a_clear_error_and_leaves_no_spool(tmp_path):
    def bad(y0, x0, h, w):
        return np.zeros((h, w), np.uint8)

    with pytest.raises(ValueError, match=r"tile_fn\(0, 0, 256, 1200\) returned uint8 \(256, 1200\)"):
        write_pyramidal_tiff(tmp_path / "bad.tiff", 1200, 1200, bad, mpp=0.5)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="multiple of 16"):
        write_pyramidal_tiff(tmp_path / "bad2.tiff", 100, 100, bad, mpp=0.5, tile_size=100)
