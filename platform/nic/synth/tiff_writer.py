"""Streaming writer of pyramidal, tiled-JPEG TIFF slides that OpenSlide opens as generic TIFF.

A gigapixel slide (100,000 x 100,000 px is 30 GB of RGB) never fits in memory, so the writer pulls
level-0 pixels from a callback one band of tile rows at a time, JPEG-encodes each tile, and builds
every lower pyramid level on the fly from 2 x 2 means of the band above it. The lower levels'
encoded tiles are spooled to a temporary file next to the output and copied in after level 0, so
memory stays at a few bands (a few hundred MB for a 100k-wide slide) whatever the slide's size.

File layout (what OpenSlide 4's generic-tiff driver reads): one full-resolution TIFF directory per
pyramid level, in decreasing size, each tiled (`tile_size` px) and JPEG-compressed (YCbCr 4:2:0,
like Aperio), no SubIFDs. The resolution is stored as XResolution/YResolution in pixels per
centimetre with ResolutionUnit = centimetre, which OpenSlide turns into `openslide.mpp-x/y`.
No DateTime tag and a fixed Software tag, so the same pixels always give the same bytes.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np
import tifffile

TileFn = Callable[[int, int, int, int], np.ndarray]
"""`tile_fn(y0, x0, h, w)` -> uint8 array (h, w, 3): level-0 pixels of that region."""

SOFTWARE = "nic.synth"
_JPEG_SUBSAMPLING = (2, 2)
# A classic TIFF addresses at most 4 GiB; above this raw size the file may exceed it once encoded.
_BIGTIFF_RAW_BYTES = 2**32 - 2**26


def pyramid_dimensions(width: int, height: int, min_level_px: int = 1024) -> list[tuple[int, int]]:
    """(width, height) of every level: halve (rounding up) until the largest side is <= min_level_px."""
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width} x {height}")
    dims = [(width, height)]
    while max(dims[-1]) > min_level_px:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def _downsample2(band: np.ndarray) -> np.ndarray:
    """2 x 2 box mean of a uint8 (h, w, 3) band; an odd last row/column is replicated first."""
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # View pixel pairs as 6 channels: two contiguous row adds, then one add of the halves.
    # (numpy's reduce over a reshaped (h/2, 2, w/2, 2, 3) view is ~10x slower.)
    pairs = np.ascontiguousarray(band).reshape(band.shape[0] // 2, 2, band.shape[1] // 2, 6)
    acc = pairs[:, 0].astype(np.uint16)
    acc += pairs[:, 1]
    out = acc[..., :3] + acc[..., 3:]
    out += 2
    out >>= 2
    return out.astype(np.uint8)


@dataclass
class _LevelSpool:
    """Encoded tiles of one lower level, appended to a temporary file in TIFF tile order."""

    width: int
    height: int
    handle: object = None
    sizes: list[int] = field(default_factory=list)
    pending: list[np.ndarray] = field(default_factory=list)  # rows not yet a full tile row
    pending_rows: int = 0
    rows_done: int = 0


class _Encoder:
    """JPEG-encodes tiles exactly as tifffile would for compression='jpeg', photometric='rgb'."""

    def __init__(self, tile_size: int, quality: int, pool: ThreadPoolExecutor | None):
        self.tile_size = tile_size
        self.quality = quality
        self.pool = pool

    def encode_one(self, tile: np.ndarray) -> bytes:
        return bytes(imagecodecs.jpeg8_encode(
            tile,
            level=self.quality,
            colorspace="RGB",
            outcolorspace="YCBCR",
            subsampling=_JPEG_SUBSAMPLING,
        ))  # bytes() of bytes is the same object: no copy

    def encode_band(self, band: np.ndarray) -> list[bytes]:
        """Encode one tile row (band height <= tile size), padding edge tiles by replication."""
        t = self.tile_size
        h, w = band.shape[:2]
        ntx = math.ceil(w / t)
        pad_h, pad_w = t - h, ntx * t - w
        if pad_h or pad_w:
            band = np.pad(band, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        tiles = [np.ascontiguousarray(band[:, i * t : (i + 1) * t]) for i in range(ntx)]
        if self.pool is None or len(tiles) < 2:
            return [self.encode_one(tile) for tile in tiles]
        return list(self.pool.map(self.encode_one, tiles))


def _render_band(
    tile_fn: TileFn, y0: int, h: int, width: int, region_width: int, pool: ThreadPoolExecutor | None
) -> np.ndarray:
    """Level-0 rows [y0, y0 + h) from `tile_fn`, asked for regions at most `region_width` wide."""
    xs = list(range(0, width, region_width))

    def one(x0: int) -> np.ndarray:
        w = min(region_width, width - x0)
        region = tile_fn(y0, x0, h, w)
        region = np.asarray(region)
        if region.shape != (h, w, 3) or region.dtype != np.uint8:
            raise ValueError(
                f"tile_fn({y0}, {x0}, {h}, {w}) returned {region.dtype} {region.shape}, "
                f"expected uint8 {(h, w, 3)}"
            )
        return region

    parts = list(pool.map(one, xs)) if pool is not None and len(xs) > 1 else [one(x0) for x0 in xs]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def write_pyramidal_tiff(
    path: str | Path,
    width: int,
    height: int,
    tile_fn: TileFn,
    mpp: float,
    tile_size: int = 256,
    quality: int = 90,
    min_level_px: int = 1024,
    region_width: int = 4096,
    workers: int = 1,
    description: str | None = None,
) -> list[tuple[int, int]]:
    """Write a pyramidal tiled-JPEG TIFF of `width` x `height` level-0 px at `mpp` um/px.

    `tile_fn(y0, x0, h, w)` is called band by band (h <= tile_size rows, w <= region_width
    columns, both multiples of tile_size except at the slide's edge) and never for the whole
    slide, so the slide may be far larger than memory. `workers` > 1 renders the regions of a band
    and encodes its tiles on that many threads (useful for one big slide; tile_fn must then be
    thread-safe). The file is written in place: wrap the call in `nic.artifacts.atomic_path` to
    publish it atomically. Returns the (width, height) of every level written.
    """
    path = Path(path)
    _check_options(tile_size, quality, mpp)
    region_width = max(tile_size, (region_width // tile_size) * tile_size)
    dims = pyramid_dimensions(width, height, min_level_px)
    raw_bytes = sum(w * h * 3 for w, h in dims)
    bigtiff = raw_bytes > _BIGTIFF_RAW_BYTES

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    spool_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.spool.tmp")
    try:
        with open(spool_path, "w+b") as spool_file:
            pyramid = _Pyramid(dims, tile_fn, tile_size, region_width, _Encoder(tile_size, quality, pool), pool,
                               spool_file)
            with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
                for level, (w, h) in enumerate(dims):
                    level_mpp = mpp * (width / w)
                    tiles = pyramid.level0_tiles() if level == 0 else pyramid.spooled_tiles(level)
                    tif.write(
                        tiles,
                        shape=(h, w, 3),
                        dtype=np.uint8,
                        tile=(tile_size, tile_size),
                        photometric="rgb",
                        compression="jpeg",
                        compressionargs={"level": quality},
                        subsampling=_JPEG_SUBSAMPLING,
                        resolution=(1e4 / level_mpp, 1e4 / (mpp * (height / h))),
                        resolutionunit="CENTIMETER",
                        subfiletype=0 if level == 0 else 1,
                        description=description if level == 0 else None,
                        metadata=None,
                        software=SOFTWARE,
                        datetime=False,
                    )
                    if level > 0:
                        pyramid.check_level(path, level)
    finally:
        if pool is not None:
            pool.shutdown()
        if spool_path.exists():
            os.unlink(spool_path)
    return dims


def _check_options(tile_size: int, quality: int, mpp: float) -> None:
    """Refuse settings that would give a file OpenSlide misreads (or none), before any pixel is
    rendered: a slide can take minutes to render."""
    if tile_size % 16 or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive multiple of 16 (JPEG 4:2:0 blocks), got {tile_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")


class _Pyramid:
    """The tiles of every level of one slide, in the order tifffile writes them: level 0 rendered
    band by band from `tile_fn`, each band cascading 2 x 2 means down the levels below as it goes
    (`push`), whose encoded tiles wait in `spool_file` until their directory is written. One object
    rather than closures so that each step (render, cascade, replay, check) has a name."""

    def __init__(self, dims: list[tuple[int, int]], tile_fn: TileFn, tile_size: int, region_width: int,
                 encoder: _Encoder, pool: ThreadPoolExecutor | None, spool_file: BinaryIO) -> None:
        self.dims, self.tile_fn, self.tile_size, self.region_width = dims, tile_fn, tile_size, region_width
        self.encoder, self.pool, self.spool_file = encoder, pool, spool_file
        self.spools = [_LevelSpool(w, h) for w, h in dims[1:]]
        for spool in self.spools:
            spool.handle = spool_file
        self.offsets: list[list[int]] = [[] for _ in self.spools]

    def push(self, level: int, rows: np.ndarray, last: bool) -> None:
        """Append level-`level` (>= 1) rows; encode full tile rows; cascade downwards."""
        tile_size, spool_file = self.tile_size, self.spool_file
        spool = self.spools[level - 1]
        spool.pending.append(rows)
        spool.pending_rows += rows.shape[0]
        while spool.pending_rows >= tile_size or (last and spool.pending_rows > 0):
            band = np.concatenate(spool.pending, axis=0) if len(spool.pending) > 1 else spool.pending[0]
            take = min(tile_size, band.shape[0])
            head, rest = band[:take], band[take:]
            spool.pending = [rest] if rest.shape[0] else []
            spool.pending_rows = rest.shape[0]
            for data in self.encoder.encode_band(head):
                self.offsets[level - 1].append(spool_file.tell())
                spool.sizes.append(len(data))
                spool_file.write(data)
            spool.rows_done += take
            is_last = last and spool.pending_rows == 0
            if level < len(self.dims) - 1:
                self.push(level + 1, _downsample2(head), is_last)

    def level0_tiles(self) -> Iterator[bytes]:
        """Level 0's encoded tiles, rendered one band of tile rows at a time (the lower levels are
        filled in passing, so they are complete when level 0's last tile has been taken)."""
        width, height = self.dims[0]
        for y0 in range(0, height, self.tile_size):
            h = min(self.tile_size, height - y0)
            band = _render_band(self.tile_fn, y0, h, width, self.region_width, self.pool)
            encoded = self.encoder.encode_band(band)
            # Cascade before yielding: tifffile stops pulling after the last tile, so
            # work placed after the final yield would never run.
            if len(self.dims) > 1:
                self.push(1, _downsample2(band), last=y0 + h >= height)
            del band
            yield from encoded

    def spooled_tiles(self, level: int) -> Iterator[bytes]:
        """A lower level's encoded tiles, read back from the spool in TIFF tile order."""
        for offset, size in zip(self.offsets[level - 1], self.spools[level - 1].sizes):
            self.spool_file.seek(offset)
            yield self.spool_file.read(size)

    def check_level(self, path: Path, level: int) -> None:
        """Fail loudly when a lower level got another number of tiles than its size needs: the
        cascade's bookkeeping went wrong, and the file would be a corrupt pyramid."""
        w, h = self.dims[level]
        expected = math.ceil(w / self.tile_size) * math.ceil(h / self.tile_size)
        if len(self.spools[level - 1].sizes) != expected:
            raise RuntimeError(
                f"{path}: level {level} has {len(self.spools[level - 1].sizes)} tiles, "
                f"expected {expected} (internal pyramid error)"
            )
