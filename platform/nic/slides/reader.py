"""Reading NIC tiles (tile_px x tile_px RGB at the working resolution) fast.

Two paths, same pixels:
- direct: when the chosen level is at the target resolution and is stored as tiles we can decode
  ourselves (tiled JPEG/lossless TIFF or SVS), file tiles are decoded once each and NIC tiles are
  cut out with numpy (see tiffdirect). This is the common case and several times faster than
  OpenSlide's read_region per tile.
- region: otherwise, requested tiles are grouped into square blocks, each read with ONE OpenSlide
  read_region (fewer calls, each file tile decoded once) and split; when the level is not at the
  target resolution each tile is resampled with PIL (box filter = area average when shrinking).
Background (alpha 0 in OpenSlide) is white on both paths.

Tile positions come from TileGrid (level-0 origins). On a level at the target, the tile's
top-left level pixel is round(x / level_downsample) and the tile is read on the level's own pixel
lattice without resampling; elsewhere the exact fractional position is resampled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from nic.slides.geometry import TileGrid
from nic.slides.openers import open_slide
from nic.slides.regions import composite_on_white, read_region_rgb
from nic.slides.resolution import ResolutionPlan
from nic.slides.tiffdirect import DirectLevel, open_direct_level

__all__ = ["TileReader", "composite_on_white", "read_region_rgb"]

DEFAULT_CACHE_BYTES = 128 * 1024 * 1024
#: Side (level pixels) of the square OpenSlide regions read at once on the region path.
DEFAULT_MAX_REGION_PX = 1024
#: Extra level pixels around a resampled region, so filters never see a cut edge.
_RESAMPLE_MARGIN = 4


def _round_half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(values + 0.5).astype(np.int64)


class TileReader:
    """Reads tiles of one slide; use as a context manager or call close(). Not thread-safe.

    `mode` says which path it uses ("direct" or "region"), `direct_reason` why not direct.

    `direct`: None = use the direct path when possible; False = always OpenSlide regions;
    True = require the direct path (ValueError saying why when it is not possible).
    """

    def __init__(
        self,
        path: str | Path,
        resolution: ResolutionPlan,
        grid: TileGrid,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        direct: bool | None = None,
        max_region_px: int = DEFAULT_MAX_REGION_PX,
    ):
        self.path = str(path)
        if not (
            math.isclose(grid.base_mpp, resolution.base_mpp, rel_tol=1e-9)
            and math.isclose(grid.target_mpp, resolution.target_mpp, rel_tol=1e-9)
        ):
            raise ValueError(
                f"{self.path}: grid ({grid.base_mpp} -> {grid.target_mpp} um/px) and resolution plan "
                f"({resolution.base_mpp} -> {resolution.target_mpp} um/px) disagree"
            )
        self.resolution = resolution
        self.grid = grid
        self.tile_px = grid.tile_px
        self.max_region_px = max_region_px
        self._closed = False
        self._direct: DirectLevel | None = None
        self.direct_reason = "disabled"
        slide = open_slide(path)
        try:
            levels = slide.level_count
            if not 0 <= resolution.level < levels:
                raise ValueError(
                    f"{self.path}: resolution plan reads level {resolution.level}, the slide has {levels} level(s)"
                )
            if direct is not False:
                if resolution.exact:
                    self._direct, self.direct_reason = open_direct_level(
                        self.path, slide, resolution.level, cache_bytes
                    )
                else:
                    self.direct_reason = "the level is not at the target resolution (resampling needed)"
                if direct is True and self._direct is None:
                    raise ValueError(f"{self.path}: direct tile reading not possible: {self.direct_reason}")
        except BaseException:
            slide.close()
            raise
        # The direct path never needs OpenSlide again: free its handle and tile cache.
        if self._direct is not None:
            slide.close()
            self._slide = None
        else:
            self._slide = slide
        self.mode = "direct" if self._direct is not None else "region"

    @classmethod
    def from_plan(cls, plan, **kwargs) -> TileReader:
        """A reader for a SlidePlan (anything with path, resolution and grid)."""
        return cls(plan.path, plan.resolution, plan.grid, **kwargs)

    @property
    def stats(self):
        """Decode/cache counters of the direct path (None on the region path)."""
        return self._direct.stats if self._direct is not None else None

    def close(self) -> None:
        """Release file handles and caches; reading afterwards raises."""
        self._closed = True
        if self._direct is not None:
            self._direct.close()
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, rows, cols) -> np.ndarray:
        """Tiles (rows[i], cols[i]) as (N, P, P, 3) uint8 RGB, in the order given.

        Raises SlideError(kind="unreadable") naming the file when pixels cannot be decoded.
        """
        if self._closed:
            raise RuntimeError(f"{self.path}: TileReader is closed")
        rows = np.asarray(rows, dtype=np.int64).ravel()
        cols = np.asarray(cols, dtype=np.int64).ravel()
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols differ in length ({rows.size} vs {cols.size})")
        size = self.tile_px
        out = np.empty((rows.size, size, size, 3), np.uint8)
        if rows.size == 0:
            return out
        bad = (rows < 0) | (rows >= self.grid.rows) | (cols < 0) | (cols >= self.grid.cols)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise IndexError(
                f"{self.path}: tile ({rows[i]}, {cols[i]}) is outside the {self.grid.rows} x {self.grid.cols} grid"
            )
        x, y = self.grid.origins(rows, cols)
        ds = self.resolution.level_downsample
        if self._direct is not None:
            self._direct.read_windows(_round_half_up(x / ds), _round_half_up(y / ds), size, out)
        else:
            self._read_regions(rows, cols, x, y, out)
        return out

    def _read_regions(self, rows, cols, x, y, out: np.ndarray) -> None:
        res = self.resolution
        ds = res.level_downsample
        span = self.tile_px * res.scale  # level pixels per tile
        if res.exact:
            fx = _round_half_up(x / ds).astype(np.float64)
            fy = _round_half_up(y / ds).astype(np.float64)
            margin = 0
        else:
            fx, fy = x / ds, y / ds
            margin = _RESAMPLE_MARGIN
        # Square blocks of k x k grid cells: one OpenSlide call each. Square regions decode each
        # file tile once per call; rows of tiles would decode each file tile row twice or more.
        k = max(1, int(self.max_region_px // max(span, 1.0)))
        block = (rows // k) * (self.grid.cols // k + 1) + cols // k
        order = np.argsort(block, kind="stable")
        breaks = np.flatnonzero(np.diff(block[order])) + 1
        for group in np.split(order, breaks):
            self._read_block(group, fx, fy, span, margin, out)

    def _read_block(self, idx: np.ndarray, fx, fy, span: float, margin: int, out: np.ndarray) -> None:
        """One OpenSlide region over the bounding box of some tiles, split (and resampled) into them."""
        if self._slide is None:  # region mode keeps the handle until close()
            raise RuntimeError(f"{self.path}: tiles read after the reader was closed")
        res = self.resolution
        ds = res.level_downsample
        size = self.tile_px
        xs, ys = fx[idx], fy[idx]
        rx0 = math.floor(xs.min()) - margin
        ry0 = math.floor(ys.min()) - margin
        rx1 = math.ceil(xs.max() + span) + margin
        ry1 = math.ceil(ys.max() + span) + margin
        loc = (round(rx0 * ds), round(ry0 * ds))
        # OpenSlide starts the region at level pixel loc / ds (fractional for odd downsamples).
        bx, by = loc[0] / ds, loc[1] / ds
        region = read_region_rgb(self._slide, loc, res.level, (rx1 - rx0, ry1 - ry0), self.path)
        if res.exact:
            for j, i in enumerate(idx.tolist()):
                ox, oy = int(round(xs[j] - bx)), int(round(ys[j] - by))
                out[i] = region[oy : oy + size, ox : ox + size]
            return
        image = Image.fromarray(region)
        resample = Image.Resampling.BOX if res.scale > 1 else Image.Resampling.BICUBIC
        for j, i in enumerate(idx.tolist()):
            left, upper = xs[j] - bx, ys[j] - by
            out[i] = np.asarray(image.resize((size, size), resample, box=(left, upper, left + span, upper + span)))


def read_tiles(path: str | Path, resolution: ResolutionPlan, grid: TileGrid, rows, cols, **kwargs) -> np.ndarray:
    """One-shot convenience: open a TileReader, read, close."""
    with TileReader(path, resolution, grid, **kwargs) as reader:
        return reader.read(rows, cols)
