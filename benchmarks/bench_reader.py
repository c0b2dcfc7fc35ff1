"""Tile reading throughput: OpenSlide per tile vs nic's TileReader vs the raw JPEG decode bound.

Run:  .venv/bin/python benchmarks/bench_reader.py [--size 20000] [--block 40] [--repeats 7]

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
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{os.cpu_count()} CPUs (nproc), {cpu}, {ram}, {platform.system()} {platform.release()}; "
            f"load average at the end {load} (shared with other jobs)")


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


class Timer:
    """Wall-clock and CPU time (this process, all threads) of a block.

    Every method here is single-threaded, so on an idle machine both agree; on a shared machine
    CPU time still measures the work itself, while wall time also counts waiting for other jobs.
    """

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def bench_openslide(path: Path, grid: TileGrid, rows, cols) -> Timer:
    xs, ys = grid.origins(rows, cols)
    slide = openslide.OpenSlide(str(path))  # fresh handle: cold OpenSlide tile cache
    with Timer() as timer:
        for x, y in zip(xs.tolist(), ys.tolist()):
            np.asarray(slide.read_region((x, y), 0, (TILE_PX, TILE_PX)).convert("RGB"))
    slide.close()
    return timer


def bench_reader(path: Path, res, grid: TileGrid, rows, cols, direct: bool, batch: int) -> tuple[Timer, str]:
    with Timer() as timer, TileReader(path, res, grid, direct=direct) as reader:
        for i in range(0, rows.size, batch):
            reader.read(rows[i : i + batch], cols[i : i + batch])
        mode = reader.mode
    return timer, mode


def bench_raw_decode(path: Path, grid: TileGrid, rows, cols) -> tuple[Timer, int]:
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
    with Timer() as timer:
        for data in chunks:
            imagecodecs.jpeg8_decode(data, tables=tables)
    return timer, len(chunks)


def bench_fractions() -> tuple[float, tuple[int, int]]:
    """tile_tissue_fractions for a 100k x 100k px slide: 6250^2 mask at 8 um/px, 781^2 tiles."""
    mask = np.random.default_rng(0).random((6250, 6250)) > 0.5
    grid = TileGrid(100_000, 100_000, 0.5, 0.5, TILE_PX)
    with Timer() as timer:
        tile_tissue_fractions(TissueMask(mask=mask, downsample=16.0, threshold_value=0.1), grid)
    return timer.cpu, grid.shape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="slide width = height in px (default 20000)")
    ap.add_argument("--block", type=int, default=40, help="block of block x block 128 px tiles (default 40)")
    ap.add_argument("--repeats", type=int, default=7, help="runs per method (medians are reported)")
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

        runs: dict[str, list[Timer]] = {"a": [], "b": [], "b_region": [], "c": []}
        mode = ""
        n_file_tiles = 0
        for _ in range(args.repeats):
            runs["a"].append(bench_openslide(path, grid, rows, cols))
            elapsed, mode = bench_reader(path, res, grid, rows, cols, direct=True, batch=args.batch)
            runs["b"].append(elapsed)
            runs["b_region"].append(bench_reader(path, res, grid, rows, cols, direct=False, batch=args.batch)[0])
            elapsed, n_file_tiles = bench_raw_decode(path, grid, rows, cols)
            runs["c"].append(elapsed)
        # Tiles per CPU-second (median of runs) is the measure: it is what the methods cost, even
        # while other jobs share the machine. Wall-clock medians are shown next to it.
        rate = {k: n / statistics.median(t.cpu for t in v) for k, v in runs.items()}
        wall = {k: n / statistics.median(t.wall for t in v) for k, v in runs.items()}
        fractions_s, fractions_shape = bench_fractions()
        ratio_a = rate["b"] / rate["a"]
        ratio_c = rate["b"] / rate["c"]
        ok = ratio_a >= 3 and ratio_c >= 0.5

        def row(label: str, key: str) -> str:
            return f"| {label} | {rate[key]:.0f} | {wall[key]:.0f} | {rate[key] / rate['a']:.1f}x |"

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
            f"({n_file_tiles} file tiles). {args.repeats} runs of each method, interleaved, medians; cold "
            "reader and OpenSlide caches in every run. Every method is single-threaded, so tiles per "
            "CPU-second is tiles/s on an idle core; it is the fair measure on this shared machine.",
            "",
            "| method | tiles per CPU-second | tiles per wall-second | vs (a) |",
            "| --- | ---: | ---: | ---: |",
            row("(a) OpenSlide read_region per tile + RGB array", "a"),
            row(f"(b) TileReader, {mode} path (batches of {args.batch}, reader opened in the timing)", "b"),
            row("TileReader, region path (OpenSlide blocks), for reference", "b_region"),
            row("(c) raw JPEG decode bound (imagecodecs, file tiles only, bytes pre-read)", "c"),
            "",
            f"Per CPU-second: (b) / (a) = {ratio_a:.2f} (goal >= 3); (b) / (c) = {ratio_c:.2f} "
            f"(goal >= 0.5): {'goal met' if ok else 'GOAL MISSED'}. Per wall-second: (b) / (a) = "
            f"{wall['b'] / wall['a']:.2f}, (b) / (c) = {wall['b'] / wall['c']:.2f}.",
            "",
            f"Tissue fractions (`tile_tissue_fractions`) for a 100k x 100k px slide (6250 x 6250 mask at "
            f"8 um/px, {fractions_shape[0]} x {fractions_shape[1]} tiles): {fractions_s:.2f} CPU-s.",
            "",
            "Notes:",
            "- (b) and (a) give bit-identical pixels (tests/test_slides_reader.py checks every tile of the",
            "  real SVS and of synthetic JPEG TIFFs); both decode with libjpeg-turbo in the same colour space.",
            "- The region path is the fallback (resampling, non-TIFF formats). It is no faster than (a):",
            "  OpenSlide's cost is per painted pixel (cairo compositing, ARGB conversion), not per call,",
            "  so fewer, larger read_region calls do not help.",
            "- (b) minus (c) is reading the bytes, the LRU of decoded file tiles, and writing the output",
            "  tiles (fresh memory: page faults and copies of 48 KB per tile).",
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
