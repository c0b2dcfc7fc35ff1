"""Direct access to the stored tiles of one pyramid level of a tiled TIFF/SVS.

OpenSlide decodes a file tile, paints it through cairo into a premultiplied ARGB buffer, which
openslide-python converts to an RGBA PIL image; for 128 px NIC tiles that per-call work costs more
than the JPEG decode itself. Here we decode the file's own tiles with imagecodecs (through
tifffile, which applies the JPEGTables and the colour space of the TIFF's photometric tag exactly
as OpenSlide does), keep recently decoded tiles in a small LRU cache so neighbouring NIC tiles that
share a file tile decode it once, and cut windows out with numpy slicing.

Only layouts where this is known to give OpenSlide's pixels are accepted (see `open_direct_level`);
anything else is read through OpenSlide by the caller.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import tifffile

from nic.slides.errors import SlideError

#: TIFF compressions decoded directly. JPEG (7) is checked pixel for pixel against OpenSlide in
#: the tests; the others are lossless. Aperio JPEG 2000 (33003/33005) is left to OpenSlide, whose
#: YCbCr conversion for it we have not verified.
DIRECT_COMPRESSIONS = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate"}
#: OpenSlide formats whose levels are plain TIFF directories with no overlaps or offsets.
DIRECT_VENDORS = {"aperio", "generic-tiff"}
_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR = 2, 6


@dataclass
class DirectStats:
    """Counters that show whether the cache works (decodes should equal distinct file tiles)."""

    decoded: int = 0
    cache_hits: int = 0


def _page_problem(page: tifffile.TiffPage) -> str | None:
    """Why a page cannot be decoded directly, or None when it can."""
    if not page.is_tiled or page.tiledepth != 1:
        return "not tiled"
    if int(page.compression) not in DIRECT_COMPRESSIONS:
        return f"compression {int(page.compression)}"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or page.planarconfig != 1:
        return "not 8-bit interleaved RGB"
    photometric = int(page.photometric)
    if photometric == _PHOTOMETRIC_YCBCR and int(page.compression) != 7:
        return "YCbCr without JPEG"
    if photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return f"photometric {photometric}"
    return None


class DirectLevel:
    """Decoded windows of one TIFF page (a pyramid level), through an LRU cache of file tiles."""

    def __init__(self, path: str | Path, tif: tifffile.TiffFile, page: tifffile.TiffPage, cache_bytes: int):
        self.path = str(path)
        self._tif = tif
        self._fd = os.open(self.path, os.O_RDONLY)
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        self.tiles_across = -(-self.width // self.tile_w)
        self.tiles_down = -(-self.height // self.tile_h)
        self.compression = DIRECT_COMPRESSIONS[int(page.compression)]
        self._offsets = [int(o) for o in page.dataoffsets]
        self._counts = [int(c) for c in page.databytecounts]
        self._decode = page.decode
        self._tables = page.jpegtables
        self._capacity = max(4, int(cache_bytes) // (self.tile_w * self.tile_h * 3))
        self._cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self.stats = DirectStats()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tif.close()
        self._cache.clear()

    def tile(self, tx: int, ty: int) -> np.ndarray | None:
        """File tile (tx, ty) as (h, w, 3), clipped to the image; None for a tile with no data."""
        key = ty * self.tiles_across + tx
        cache = self._cache
        if key in cache:
            cache.move_to_end(key)
            self.stats.cache_hits += 1
            return cache[key]
        arr = self._decode_tile(key, tx, ty)
        cache[key] = arr
        if len(cache) > self._capacity:
            cache.popitem(last=False)
        return arr

    def _decode_tile(self, key: int, tx: int, ty: int) -> np.ndarray | None:
        count = self._counts[key] if key < len(self._counts) else 0
        if count == 0:
            return None  # OpenSlide shows a missing tile as transparent: white for us
        try:
            data = os.pread(self._fd, count, self._offsets[key])
            decoded, _, _ = self._decode(data, key, jpegtables=self._tables)
        except Exception as exc:  # imagecodecs/tifffile raise many types for corrupt data
            raise SlideError(
                self.path, f"pixels cannot be read ({exc}) in file tile ({tx}, {ty})", "unreadable"
            ) from exc
        if decoded is None:  # tifffile decodes nothing: as unreadable as a decoding error
            raise SlideError(self.path, f"pixels cannot be read (file tile ({tx}, {ty}) decodes to nothing)",
                                   "unreadable")
        self.stats.decoded += 1
        h = min(self.tile_h, self.height - ty * self.tile_h)
        w = min(self.tile_w, self.width - tx * self.tile_w)
        arr = decoded[0, :h, :w, :3]
        if arr.shape[0] != h or arr.shape[1] != w:
            raise SlideError(
                self.path,
                f"pixels cannot be read (file tile ({tx}, {ty}) decodes to {arr.shape[1]} x {arr.shape[0]} px, "
                f"expected {w} x {h})",
                "unreadable",
            )
        return arr

    def read_windows(self, xs: np.ndarray, ys: np.ndarray, size: int, out: np.ndarray) -> None:
        """Fill out[i] with the size x size window at level pixel (xs[i], ys[i]); outside is white.

        Windows are visited in file-tile order so each file tile is decoded once per call even if
        the cache is small; `out` keeps the caller's order.
        """
        tw, th, width, height = self.tile_w, self.tile_h, self.width, self.height
        order = np.lexsort((xs // tw, ys // th))
        for i in order.tolist():
            x0, y0 = int(xs[i]), int(ys[i])
            x1, y1 = x0 + size, y0 + size
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
            dest = out[i]
            if cx0 >= cx1 or cy0 >= cy1:
                dest.fill(255)
                continue
            if cx0 != x0 or cy0 != y0 or cx1 != x1 or cy1 != y1:
                dest.fill(255)
            for ty in range(cy0 // th, (cy1 - 1) // th + 1):
                ty0 = ty * th
                sy0, sy1 = max(cy0, ty0), min(cy1, ty0 + th)
                for tx in range(cx0 // tw, (cx1 - 1) // tw + 1):
                    tx0 = tx * tw
                    sx0, sx1 = max(cx0, tx0), min(cx1, tx0 + tw)
                    src = self.tile(tx, ty)
                    if src is None:
                        dest[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = 255
                    else:
                        dest[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = src[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]


def open_direct_level(
    path: str | Path, slide: openslide.OpenSlide, level: int, cache_bytes: int
) -> tuple[DirectLevel | None, str]:
    """A DirectLevel for `level` of `slide`, or (None, why not) when OpenSlide must be used."""
    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
    if vendor not in DIRECT_VENDORS:
        return None, f"format {vendor}"
    want = tuple(int(v) for v in slide.level_dimensions[level])
    try:
        tif = tifffile.TiffFile(os.fspath(path))
    except Exception as exc:  # not readable as TIFF by tifffile: OpenSlide still can
        return None, f"tifffile cannot parse it ({exc})"
    try:
        for page in tif.pages:
            if not isinstance(page, tifffile.TiffPage):  # frames only with pages.useframes, never set here
                continue
            if (int(page.imagewidth), int(page.imagelength)) != want or not page.is_tiled:
                continue
            problem = _page_problem(page)
            if problem is not None:
                tif.close()
                return None, problem
            return DirectLevel(path, tif, page, cache_bytes), ""
    except Exception as exc:
        tif.close()
        return None, f"tifffile cannot parse it ({exc})"
    tif.close()
    return None, "no TIFF page matches the level"
