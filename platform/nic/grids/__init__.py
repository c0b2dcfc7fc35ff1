"""The feature-grid format: one hive-partitioned Parquet dataset of tile rows plus a manifest.

Readers need only pyarrow: `load_grid(grids_dir, slide_id)` gives a dense (C, H, W) float32 grid
and its (H, W) tissue mask; `list_slides(grids_dir)` the compressed slides.

The names below are imported on first use (PEP 562), not with the package: `nic grids` registers
its commands from `nic.grids.cli` on every `nic --help`, and Ray workers import
`nic.grids.dihedral`; neither should pay for pandas and pyarrow (about half a second) before
they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "TRANSFORM_NAMES": "nic.grids.dihedral",
    "grid_shape": "nic.grids.dihedral",
    "transform_image": "nic.grids.dihedral",
    "transform_positions": "nic.grids.dihedral",
    "list_slides": "nic.grids.reader",
    "load_grid": "nic.grids.reader",
    "open_dataset": "nic.grids.reader",
    "read_grid_meta": "nic.grids.reader",
    "read_manifest": "nic.grids.reader",
    "verify_grid_file": "nic.grids.reader",
    "verify_store": "nic.grids.reader",
    "GridError": "nic.grids.schema",
    "GridMeta": "nic.grids.schema",
    "slide_file": "nic.grids.schema",
    "tile_schema": "nic.grids.schema",
}

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

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """Import the module defining `name` on first access and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
