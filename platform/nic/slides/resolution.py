"""Resolution (um/px) of a slide and the pyramid level to read at the working resolution.

NIC needs every tile at the same physical scale (0.5 um/px), whatever the scanner. Metadata is
often missing or wrong (a DPI value stored as a resolution, 352.8 um/px), so we refuse what is not
plausible unless the user says what to assume, and we never read from a level coarser than the
target (that would lose detail the encoder was trained on), except when the slide has no finer
level at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import openslide

from nic.config.slides import SlideOptions
from nic.slides.errors import SlideError

MPP_SOURCE_METADATA = "metadata"
MPP_SOURCE_ASSUMED = "assumed"

_UM_PER_UNIT = {"centimeter": 10000.0, "inch": 25400.0}


@dataclass(frozen=True)
class ResolutionPlan:
    """How a slide is read at the working resolution.

    `scale` is level pixels per working pixel: 1.0 reads the level as is (`exact`), > 1 reads a
    larger region of the level and shrinks it, < 1 (only when no finer level exists) enlarges.
    """

    base_mpp: float
    mpp_source: str
    target_mpp: float
    level: int
    level_mpp: float
    level_downsample: float
    scale: float
    exact: bool
    note: str = ""
    mpp_origin: str = ""


def _finite_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def mpp_from_properties(props: Mapping[str, str]) -> tuple[float | None, str]:
    """Level-0 um/px from OpenSlide properties, and where it came from (or why it is missing).

    openslide.mpp-x/-y first (mean of both axes: scanners report nearly square pixels, and NIC
    uses one scale), then the TIFF resolution tags for files OpenSlide did not interpret.
    """
    mpp_x = _finite_float(props.get(openslide.PROPERTY_NAME_MPP_X))
    mpp_y = _finite_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
    values = [v for v in (mpp_x, mpp_y) if v is not None]
    if values:
        return sum(values) / len(values), "openslide.mpp-x/y"
    unit = (props.get("tiff.ResolutionUnit") or "").strip().lower()
    xres = _finite_float(props.get("tiff.XResolution"))
    yres = _finite_float(props.get("tiff.YResolution"))
    res = [v for v in (xres, yres) if v is not None and v > 0]
    if res and unit in _UM_PER_UNIT:
        return sum(_UM_PER_UNIT[unit] / v for v in res) / len(res), f"tiff.XResolution ({unit})"
    if res:
        return None, f"openslide.mpp-x missing; tiff.XResolution has no physical unit ({unit or 'none'})"
    return None, "openslide.mpp-x missing"


def metadata_mpp(slide: openslide.OpenSlide) -> tuple[float | None, str]:
    """`mpp_from_properties` of an open slide."""
    return mpp_from_properties(slide.properties)


def choose_level(level_mpps: list[float], target_mpp: float, tolerance: float) -> int:
    """The coarsest level not coarser than the target (within tolerance); the finest if none is."""
    limit = target_mpp * (1.0 + tolerance)
    candidates = [i for i, mpp in enumerate(level_mpps) if mpp <= limit]
    if candidates:
        return max(candidates, key=lambda i: level_mpps[i])
    return min(range(len(level_mpps)), key=lambda i: level_mpps[i])


def resolve_resolution(
    slide: openslide.OpenSlide, options: SlideOptions, path: str | Path | None = None
) -> ResolutionPlan:
    """Decide base um/px and the level to read; SlideError(no_mpp / bad_mpp) when unusable."""
    name = path if path is not None else getattr(slide, "_filename", None)
    mpp, origin = metadata_mpp(slide)
    source = MPP_SOURCE_METADATA
    note = ""
    if mpp is None:
        if options.assume_mpp is None:
            raise SlideError(
                name,
                f"no usable resolution metadata ({origin}); set slide.assume_mpp to the level-0 um/px",
                "no_mpp",
            )
        note = f"no resolution metadata ({origin}); assumed {options.assume_mpp:g} um/px. "
        mpp, source, origin = options.assume_mpp, MPP_SOURCE_ASSUMED, "slide.assume_mpp"
    elif mpp <= 0 or mpp > options.max_plausible_mpp:
        if options.assume_mpp is None:
            raise SlideError(
                name,
                f"resolution {mpp:.4g} um/px is not plausible (max {options.max_plausible_mpp:g}); "
                "set slide.assume_mpp",
                "bad_mpp",
            )
        note = f"metadata says {mpp:.4g} um/px ({origin}), not plausible; assumed {options.assume_mpp:g} um/px. "
        mpp, source, origin = options.assume_mpp, MPP_SOURCE_ASSUMED, "slide.assume_mpp"

    downsamples = [float(d) for d in slide.level_downsamples]
    level_mpps = [mpp * d for d in downsamples]
    target = options.target_mpp
    level = choose_level(level_mpps, target, options.mpp_tolerance)
    level_mpp = level_mpps[level]
    exact = abs(level_mpp - target) <= options.mpp_tolerance * target
    scale = 1.0 if exact else target / level_mpp
    if not exact and scale < 1.0:
        note += (
            f"no level is as fine as {target:g} um/px (finest {level_mpp:.4g}); "
            f"tiles are upsampled x{1 / scale:.3g}"
        )
    elif not exact:
        note += f"level {level} ({level_mpp:.4g} um/px) is read and downsampled x{scale:.3g}"
    return ResolutionPlan(
        base_mpp=float(mpp),
        mpp_source=source,
        target_mpp=float(target),
        level=level,
        level_mpp=float(level_mpp),
        level_downsample=downsamples[level],
        scale=float(scale),
        exact=bool(exact),
        note=note.strip(),
        mpp_origin=origin,
    )
