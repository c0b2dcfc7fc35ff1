"""Reading a region through OpenSlide as plain RGB, with background white.

OpenSlide returns RGBA where pixels outside the scanned area are transparent (alpha 0, colour 0).
Dropping alpha would turn them black, which looks like very dark tissue to a model and to tissue
detection; OpenSlide-based pipelines composite onto white instead, and so do we, everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import openslide

from nic.slides.errors import SlideError


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(..., 4) uint8 RGBA (not premultiplied, as openslide-python returns it) -> (..., 3) RGB."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def read_region_rgb(
    slide: openslide.OpenSlide,
    location: tuple[int, int],
    level: int,
    size: tuple[int, int],
    path: str | Path | None = None,
) -> np.ndarray:
    """`slide.read_region` as an (h, w, 3) uint8 array on white; SlideError(unreadable) on failure.

    `location` is the level-0 (x, y) of the top-left pixel, `size` is (w, h) in level pixels.
    """
    name = path if path is not None else getattr(slide, "_filename", None)
    try:
        region = slide.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
    except openslide.OpenSlideError as exc:
        raise SlideError(name, f"pixels cannot be read ({exc})", "unreadable") from exc
    extrema = cast("tuple[tuple[float, float], ...]", region.getextrema())  # RGBA: (min, max) per band
    if extrema[3][0] == 255:  # fully opaque (the usual case): PIL's C conversion is fastest
        return np.asarray(region.convert("RGB"))
    return composite_on_white(np.asarray(region))
