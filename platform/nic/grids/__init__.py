"""The feature-grid format: one hive-partitioned Parquet dataset of tile rows plus a manifest.

Readers need only pyarrow: `load_grid(grids_dir, slide_id)` gives a dense (C, H, W) float32 grid
and its (H, W) tissue mask; `list_slides(grids_dir)` the compressed slides.
"""

from nic.grids.dihedral import TRANSFORM_NAMES, grid_shape, transform_image, transform_positions
from nic.grids.reader import (
    list_slides,
    load_grid,
    open_dataset,
    read_grid_meta,
    read_manifest,
    verify_grid_file,
    verify_store,
)
from nic.grids.schema import GridError, GridMeta, slide_file, tile_schema

__all__ = [
    "TRANSFORM_NAMES",
    "GridError",
    "GridMeta",
    "grid_shape",
    "list_slides",
    "load_grid",
    "open_dataset",
    "read_grid_meta",
    "read_manifest",
    "slide_file",
    "tile_schema",
    "transform_image",
    "transform_positions",
    "verify_grid_file",
    "verify_store",
]
