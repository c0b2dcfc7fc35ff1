"""Crops, padding and rotations/flips of feature grids, as NIC trains its grid CNN.

Crops are R x R windows whose centres are drawn with probability proportional to the cell's
distance from background, so that crops sit on tissue rather than on its border or on glass.
Grids smaller than R (in either direction) are zero-padded, which is what background is in a grid.

The 8 dihedral transforms: a grid's embeddings describe tiles in their original orientation, so
rotating the grid array moves the cells but not what each embedding saw. When compression wrote
the 8 pixel-level variants (`nic compress` with dihedral on), the dataset loads those instead and
these array transforms are only the fallback. Both use nic.grids.dihedral's numbering.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt

from nic.grids.dihedral import check_transform, transform_image


def center_weights(mask: np.ndarray) -> np.ndarray:
    """Probability of each cell being a crop centre: its Euclidean distance to the nearest
    background cell (0 on background), normalised to sum 1. A grid without tissue gets uniform
    weights (there is nothing better to aim at)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, 1.0 / mask.size)
    # Pad with background so that tissue touching the grid edge counts as a border too.
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return dist / dist.sum()


def sample_centers(mask: np.ndarray, n: int, rng: np.random.Generator, weights: np.ndarray | None = None) -> np.ndarray:
    """n (row, col) crop centres drawn with probability `weights` (default center_weights(mask))."""
    p = center_weights(mask) if weights is None else weights
    flat = rng.choice(p.size, size=n, p=p.reshape(-1))
    return np.stack(np.unravel_index(flat, p.shape), axis=1)


def _window_start(center: int, extent: int, size: int) -> int:
    """First row/col of a `size` window around `center` on an axis of `extent` cells: inside the
    grid when the grid is larger than the window, else placed so the whole grid is inside it."""
    start = int(center) - size // 2
    if extent >= size:
        return min(max(start, 0), extent - size)
    return min(max(start, extent - size), 0)


def crop(grid: np.ndarray, mask: np.ndarray, center: tuple[int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The size x size window of a (C, H, W) grid and its (H, W) mask around `center`; cells outside
    the grid are zero (background) and False in the mask."""
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    c, h, w = grid.shape
    r0 = _window_start(center[0], h, size)
    c0 = _window_start(center[1], w, size)
    out = np.zeros((c, size, size), dtype=grid.dtype)
    out_mask = np.zeros((size, size), dtype=bool)
    # Overlap of the window [r0, r0 + size) with the grid [0, h), in both coordinate systems.
    gr0, gr1 = max(r0, 0), min(r0 + size, h)
    gc0, gc1 = max(c0, 0), min(c0 + size, w)
    out[:, gr0 - r0:gr1 - r0, gc0 - c0:gc1 - c0] = grid[:, gr0:gr1, gc0:gc1]
    out_mask[gr0 - r0:gr1 - r0, gc0 - c0:gc1 - c0] = mask[gr0:gr1, gc0:gc1]
    return out, out_mask


def random_crop(
    grid: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One R x R crop centred on a cell drawn in proportion to its distance from background."""
    center = sample_centers(mask, 1, rng)[0]
    return crop(grid, mask, (int(center[0]), int(center[1])), size)


def center_crop(grid: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic crop used for validation: around the tissue's centre of mass (the grid's
    centre without tissue); a small grid is padded to size x size with the grid in the middle."""
    if mask.any():
        rows, cols = np.nonzero(mask)
        center = (int(round(rows.mean())), int(round(cols.mean())))
    else:
        center = (grid.shape[1] // 2, grid.shape[2] // 2)
    if grid.shape[1] < size and grid.shape[2] < size:
        center = (grid.shape[1] // 2, grid.shape[2] // 2)
    return crop(grid, mask, center, size)


def dihedral(grid: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Transform k (0-7, nic.grids.dihedral numbering) of a (C, H, W) grid and its mask: moves cells
    only. Returns contiguous copies (torch cannot wrap negative strides)."""
    k = check_transform(k)
    if k == 0:
        return grid, mask
    g = np.ascontiguousarray(transform_image(grid, k, axes=(1, 2)))
    m = np.ascontiguousarray(transform_image(mask, k, axes=(0, 1)))
    return g, m
