"""Small pyramidal tiled TIFFs with known pixels and resolution, for tests (and the reader benchmark).

OpenSlide opens them as "generic-tiff" and reports openslide.mpp-x from XResolution/YResolution
with ResolutionUnit centimeter (pixels per cm = 10000 / mpp). Big synthetic slides come from
nic.synth; this helper is for images that fit in memory, plus a streaming single-level writer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

_COMPRESSIONS = {"jpeg": "jpeg", "none": None, "deflate": "zlib", "lzw": "lzw"}


def _tiff_kwargs(mpp: float | None, tile: int, compression: str, quality: int) -> dict:
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSIONS)}, got {compression!r}")
    kwargs: dict = {"tile": (tile, tile), "compression": _COMPRESSIONS[compression], "photometric": "rgb"}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": quality}
    if mpp is not None:
        kwargs["resolution"] = (10000.0 / mpp, 10000.0 / mpp)
        kwargs["resolutionunit"] = "CENTIMETER"
    else:
        kwargs["resolution"] = None
        kwargs["resolutionunit"] = "NONE"
    return kwargs


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level i is the image shrunk 2^i times by 2x2 area averaging (PIL reduce)."""
    out = [np.ascontiguousarray(image)]
    for _ in range(1, levels):
        out.append(np.asarray(Image.fromarray(out[-1]).reduce(2)))
    return out


def write_tiled_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    levels: int = 2,
    compression: str = "jpeg",
    quality: int = 90,
) -> Path:
    """Write `image` (H x W x 3 uint8) as a tiled pyramidal TIFF; level 0 has `mpp` um/px (None: no resolution)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(pyramid(image, levels)):
            level_mpp = None if mpp is None else mpp * image.shape[1] / level.shape[1]
            tif.write(level, subfiletype=1 if i else 0, **_tiff_kwargs(level_mpp, tile, compression, quality))
    return path


def write_tiled_tiff_streaming(
    path: str | Path,
    width: int,
    height: int,
    make_tile: Callable[[int, int], np.ndarray],
    mpp: float,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
) -> Path:
    """Single-level tiled TIFF whose tiles come from make_tile(ty, tx) -> (tile, tile, 3) uint8.

    Memory stays at one tile, so slides of any size can be written (BigTIFF when needed).
    """
    across, down = -(-width // tile), -(-height // tile)

    def tiles() -> Iterator[np.ndarray]:
        for ty in range(down):
            for tx in range(across):
                yield make_tile(ty, tx)

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
        tif.write(tiles(), shape=(height, width, 3), dtype=np.uint8, **_tiff_kwargs(mpp, tile, compression, quality))
    return path


def tissue_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An H&E-looking RGB texture: pink stroma with purple nuclei and pixel noise (realistic JPEG work)."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.random((height, width), dtype=np.float32), 6)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    nuclei = ndimage.gaussian_filter((rng.random((height, width)) > 0.995).astype(np.float32), 2.5) * 30
    nuclei = np.clip(nuclei, 0, 1)
    pink = np.array([235, 150, 200], np.float32)
    purple = np.array([90, 50, 140], np.float32)
    base = pink * (0.8 + 0.2 * field[..., None])
    rgb = base * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)
