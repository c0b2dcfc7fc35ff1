"""Tile reading throughput: OpenSlide per tile vs nic's TileReader vs the raw JPEG decode bound.

Run:  .venv/bin/python benchmarks/bench_reader.py [--size 20000] [--block 40] [--repeats 3]

Writes one synthetic slide (size x size px, tiled JPEG q90, 256 px file tiles, 0.5 um/px, an
H&E-like texture so JPEG work is realistic), then in one process measures 128 px tiles/s over a
block x block tile area at the slide centre for:
  (a) OpenSlide read_region tile by tile (+ conversion to an RGB array, as every pipeline does),
  (b) TileReader (direct path; the region path is reported too, for reference),
  (c) the raw decode bound: imagecodecs decoding the file tiles covering the same area, nothing else.
Goal: (b) >= 3 x (a) and (b) >= 50 % of (c). Results go to benchmarks/results/reader.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from nic.config.slides import SlideOptions  # noqa: E402
from nic.slides import (  # noqa: E402
    TileGrid,
    TileReader,
    TissueMask,
    open_slide,
    resolve_resolution,
    tile_tissue_fractions,
)
from slide_factory import tissue_like, write_tiled_tiff_streaming  # noqa: E402

FILE_TILE = 256
TILE_PX = 128
MPP = 0.5


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = "RAM unknown"
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, {ram}, {platform.system()} {platform.release()}"


def write_slide(path: Path, size: int) -> float:
    """Stream the slide tile by tile from a pool of textures (memory stays small)."""
    pool = [tissue_like(512, 512, seed=s) for s in range(8)]
    rng = np.random.default_rng(1)

    def make_tile(ty: int, tx: int) -> np.ndarray:
        tex = pool[int(rng.integers(len(pool)))]
        oy, ox = rng.integers(0, 512 - FILE_TILE, size=2)
        tile = tex[oy : oy + FILE_TILE, ox : ox + FILE_TILE].astype(np.int16)
        tile += rng.integers(-4, 5, size=tile.shape, dtype=np.int16)
        return np.clip(tile, 0, 255).astype(np.uint8)

    start = time.perf_counter()
    write_tiled_tiff_streaming(path, size, size, make_tile, MPP, tile=FILE_TILE, quality=90)
    return time.perf_counter() - start


def block_cells(grid: TileGrid, block: int) -> tuple[np.ndarray, np.ndarray]:
    r0 = max(0, grid.rows // 2 - block // 2)
    c0 = max(0, grid.cols // 2 - block // 2)
    rr, cc = np.meshgrid(np.arange(r0, min(grid.rows, r0 + block)), np.arange(c0, min(grid.cols, c0 + block)),
                         indexing="ij")
    return rr.ravel(), cc.ravel()


def bench_openslide(path: Path, grid: TileGrid, rows, cols) -> float:
    xs, ys = grid.origins(rows, cols)
    slide = openslide.OpenSlide(str(path))  # fresh handle: cold OpenSlide tile cache
    start = time.perf_counter()
    for x, y in zip(xs.tolist(), ys.tolist()):
        np.asarray(slide.read_region((x, y), 0, (TILE_PX, TILE_PX)).convert("RGB"))
    elapsed = time.perf_counter() - start
    slide.close()
    return elapsed


def bench_reader(path: Path, res, grid: TileGrid, rows, cols, direct: bool, batch: int) -> tuple[float, str]:
    start = time.perf_counter()
    with TileReader(path, res, grid, direct=direct) as reader:
        for i in range(0, rows.size, batch):
            reader.read(rows[i : i + batch], cols[i : i + batch])
        mode = reader.mode
    return time.perf_counter() - start, mode


def bench_raw_decode(path: Path, grid: TileGrid, rows, cols) -> tuple[float, int]:
    """Decode exactly the file tiles under the block (bytes read beforehand): the floor for any reader."""
    xs, ys = grid.origins(rows, cols)
    tx0, tx1 = xs.min() // FILE_TILE, (xs.max() + TILE_PX - 1) // FILE_TILE
    ty0, ty1 = ys.min() // FILE_TILE, (ys.max() + TILE_PX - 1) // FILE_TILE
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        tables = page.jpegtables
        chunks = []
        fh = tif.filehandle
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                k = ty * across + tx
                fh.seek(page.dataoffsets[k])
                chunks.append(fh.read(page.databytecounts[k]))
    start = time.perf_counter()
    for data in chunks:
        imagecodecs.jpeg8_decode(data, tables=tables)
    return time.perf_counter() - start, len(chunks)


def bench_fractions() -> tuple[float, tuple[int, int]]:
    """tile_tissue_fractions for a 100k x 100k px slide: 6250^2 mask at 8 um/px, 781^2 tiles."""
    mask = np.random.default_rng(0).random((6250, 6250)) > 0.5
    grid = TileGrid(100_000, 100_000, 0.5, 0.5, TILE_PX)
    start = time.perf_counter()
    tile_tissue_fractions(TissueMask(mask=mask, downsample=16.0, threshold_value=0.1), grid)
    return time.perf_counter() - start, grid.shape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="slide width = height in px (default 20000)")
    ap.add_argument("--block", type=int, default=40, help="block of block x block 128 px tiles (default 40)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per method; the median is reported")
    ap.add_argument("--batch", type=int, default=256, help="tiles per TileReader.read call")
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the slide (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic slide")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reader.md")
    args = ap.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nicbench"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"bench_{args.size}.tiff"
    try:
        write_s = write_slide(path, args.size)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {write_s:.1f} s", flush=True)
        with open_slide(path) as slide:
            res = resolve_resolution(slide, SlideOptions(), path)
        grid = TileGrid(args.size, args.size, res.base_mpp, 0.5, TILE_PX)
        rows, cols = block_cells(grid, args.block)
        n = rows.size

        runs: dict[str, list[float]] = {"a": [], "b": [], "b_region": [], "c": []}
        mode = ""
        n_file_tiles = 0
        for _ in range(args.repeats):
            runs["a"].append(bench_openslide(path, grid, rows, cols))
            elapsed, mode = bench_reader(path, res, grid, rows, cols, direct=True, batch=args.batch)
            runs["b"].append(elapsed)
            runs["b_region"].append(bench_reader(path, res, grid, rows, cols, direct=False, batch=args.batch)[0])
            elapsed, n_file_tiles = bench_raw_decode(path, grid, rows, cols)
            runs["c"].append(elapsed)
        rate = {k: n / statistics.median(v) for k, v in runs.items()}
        fractions_s, fractions_shape = bench_fractions()
        ratio_a = rate["b"] / rate["a"]
        ratio_c = rate["b"] / rate["c"]
        ok = ratio_a >= 3 and ratio_c >= 0.5

        lines = [
            "# Tile reader benchmark",
            "",
            f"Command: `.venv/bin/python benchmarks/bench_reader.py --size {args.size} --block {args.block} "
            f"--repeats {args.repeats}`",
            "",
            f"Machine: {machine()}; single process, one thread.",
            f"Slide: {args.size} x {args.size} px synthetic H&E-like texture, tiled JPEG q90, "
            f"{FILE_TILE} px file tiles, {MPP} um/px (written in {write_s:.0f} s, "
            f"{path.stat().st_size / 2**20:.0f} MiB). Block: {n} tiles of {TILE_PX} px at the centre "
            f"({n_file_tiles} file tiles). Median of {args.repeats} runs, cold reader/OpenSlide cache each run.",
            "",
            "| method | tiles/s | vs (a) |",
            "| --- | ---: | ---: |",
            f"| (a) OpenSlide read_region per tile + RGB array | {rate['a']:.0f} | 1.0x |",
            f"| (b) TileReader, {mode} path (batches of {args.batch}) | {rate['b']:.0f} | {ratio_a:.1f}x |",
            f"| TileReader, region path (OpenSlide runs), for reference | {rate['b_region']:.0f} | "
            f"{rate['b_region'] / rate['a']:.1f}x |",
            f"| (c) raw JPEG decode bound (imagecodecs, file tiles only) | {rate['c']:.0f} | "
            f"{rate['c'] / rate['a']:.1f}x |",
            "",
            f"(b) / (a) = {ratio_a:.2f} (goal >= 3); (b) / (c) = {ratio_c:.2f} (goal >= 0.5): "
            f"{'goal met' if ok else 'GOAL MISSED'}.",
            "",
            f"Tissue fractions (`tile_tissue_fractions`) for a 100k x 100k px slide (6250 x 6250 mask at "
            f"8 um/px, {fractions_shape[0]} x {fractions_shape[1]} tiles): {fractions_s:.2f} s.",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return 0 if ok else 1
    finally:
        if not args.keep:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
