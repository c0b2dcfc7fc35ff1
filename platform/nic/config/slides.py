"""Options that say how a slide becomes a grid of tiles; shared by `nic tile` and `nic compress`."""

from __future__ import annotations

from pydantic import Field

from nic.config.base import NicModel


class TissueOptions(NicModel):
    """Tissue detection on a low-resolution level (saturation + Otsu + morphology)."""

    identity_fields = frozenset({
        "mask_mpp", "min_saturation", "close_um", "min_object_um2", "fill_holes", "threshold",
    })

    mask_mpp: float = Field(
        8.0, gt=0, description="Resolution (um/px) the tissue mask is computed at (the closest level is used)."
    )
    min_saturation: float = Field(
        0.05, ge=0, le=1, description="Lower bound on the Otsu threshold of HSV saturation (0-1), so "
        "a nearly empty slide does not turn its background noise into tissue.",
    )
    close_um: float = Field(32.0, ge=0, description="Morphological closing radius, in um.")
    min_object_um2: float = Field(
        20000.0, ge=0, description="Tissue specks smaller than this area (um^2) are dropped."
    )
    fill_holes: bool = Field(True, description="Fill holes inside tissue regions.")
    threshold: float = Field(
        0.5, ge=0, le=1, description="A tile is kept when at least this fraction of it is tissue."
    )


class SlideOptions(NicModel):
    """Resolution and tile geometry."""

    identity_fields = frozenset({
        "target_mpp", "mpp_tolerance", "assume_mpp", "max_plausible_mpp", "tile_px", "tissue",
    })

    target_mpp: float = Field(0.5, gt=0, description="Working resolution in um/px (NIC uses 0.5).")
    mpp_tolerance: float = Field(
        0.1, ge=0, lt=1, description="Relative tolerance: a pyramid level within it counts as the target."
    )
    assume_mpp: float | None = Field(
        None, gt=0, description="Level-0 um/px to use when a slide has no usable resolution metadata."
    )
    max_plausible_mpp: float = Field(
        20.0, gt=0, description="Level-0 um/px above this is treated as absurd metadata (e.g. a DPI value)."
    )
    tile_px: int = Field(128, ge=8, description="Tile size in pixels at the working resolution.")
    tissue: TissueOptions = Field(default_factory=TissueOptions, description="Tissue detection.")
