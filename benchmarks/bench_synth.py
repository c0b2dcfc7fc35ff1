"""Benchmarks of `nic synth`: render throughput, the demo cohort, and one huge slide.

    .venv/bin/python benchmarks/bench_synth.py --render          # Mpx/s of the renderer and the writer
    .venv/bin/python benchmarks/bench_synth.py --demo            # configs/demo/synth.yaml end to end on Ray
    .venv/bin/python benchmarks/bench_synth.py --big 100000      # one 100k x 100k slide: time, peak memory
    .venv/bin/python benchmarks/bench_synth.py --big 20000 --threads 2

Each prints one Markdown table row for benchmarks/results/synth.md, and the machine's load average,
because on a shared machine the wall time says as much about the neighbours as about the code.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


class TreeMemory:
    """Peak summed RSS of this process and all its descendants (Ray's workers included), sampled."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peak = 0
        self._cpu: dict[int, float] = {}  # last seen user+system seconds per process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every_s)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the whole tree (processes that ended between samples lose their last 0.5 s)."""
        return sum(self._cpu.values())

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _params(size: int, mpp: float = 0.5, seed: int = 1):
    from nic.config.synth import SynthConfig
    from nic.synth.labels import plan_cohort

    slides, _ = plan_cohort(SynthConfig(slides=1, size=size, seed=seed, mpp=mpp))
    return slides[0]


def bench_render(size: int) -> None:
    from nic.synth.render import Scene
    from nic.synth.tiff_writer import write_pyramidal_tiff

    params = _params(size)
    t0 = time.perf_counter()
    scene = Scene(params)
    setup = time.perf_counter() - t0
    scene.render(0, 0, 256, 256)  # warm caches
    scene = Scene(params)
    t0 = time.perf_counter()
    for y0 in range(0, params.height, 256):
        scene.render(y0, 0, min(256, params.height - y0), params.width)
    render_s = time.perf_counter() - t0
    mpx = params.width * params.height / 1e6
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as tmp:
        scene = Scene(params)
        t0 = time.perf_counter()
        write_pyramidal_tiff(Path(tmp) / "s.tiff", params.width, params.height, scene.render, mpp=params.mpp)
        write_s = time.perf_counter() - t0
        size_mb = (Path(tmp) / "s.tiff").stat().st_size / 1e6
    print(f"| render {params.width}x{params.height} | scene setup {setup:.2f} s | render {render_s:.2f} s "
          f"({mpx / render_s:.1f} Mpx/s) | render+write {write_s:.2f} s ({mpx / write_s:.1f} Mpx/s, "
          f"{size_mb:.1f} MB) | load {_load()} |")


def bench_demo(config_path: Path, keep: Path | None) -> None:
    from nic.config.base import load_config
    from nic.config.synth import SynthConfig
    from nic.synth.stage import run_synth

    out = keep or Path(tempfile.mkdtemp(prefix="bench_synth_", dir="/tmp"))
    config = load_config(SynthConfig, config_path, values={"out": str(out)})
    t0 = time.perf_counter()
    with TreeMemory() as mem:
        code = run_synth(config)
    wall = time.perf_counter() - t0
    slides = sorted((out / "slides").glob("*.tiff"))
    mpx = sum(_tiff_mpx(p) for p in slides)
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    n_patches = (config.patches.train + config.patches.val) * len(config.patches.tasks)
    print(f"| demo ({config_path}) | {len(slides)} slides, {mpx:.0f} Mpx level 0, {n_patches} patches | "
          f"{wall:.1f} s wall incl. Ray start, {mem.cpu_seconds:.0f} CPU-s (= {mem.cpu_seconds / (os.cpu_count() or 1):.0f} s "
          f"on {os.cpu_count()} idle cores) | peak RSS (all processes) {mem.peak / 1e9:.2f} GB | "
          f"{size_mb:.0f} MB on disk | exit {code} | cpus {os.cpu_count()} | load {_load()} |")
    if keep is None:
        shutil.rmtree(out, ignore_errors=True)


def _tiff_mpx(path: Path) -> float:
    import openslide

    w, h = openslide.OpenSlide(str(path)).dimensions
    return w * h / 1e6


def bench_big(size: int, threads: int, mpp: float, keep: Path | None) -> None:
    import openslide

    from nic.synth.render import Scene
    from nic.synth.tiff_writer import write_pyramidal_tiff

    params = _params(size, mpp)
    folder = keep or Path(tempfile.mkdtemp(prefix="bench_big_", dir="/tmp"))
    path = folder / f"big_{params.width}.tiff"
    done = [0]

    def tile_fn(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        out = scene.render(y0, x0, h, w)
        done[0] += h * w
        return out

    def report() -> None:
        while not stop.wait(60):
            el = time.perf_counter() - t0
            frac = done[0] / (params.width * params.height)
            print(f"  {frac:.1%} of level 0 after {el / 60:.1f} min, maxrss "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, load {_load()}",
                  file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    scene = Scene(params)
    setup = time.perf_counter() - t0
    stop = threading.Event()
    threading.Thread(target=report, daemon=True).start()
    dims = write_pyramidal_tiff(path, params.width, params.height, tile_fn, mpp=params.mpp, workers=threads)
    stop.set()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    slide = openslide.OpenSlide(str(path))
    ok = slide.dimensions == (params.width, params.height) and slide.level_count == len(dims)
    size_gb = path.stat().st_size / 1e9
    mpx = params.width * params.height / 1e6
    print(f"| big slide {params.width}x{params.height} @ {mpp} um/px | {len(dims)} levels, {size_gb:.2f} GB | "
          f"{wall / 60:.1f} min ({mpx / wall:.1f} Mpx/s, setup {setup:.1f} s) | peak RSS {peak:.2f} GB | "
          f"threads {threads} | openslide ok {ok} | load {_load()} |")
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="renderer and writer throughput on one slide")
    parser.add_argument("--render-size", type=int, default=6000)
    parser.add_argument("--demo", action="store_true", help="the demo cohort end to end on Ray")
    parser.add_argument("--config", type=Path, default=REPO / "configs/demo/synth.yaml")
    parser.add_argument("--big", type=int, default=None, help="one slide of BIG x ~BIG px")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--keep", type=Path, default=None, help="write outputs here and keep them")
    args = parser.parse_args()
    if not (args.render or args.demo or args.big):
        parser.error("choose --render, --demo and/or --big SIZE")
    if args.render:
        bench_render(args.render_size)
    if args.demo:
        bench_demo(args.config, args.keep)
    if args.big:
        bench_big(args.big, args.threads, args.mpp, args.keep)


if __name__ == "__main__":
    main()
