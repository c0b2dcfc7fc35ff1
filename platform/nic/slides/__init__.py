"""Slides: opening them, their resolution, tile geometry, tissue detection and fast tile reading.

Stages (`nic tile`, `nic compress`) use only the names exported here.
"""

from nic.slides.errors import KINDS, SlideError
from nic.slides.geometry import TileGrid
from nic.slides.openers import open_slide, slide_vendor
from nic.slides.plan import SlidePlan, plan_slide
from nic.slides.reader import TileReader, read_tiles
from nic.slides.regions import composite_on_white, read_region_rgb
from nic.slides.resolution import ResolutionPlan, metadata_mpp, mpp_from_properties, resolve_resolution
from nic.slides.tissue import TissueMask, detect_tissue, tile_tissue_fractions

__all__ = [
    "KINDS",
    "ResolutionPlan",
    "SlideError",
    "SlidePlan",
    "TileGrid",
    "TileReader",
    "TissueMask",
    "composite_on_white",
    "detect_tissue",
    "metadata_mpp",
    "mpp_from_properties",
    "open_slide",
    "plan_slide",
    "read_region_rgb",
    "read_tiles",
    "resolve_resolution",
    "slide_vendor",
    "tile_tissue_fractions",
]
