"""Everything decided about one slide before any tile is read: resolution, grid, tissue, tiles.

The plan is small and picklable (no open handles), so a Ray task can make it and hand it to the
stage that writes the manifest, and a reader actor can later be built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nic.config.slides import SlideOptions
from nic.slides.errors import SlideError
from nic.slides.geometry import TileGrid
from nic.slides.openers import open_slide, slide_vendor
from nic.slides.resolution import ResolutionPlan, resolve_resolution
from nic.slides.tissue import TissueMask, detect_tissue, tile_tissue_fractions


@dataclass
class SlidePlan:
    """One slide's tile plan. `keep` marks tiles with at least `threshold` tissue."""

    path: str
    slide_id: str
    width: int
    height: int
    resolution: ResolutionPlan
    grid: TileGrid
    tissue: TissueMask
    fractions: np.ndarray
    keep: np.ndarray
    vendor: str
    threshold: float = 0.5

    @property
    def tile_count(self) -> int:
        """Number of kept (tissue) tiles."""
        return int(self.keep.sum())

    def tiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Kept tiles in row-major order: (rows int32, cols int32, x int64, y int64, tissue float32)."""
        rows, cols = np.nonzero(self.keep)  # row-major by construction
        x, y = self.grid.origins(rows, cols)
        return (
            rows.astype(np.int32),
            cols.astype(np.int32),
            x.astype(np.int64),
            y.astype(np.int64),
            self.fractions[rows, cols].astype(np.float32),
        )


def plan_slide(path: str | Path, options: SlideOptions, slide_id: str | None = None) -> SlidePlan:
    """Open a slide and plan its tiles; SlideError (with `kind`) when the slide cannot be used.

    Pixels are read (for the tissue mask) before the size check, so a corrupt slide reports
    "unreadable" rather than a secondary symptom. A slide without tissue is NOT an error here:
    it gets a plan with no kept tiles, and the caller decides what that means.
    """
    path = Path(path)
    slide = open_slide(path, verify=True)  # a DICOM folder holds one slide: checked once, here
    try:
        width, height = (int(v) for v in slide.dimensions)
        resolution = resolve_resolution(slide, options, path)
        tissue = detect_tissue(slide, options.tissue, resolution.base_mpp, path)
        grid = TileGrid(width, height, resolution.base_mpp, options.target_mpp, options.tile_px)
        if grid.rows == 0 or grid.cols == 0:
            raise SlideError(
                path,
                f"too small: {width} x {height} px at {resolution.base_mpp:.3g} um/px holds no "
                f"{options.tile_px} px tile at {options.target_mpp:g} um/px "
                f"({grid.level0_tile_size:.1f} level-0 px)",
                "too_small",
            )
        vendor = slide_vendor(slide)
    finally:
        slide.close()
    fractions = tile_tissue_fractions(tissue, grid)
    keep = fractions >= options.tissue.threshold
    return SlidePlan(
        path=str(path),
        slide_id=slide_id if slide_id is not None else path.stem,
        width=width,
        height=height,
        resolution=resolution,
        grid=grid,
        tissue=tissue,
        fractions=fractions,
        keep=keep,
        vendor=vendor,
        threshold=options.tissue.threshold,
    )
