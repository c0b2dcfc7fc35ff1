"""The 8 rotations/flips of NIC's training-time augmentation, for tile pixels and grid positions.

Transform k (0-7): flip left-right first when k >= 4, then rotate k % 4 quarter turns
counter-clockwise (numpy's rot90). Applying transform k to every tile's pixels *and* moving each
tile to its transformed grid position gives exactly the grid of the transformed slide, which is
what a grid CNN should see when it is trained on rotated slides: rotating only the grid would keep
each tile's features in the original orientation. (Exactly so when the slide's sides are whole
multiples of the tile; otherwise the 8 grids share the identity grid's tiles, while a rotated scan
would anchor its grid at another corner.)
"""

from __future__ import annotations

import numpy as np

TRANSFORM_NAMES = (
    "identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270",
)
ALL_TRANSFORMS = tuple(range(8))


def check_transform(k: int) -> int:
    if int(k) not in ALL_TRANSFORMS:
        raise ValueError(f"transform must be 0-7 ({', '.join(TRANSFORM_NAMES)}), got {k!r}")
    return int(k)


def transform_image(image: np.ndarray, k: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """`image` under transform k; `axes` are its (row, column) axes, e.g. (1, 2) for (N, P, P, 3)."""
    k = check_transform(k)
    if k >= 4:
        image = np.flip(image, axis=axes[1])
    return np.rot90(image, k % 4, axes=axes)


def grid_shape(rows: int, cols: int, k: int) -> tuple[int, int]:
    """Shape of a rows x cols grid under transform k."""
    return (cols, rows) if check_transform(k) % 2 else (rows, cols)


def transform_positions(
    rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where cells (rows, cols) of a grid of `shape` land under transform k (same rule as
    transform_image, so transform_image(A, k)[r', c'] == A[r, c])."""
    k = check_transform(k)
    h, w = shape
    r = np.asarray(rows, dtype=np.int64)
    c = np.asarray(cols, dtype=np.int64)
    if k >= 4:
        c = w - 1 - c
    for _ in range(k % 4):
        # One counter-clockwise quarter turn: B[i, j] = A[j, w - 1 - i], so A's (r, c) goes to
        # (w - 1 - c, r) and the grid becomes w x h.
        r, c = w - 1 - c, r
        h, w = w, h
    return r, c
