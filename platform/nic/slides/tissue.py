"""Tissue detection on a low-resolution view of the slide, and per-tile tissue fractions.

Stained tissue is coloured; glass, scanner background and most debris are grey. So tissue is
where HSV saturation is above an Otsu threshold (bounded below by `min_saturation`, so that an
empty slide does not turn its background noise into "tissue"). Scanner black borders and pure
white are never tissue; transparent areas (outside the scanned region) come in as white.
Morphology then makes regions solid: closing (`close_um`), hole filling, dropping specks smaller
than `min_object_um2`. Lengths are given in um so the result does not depend on the mask level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from scipy import ndimage
from skimage.filters import threshold_otsu

from nic.config.slides import TissueOptions
from nic.slides.geometry import TileGrid
from nic.slides.regions import read_region_rgb

#: All channels below this: scanner black border or pen, not tissue.
DARK_LEVEL = 20
#: All channels above this: glass / white background, not tissue.
WHITE_LEVEL = 240
#: Largest side (level pixels) of one block read while building the mask: bounds memory to ~64 MB.
_BLOCK_LEVEL_PX = 4096


@dataclass
class TissueMask:
    """Boolean tissue mask at low resolution, and how it maps to level 0."""

    mask: np.ndarray
    downsample: float
    threshold_value: float
    downsample_xy: tuple[float, float] = (0.0, 0.0)
    mpp: float = 0.0
    level: int = 0

    def __post_init__(self) -> None:
        if self.downsample_xy == (0.0, 0.0):
            self.downsample_xy = (float(self.downsample), float(self.downsample))

    @property
    def fraction(self) -> float:
        """Fraction of the whole mask that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _reduce_area(block: np.ndarray, factor: int) -> np.ndarray:
    """Area-average an (h, w, 3) block by an integer factor; a partial last row/col uses edge pixels."""
    if factor == 1:
        return block
    h, w = block.shape[:2]
    ph, pw = (-h) % factor, (-w) % factor
    if ph or pw:
        block = np.pad(block, ((0, ph), (0, pw), (0, 0)), mode="edge")
    h, w = block.shape[:2]
    # Integer sums, rows first (contiguous), then round half up: the same values as a float mean
    # + 0.5, a third faster.
    rows = block.reshape(h // factor, factor, w, 3).sum(axis=1, dtype=np.uint32)
    sums = rows.reshape(h // factor, w // factor, factor, 3).sum(axis=2, dtype=np.uint32)
    area = factor * factor
    return ((2 * sums + area) // (2 * area)).astype(np.uint8)


def read_low_res(
    slide: openslide.OpenSlide, base_mpp: float, mask_mpp: float, path: str | Path | None = None
) -> tuple[np.ndarray, int, int]:
    """RGB view of the slide at about `mask_mpp`: (image, level read, integer reduction factor).

    Reads the coarsest level not much coarser than `mask_mpp`, in blocks of bounded size, and
    area-averages each block, so a single-level 100k px slide does not need 40 GB of memory.
    """
    downsamples = [float(d) for d in slide.level_downsamples]
    level_mpps = [base_mpp * d for d in downsamples]
    candidates = [i for i, mpp in enumerate(level_mpps) if mpp <= mask_mpp * 1.5]
    level = max(candidates, key=lambda i: level_mpps[i]) if candidates else 0
    factor = max(1, int(round(mask_mpp / level_mpps[level])))
    lw, lh = slide.level_dimensions[level]
    out_w, out_h = math.ceil(lw / factor), math.ceil(lh / factor)
    out = np.empty((out_h, out_w, 3), np.uint8)
    step = max(1, _BLOCK_LEVEL_PX // factor) * factor
    ds = downsamples[level]
    for by in range(0, lh, step):
        for bx in range(0, lw, step):
            w, h = min(step, lw - bx), min(step, lh - by)
            block = read_region_rgb(slide, (round(bx * ds), round(by * ds)), level, (w, h), path)
            small = _reduce_area(block, factor)
            oy, ox = by // factor, bx // factor
            out[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small
    return out, level, factor


#: Up to this closing radius (mask px) a disk structuring element is cheaper than two distance
#: transforms (4x at the default 32 um on an 8 um/px mask); beyond it the transforms win.
_DISK_MAX_RADIUS = 5.0


def _disk(radius: float) -> np.ndarray:
    """Offsets within `radius` px, measured as the distance transform measures them (float64
    sqrt of the integer squared distance), so both closings below give the same pixels."""
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.sqrt((yy * yy + xx * xx).astype(np.float64)) <= radius


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary closing with a Euclidean disk of `radius` px; tissue touching the image edge is not
    eroded (only background pixels inside the image count).

    Small radii (the default mask) use the disk as a structuring element: dilation, then erosion
    with everything outside the image counted as tissue. Larger ones use distance transforms,
    O(pixels) whatever the radius (a disk element costs O(pixels x radius^2), minutes for a fine
    mask). Both give the same pixels (tests/test_slides_tissue.py).
    """
    if radius <= _DISK_MAX_RADIUS:
        disk = _disk(radius)
        dilated = ndimage.binary_dilation(mask, disk)
        if dilated.all():
            return dilated
        return ndimage.binary_erosion(dilated, disk, border_value=1)
    dilated = ndimage.distance_transform_edt(~mask) <= radius
    if dilated.all():
        return dilated
    return ndimage.distance_transform_edt(dilated) > radius


def tissue_from_rgb(rgb: np.ndarray, options: TissueOptions, mpp_xy: tuple[float, float]) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB image whose pixels are `mpp_xy` um; returns (mask, saturation threshold 0-1)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)  # 10x faster than rgb.max(axis=-1) over 3 channels
    mn = np.minimum(np.minimum(r, g), b)
    # HSV saturation (max - min) / max, quantised to 0-255 so Otsu runs on a 256-bin histogram.
    sat = ((mx.astype(np.uint16) - mn) * 255 // np.maximum(mx, 1)).astype(np.uint8)
    dark = mx < DARK_LEVEL
    white = mn > WHITE_LEVEL
    counts = np.bincount(sat[~dark].ravel(), minlength=256)
    used = np.flatnonzero(counts)
    floor = options.min_saturation * 255.0
    if used.size >= 2:
        otsu = float(threshold_otsu(hist=(counts[used[0] : used[-1] + 1], np.arange(used[0], used[-1] + 1))))
    else:
        otsu = floor
    threshold = max(otsu, floor)
    mask = (sat > threshold) & ~dark & ~white

    px_um = math.sqrt(mpp_xy[0] * mpp_xy[1])
    radius = options.close_um / px_um
    if radius >= 1 and mask.any():
        mask = _close(mask, radius)
    if options.fill_holes and mask.any():
        mask = ndimage.binary_fill_holes(mask)
    min_px = options.min_object_um2 / (mpp_xy[0] * mpp_xy[1])
    if min_px > 1 and mask.any():
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    return mask.astype(bool), threshold / 255.0


def detect_tissue(
    slide: openslide.OpenSlide, options: TissueOptions, base_mpp: float, path: str | Path | None = None
) -> TissueMask:
    """Tissue mask of a slide at about `options.mask_mpp` um/px (SlideError(unreadable) if pixels fail)."""
    rgb, level, factor = read_low_res(slide, base_mpp, options.mask_mpp, path)
    width, height = slide.dimensions
    lw, lh = slide.level_dimensions[level]
    # Mask pixel i covers level pixels [i*f, (i+1)*f); per axis, since level sizes are rounded.
    ds_x = factor * width / lw
    ds_y = factor * height / lh
    mpp_xy = (base_mpp * ds_x, base_mpp * ds_y)
    mask, threshold = tissue_from_rgb(rgb, options, mpp_xy)
    return TissueMask(
        mask=mask,
        downsample=(ds_x + ds_y) / 2.0,
        threshold_value=threshold,
        downsample_xy=(ds_x, ds_y),
        mpp=math.sqrt(mpp_xy[0] * mpp_xy[1]),
        level=level,
    )


def _cumulative_at(cum: np.ndarray, values: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    """Integral of a piecewise-constant signal at fractional positions `pos` along `axis`.

    `cum` is the cumulative sum with a leading 0 (length n + 1), `values` the signal (length n).
    Within a pixel the integral is linear, so this is exact area weighting.
    """
    n = values.shape[axis]
    pos = np.clip(pos, 0.0, float(n))
    i = np.minimum(np.floor(pos).astype(np.int64), max(n - 1, 0))
    frac = pos - i
    shape = [1] * cum.ndim
    shape[axis] = -1
    return np.take(cum, i, axis=axis) + frac.reshape(shape) * np.take(values, i, axis=axis)


def tile_tissue_fractions(mask: TissueMask, grid: TileGrid, chunk_rows: int = 1024) -> np.ndarray:
    """Fraction of each tile's area that is tissue, (rows, cols) float32, exact area weighting.

    Two separable passes over running sums (integral image) at the tiles' fractional edges, in
    chunks of mask rows: O(mask pixels + rows x cols) time, memory ~ a few mask rows + the grid.
    """
    rows, cols = grid.shape
    out = np.zeros((rows, cols), np.float32)
    m = mask.mask
    if rows == 0 or cols == 0 or m.size == 0:
        return out
    ds_x, ds_y = mask.downsample_xy
    size = grid.level0_tile_size
    x0 = grid.col_origins() / ds_x
    x1 = (grid.col_origins() + size) / ds_x
    y0 = grid.row_origins() / ds_y
    y1 = (grid.row_origins() + size) / ds_y

    # Pass 1: per mask row, the tissue length inside each column's x-range -> (H, cols).
    height = m.shape[0]
    per_row = np.empty((height, cols), np.float32)
    for start in range(0, height, chunk_rows):
        block = m[start : start + chunk_rows].astype(np.int32)
        cum = np.zeros((block.shape[0], block.shape[1] + 1), np.int64)
        np.cumsum(block, axis=1, out=cum[:, 1:])
        right = _cumulative_at(cum, block, x1, axis=1)
        left = _cumulative_at(cum, block, x0, axis=1)
        per_row[start : start + block.shape[0]] = right - left
    # Pass 2: along y, the same on per-row lengths -> tissue area (mask px^2) per tile.
    cum = np.zeros((height + 1, cols), np.float64)
    np.cumsum(per_row, axis=0, dtype=np.float64, out=cum[1:])
    area = _cumulative_at(cum, per_row, y1, axis=0) - _cumulative_at(cum, per_row, y0, axis=0)
    tile_area = (size / ds_x) * (size / ds_y)
    np.clip(area / tile_area, 0.0, 1.0, out=area)
    out[:] = area
    return out
