"""Tile geometry: the ONE place that maps grid cells (row, col) to level-0 pixels and back.

A tile is `tile_px` pixels at the working resolution, i.e. `level0_tile_size` level-0 pixels,
which is rarely a whole number (0.499 um/px scanners, 0.25 -> 0.5 um/px, ...). Tile origins are
therefore rounded from the exact positions `c * level0_tile_size` (never accumulated), so errors
do not grow across a 100k px slide, and `index` is the exact inverse of that rounding.
Only whole tiles count: a slide narrower than one tile has 0 columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-9


def _round_half_up(values: np.ndarray) -> np.ndarray:
    """Round x.5 up (not to even), so origins do not jitter between neighbouring tiles."""
    return np.floor(values + 0.5).astype(np.int64)


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping tiles of `tile_px` working pixels over a level-0 image."""

    width: int
    height: int
    base_mpp: float
    target_mpp: float
    tile_px: int
    level0_tile_size: float = field(init=False)
    rows: int = field(init=False)
    cols: int = field(init=False)

    def __post_init__(self) -> None:
        if self.width < 0 or self.height < 0:
            raise ValueError(f"TileGrid: negative slide size {self.width} x {self.height}")
        if not (self.base_mpp > 0 and self.target_mpp > 0):
            raise ValueError(f"TileGrid: um/px must be > 0 (base {self.base_mpp}, target {self.target_mpp})")
        if self.tile_px < 1:
            raise ValueError(f"TileGrid: tile_px must be >= 1, got {self.tile_px}")
        size = self.tile_px * self.target_mpp / self.base_mpp
        object.__setattr__(self, "level0_tile_size", float(size))
        object.__setattr__(self, "cols", int(math.floor(self.width / size + _EPS)))
        object.__setattr__(self, "rows", int(math.floor(self.height / size + _EPS)))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def _origin_1d(self, cells: np.ndarray | np.integer) -> np.ndarray:
        return _round_half_up(np.asarray(cells, dtype=np.float64) * self.level0_tile_size)

    def _index_1d(self, coords: np.ndarray | np.integer) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.int64)
        cells = np.ceil((coords + 0.5) / self.level0_tile_size).astype(np.int64) - 1
        # Division rounding can be off by one ulp at a boundary: fix against the origins themselves.
        cells += (self._origin_1d(cells + 1) <= coords).astype(np.int64)
        cells -= (self._origin_1d(cells) > coords).astype(np.int64)
        return cells

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Level-0 (x, y) of the top-left pixel of tile (row, col)."""
        return int(self._origin_1d(np.int64(col))), int(self._origin_1d(np.int64(row)))

    def origins(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `origin`: (x, y) int64 arrays for arrays of rows and cols."""
        return self._origin_1d(cols), self._origin_1d(rows)

    def index(self, x: int, y: int) -> tuple[int, int]:
        """(row, col) of the tile that holds level-0 pixel (x, y); may be outside [0, rows) x [0, cols)."""
        return int(self._index_1d(np.int64(y))), int(self._index_1d(np.int64(x)))

    def indices(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `index`: (rows, cols) int64 arrays."""
        return self._index_1d(ys), self._index_1d(xs)

    def col_origins(self) -> np.ndarray:
        """Level-0 x of every column's left edge, shape (cols,)."""
        return self._origin_1d(np.arange(self.cols))

    def row_origins(self) -> np.ndarray:
        """Level-0 y of every row's top edge, shape (rows,)."""
        return self._origin_1d(np.arange(self.rows))

    def all_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) int32 arrays of every tile in row-major order."""
        rr, cc = np.meshgrid(
            np.arange(self.rows, dtype=np.int32), np.arange(self.cols, dtype=np.int32), indexing="ij"
        )
        return rr.ravel(), cc.ravel()
