"""Helpers shared by the compression tests: small slides whose tiles have known content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from slide_factory import tissue_like, write_tiled_tiff

TILE = 128  # the built-in encoders take 128 px tiles
# Small slides hold small tissue regions: keep specks down to one tile's area (at 0.5 um/px).
SMALL_TISSUE = ["slide.tissue.min_object_um2=1000"]

# An L of tissue tiles in an 8 x 12 grid: asymmetric, so every rotation/flip differs.
L_CELLS = [(r, 2) for r in range(1, 7)] + [(6, c) for c in range(3, 9)] + [(5, 3), (5, 4)]


def tile_colour(r: int, c: int) -> tuple[int, int, int]:
    """A distinct, strongly saturated colour per tile (tissue detection keys on saturation)."""
    return (200 - 8 * r, 40 + 6 * c, 160 + 4 * ((r + c) % 8))


def colour_image(rows: int = 8, cols: int = 12, cells=L_CELLS, texture: bool = False, seed: int = 0) -> np.ndarray:
    """Level-0 pixels (0.5 um/px): white background, tissue tiles at `cells`, each its own colour
    (with an H&E-like texture on top when `texture`, so an encoder sees orientation)."""
    image = np.full((rows * TILE, cols * TILE, 3), 255, np.uint8)
    noise = tissue_like(rows * TILE, cols * TILE, seed=seed).astype(np.int16) - 170 if texture else None
    for r, c in cells:
        block = np.empty((TILE, TILE, 3), np.int16)
        block[:] = tile_colour(r, c)
        if noise is not None:
            block += noise[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] // 2
        image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = np.clip(block, 0, 255)
    return image


#: A 6 x 10 block of tissue tiles inside an 8 x 12 grid (60 tiles per slide).
INNER_CELLS = [(r, c) for r in range(1, 7) for c in range(1, 11)]


def random_encoder_grid(image: np.ndarray, cells=INNER_CELLS, shape: tuple[int, int] = (8, 12)) -> np.ndarray:
    """What the 'random' encoder gives, in float32, for the tiles of `image` at `cells`, rounded to
    float16 as stored and placed in a (C, H, W) grid with zeros elsewhere."""
    import torch

    from nic.encoders import load_encoder

    model, info = load_encoder("random")
    tiles = np.stack([image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] for r, c in cells])
    with torch.inference_mode():
        emb = model(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()).numpy()
    grid = np.zeros((info.embedding_dim, *shape), np.float32)
    for (r, c), e in zip(cells, emb.astype(np.float16).astype(np.float32), strict=True):
        grid[:, r, c] = e
    return grid


def write_slide(path: Path, image: np.ndarray, levels: int = 2, compression: str = "deflate") -> Path:
    """A pyramidal tiled TIFF at 0.5 um/px; lossless by default, so tiles read back exactly."""
    return write_tiled_tiff(path, image, mpp=0.5, tile=256, levels=levels, compression=compression)


def manifest_rows(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "slides.parquet").to_pylist()
    ids = [r["slide_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a slide appears twice in the manifest: {ids}"
    return {r["slide_id"]: r for r in rows}


def compress_args(slides: list, out: Path, encoder: str = "mean-rgb", *extra: str) -> list[str]:
    args = ["compress", "--slides", *[str(s) for s in slides], "--encoder", encoder, "--out", str(out),
            "--batch-size", "32"]
    for item in SMALL_TISSUE:
        args += ["--set", item]
    return args + list(extra)
