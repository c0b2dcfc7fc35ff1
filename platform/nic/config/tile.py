"""Config of `nic tile`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from nic.config.base import LOCAL_PATH_FIELD, StageConfig
from nic.config.slides import SlideOptions


class TileConfig(StageConfig):
    # thumbnail_px: the overviews are previews; a changed size does not redo complete slides.
    identity_fields = frozenset({"slides", "slide"})
    execution_fields = frozenset({"out", "thumbnail_px", "strict", "overwrite"})

    slides: list[str] = Field(
        ..., min_length=1,
        description="Slide files, folders, glob patterns, or CSV files with a 'path' column (and optional 'slide_id'); "
                    "a folder of DICOM .dcm instances is one slide.",
        json_schema_extra=LOCAL_PATH_FIELD,
    )
    out: Path = Field(..., description="Output folder: per-slide tiles/*.parquet, thumbnails/*.png, slides.parquet.")
    slide: SlideOptions = Field(default_factory=SlideOptions, description="Resolution, tile size and tissue detection.")
    thumbnail_px: int = Field(1024, ge=64, description="Longest side of the thumbnail PNGs.")
    strict: bool = Field(False, description="Exit non-zero when any slide failed (default: only when none succeeded).")
    overwrite: bool = Field(False, description="Redo slides that are already complete instead of skipping them.")
