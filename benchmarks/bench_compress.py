"""Benchmark of `nic compress`: end to end vs the encoder's compute bound vs a naive loop; memory.

    .venv/bin/python benchmarks/bench_compress.py --cohort runs/bench/cohort      # (a), (b), (c)
    .venv/bin/python benchmarks/bench_compress.py --make-cohort 24 --size 6000    # generate it first
    .venv/bin/python benchmarks/bench_compress.py --large 50000,100000            # memory, linearity

In ONE run, on the same slides and the same encoder (default: the reference NIC CNN, `random`):
  (a) end to end: `run_compress` on an embedded local Ray (planning, reading, encoding, writing),
      tiles/s over the whole job (actor start-up included) and in steady state (after the first
      encoded batch arrives);
  (b) compute bound: the same encoder module in the same precision as the actors (bfloat16
      autocast on CPUs with AMX), torch threads = all CPUs, on tiles already in memory (batches
      of --batch-size), nothing else;
  (c) naive: one process, OpenSlide read_region per tile, the model as trained (float32, eval
      mode) on batches of one; (c') the same loop around nic's folded float32 inference module.
Goals: (a) >= 70 % of (b), (a) >= 5 x (c).

Because the machine may be shared, every measure is also given per CPU-second (CPU time of this
process and all its descendants, Ray's workers included): on an idle machine tiles/s and tiles per
CPU-second x CPUs agree; on a busy one the CPU-based ratio still measures the work itself.

--large writes synthetic slides of the given widths (square, tissue in an ellipse over ~25 % of the
area, tiled JPEG, pyramid), compresses each alone, and records wall time, tissue tiles and the peak
RSS of every process (sampled), to show time grows linearly with tissue tiles and memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, {ram}, {platform.system()} {platform.release()}"


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


class TreeMonitor:
    """CPU seconds and per-process peak RSS of this process and all its descendants, sampled.

    Ray's embedded instance (GCS, raylet, workers) runs as descendants of the driver, so the tree
    is the whole job. Processes that exit between samples keep their last sample."""

    def __init__(self, every_s: float = 0.25):
        self.every_s = every_s
        self._rss: dict[int, int] = defaultdict(int)
        self._labels: dict[int, str] = {}
        self._cpu: dict[int, float] = {}
        self._cpu0: dict[int, float] = {}
        self.series: list[tuple[float, float]] = []  # (monotonic time, CPU-s used so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _label(proc: psutil.Process) -> str:
        try:
            cmd = proc.cmdline()
        except (psutil.Error, OSError):
            return "?"
        text = " ".join(cmd)
        if text.startswith("ray::"):
            return text.split(" ")[0]
        for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "agent.py"):
            if key in text:
                return key
        return "driver" if proc.pid == os.getpid() else Path(cmd[0]).name if cmd else "?"

    def _sample(self) -> None:
        me = psutil.Process()
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    label = self._label(proc)
            except (psutil.Error, OSError):
                continue
            self._rss[proc.pid] = max(self._rss[proc.pid], rss)
            if not label.startswith("ray::IDLE") or proc.pid not in self._labels:
                # a worker's title follows its current task; keep the most telling one
                self._labels[proc.pid] = label.removesuffix(".submit").removesuffix(".__init__")
            self._cpu[proc.pid] = times.user + times.system
        if self._cpu0:
            self.series.append((time.monotonic(), sum(self._cpu.values()) - sum(self._cpu0.values())))

    def cpu_at(self, t: float) -> float:
        """CPU-s used by the tree up to monotonic time t (linear between samples)."""
        if not self.series:
            return 0.0
        times, cpus = zip(*self.series, strict=True)
        return float(np.interp(t, times, cpus))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    @property
    def peak_rss(self) -> dict[str, int]:
        return {f"{self._labels.get(pid, '?')} (pid {pid})": rss for pid, rss in self._rss.items()}

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds each process used while monitored, by label (same labels summed)."""
        out: dict[str, float] = defaultdict(float)
        for pid, cpu in self._cpu.items():
            out[self._labels.get(pid, "?")] += cpu - self._cpu0.get(pid, 0.0)
        return dict(out)

    def __enter__(self) -> TreeMonitor:
        self._sample()
        self._cpu0 = dict(self._cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu = sum(self.cpu_by_process().values())


def cpu_now() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


# -- the three measures ---------------------------------------------------------------------------

def end_to_end(slides: Path, out: Path, encoder: str, batch_size: int, extra: dict) -> dict:
    from nic.compress.stage import RUN_STATS, run_compress
    from nic.config.compress import CompressConfig
    from nic.grids import read_manifest

    config = CompressConfig(slides=[str(slides)], encoder=encoder, out=out, batch_size=batch_size, **extra)
    with TreeMonitor() as mon:
        start, mono0 = time.perf_counter(), time.monotonic()
        code = run_compress(config)
        wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"nic compress failed (exit {code}); see {out / 'slides.parquet'}")
    manifest = read_manifest(out)
    stats = json.loads((out / RUN_STATS).read_text())
    tiles = int(manifest.loc[manifest.status == "ok", "tiles"].sum())
    # Steady state: from the first encoded batch on (the actor is up, planning has started).
    # run_compress's clock starts after ours (it loads the encoder first) and ends with ours, so its
    # start is ours + (our wall - its wall).
    first, steady_rate = stats["first_batch_s"], stats["steady_tiles_per_s"]
    steady_per_cpu = None
    if first is not None and steady_rate:
        steady_cpu = mon.cpu - mon.cpu_at(mono0 + (wall - stats["wall_s"]) + first)
        steady_per_cpu = steady_rate * (stats["wall_s"] - first) / steady_cpu if steady_cpu > 0 else None
    return {"wall_s": wall, "tiles": tiles, "tiles_per_s": tiles / wall, "cpu_s": mon.cpu,
            "steady_tiles_per_cpu_s": steady_per_cpu,
            "tiles_per_cpu_s": tiles / mon.cpu, "steady_tiles_per_s": stats["steady_tiles_per_s"],
            "first_batch_s": stats["first_batch_s"], "pool": stats["pool"], "peak_rss": mon.peak_rss,
            "cpu_by_process": mon.cpu_by_process(),
            "actor_read_s": stats.get("actor_read_s"), "actor_encode_s": stats.get("actor_encode_s"),
            "failed": int((manifest.status == "failed").sum())}


def sample_tiles(slides: Path, n: int) -> tuple[np.ndarray, list[tuple[str, object]]]:
    """Up to n real tissue tiles from the cohort (TileReader), and the plans used for (c)."""
    from nic.config.slides import SlideOptions
    from nic.slides import TileReader, plan_slide

    options = SlideOptions()
    tiles, plans = [], []
    for path in sorted(slides.glob("*.tif*")):
        plan = plan_slide(path, options)
        plans.append((str(path), plan))
        rows, cols, *_ = plan.tiles()
        if sum(len(t) for t in tiles) < n and len(rows):
            with TileReader.from_plan(plan) as reader:
                tiles.append(reader.read(rows[:n], cols[:n]))
    return np.concatenate(tiles)[:n], plans


def compute_bound(tiles: np.ndarray, encoder: str, batch_size: int, seconds: float,
                  mixed_precision: bool = True) -> dict:
    import torch

    from nic.encoders import load_encoder
    from nic.encoders.inference import reduced_precision

    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_encoder(encoder)
    # The precision the encoder actors choose on this machine (bfloat16 on AMX CPUs).
    model.set_precision(reduced_precision("cpu", mixed_precision))
    # The same input layout as the encoder actors (NHWC memory, channels-last strides).
    batches = [torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch_size])).permute(0, 3, 1, 2)
               for i in range(0, len(tiles) - batch_size + 1, batch_size)]
    model(batches[0])  # warm-up
    done, wall0, cpu0 = 0, time.perf_counter(), cpu_now()
    while time.perf_counter() - wall0 < seconds:
        for b in batches:
            model(b)
            done += len(b)
    wall, cpu = time.perf_counter() - wall0, cpu_now() - cpu0
    return {"tiles": done, "wall_s": wall, "tiles_per_s": done / wall, "tiles_per_cpu_s": done / cpu,
            "threads": torch.get_num_threads(), "precision": model.precision}


def naive(plans: list, encoder: str, n: int, optimise: bool = False) -> dict:
    """OpenSlide read_region per tile (at the planned level, resized when not exact), batch of one:
    the loop a user writes around the model they trained (`optimise=False`: the PatchEncoder as
    trained, eval mode, float32), or around nic's folded inference module (`optimise=True`)."""
    import openslide
    import torch
    from PIL import Image

    from nic.encoders import load_encoder

    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_encoder(encoder, optimise=optimise)
    done, wall0, cpu0 = 0, time.perf_counter(), cpu_now()
    for path, plan in plans:
        slide = openslide.OpenSlide(path)
        res, px = plan.resolution, plan.grid.tile_px
        size = max(1, round(px * res.scale))
        _, _, xs, ys, _ = plan.tiles()
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            region = slide.read_region((x, y), res.level, (size, size)).convert("RGB")
            if size != px:
                region = region.resize((px, px), Image.Resampling.BOX)
            tile = torch.from_numpy(np.asarray(region)).permute(2, 0, 1).unsqueeze(0).contiguous()
            with torch.no_grad():
                model(tile)
            done += 1
            if done >= n:
                break
        slide.close()
        if done >= n:
            break
    wall, cpu = time.perf_counter() - wall0, cpu_now() - cpu0
    return {"tiles": done, "wall_s": wall, "tiles_per_s": done / wall, "tiles_per_cpu_s": done / cpu}


# -- large slides -----------------------------------------------------------------------------------

def write_large_slide(path: Path, size: int, workers: int) -> float:
    """A size x size px slide at 0.5 um/px with textured tissue inside an ellipse (~25 % of the area)."""
    from nic.synth.tiff_writer import write_pyramidal_tiff
    from slide_factory import tissue_like

    textures = [tissue_like(1024, 1024, seed=s) for s in range(4)]
    cy, cx, ry, rx = size / 2, size / 2, size * 0.36, size * 0.22

    def tile_fn(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        yy, xx = np.ogrid[y0:y0 + h, x0:x0 + w]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        out = np.full((h, w, 3), 245, np.uint8)
        if inside.any():
            tex = textures[(y0 // 1024 + x0 // 1024) % len(textures)]
            ty, tx = y0 % 1024, x0 % 1024
            reps = np.tile(tex, (2 + h // 1024, 2 + w // 1024, 1))[ty:ty + h, tx:tx + w]
            out[inside] = reps[inside]
        return out

    start = time.perf_counter()
    write_pyramidal_tiff(path, size, size, tile_fn, mpp=0.5, tile_size=256, quality=85, workers=workers)
    return time.perf_counter() - start


def large(sizes: list[int], encoder: str, batch_size: int, work: Path, keep: bool) -> list[dict]:
    results = []
    for size in sizes:
        folder = work / f"large_{size}"
        folder.mkdir(parents=True, exist_ok=True)
        slide = folder / f"L{size}.tiff"
        written = None
        if not slide.exists():
            written = write_large_slide(slide, size, workers=os.cpu_count() or 1)
        out = folder / f"grids-{encoder}"
        shutil.rmtree(out, ignore_errors=True)
        single = folder / "only"
        single.mkdir(exist_ok=True)
        link = single / slide.name
        if not link.exists():
            link.symlink_to(slide)
        row = end_to_end(single, out, encoder, batch_size, {})
        row.update(size=size, slide_bytes=slide.stat().st_size, written_s=written)
        results.append(row)
        print(f"[bench] large {size}: {row['tiles']} tiles in {row['wall_s']:.1f} s, "
              f"peak RSS {max(row['peak_rss'].values()) / 2**30:.2f} GiB (load {load()})", file=sys.stderr)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return results


# -- report -----------------------------------------------------------------------------------------

def report(a: dict, b: dict, c: dict, c2: dict, args) -> str:
    lines = [
        f"Command: `.venv/bin/python benchmarks/bench_compress.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {machine()}; load average at the end {load()} (shared with other jobs).",
        f"Encoder: `{args.encoder}`; batch size {args.batch_size}; pool: {a['pool']}.",
        f"Cohort: {a['tiles']} tissue tiles; (c) on the first {c['tiles']} of them.",
        "",
        "| measure | tiles/s (wall) | tiles per CPU-second | (a) vs this, wall | (a) vs this, CPU |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| (a) nic compress, end to end (whole job, actor start included) | {a['tiles_per_s']:.0f} | "
        f"{a['tiles_per_cpu_s']:.0f} | 1.00 | 1.00 |",
        (f"| (a') nic compress, steady state (after the first batch, at {a['first_batch_s']:.1f} s) | "
         f"{a['steady_tiles_per_s']:.0f} | {a['steady_tiles_per_cpu_s']:.0f} | "
         f"{a['steady_tiles_per_s'] / b['tiles_per_s']:.2f} (vs b) | "
         f"{a['steady_tiles_per_cpu_s'] / b['tiles_per_cpu_s']:.2f} (vs b) |")
        if a["steady_tiles_per_s"] and a["steady_tiles_per_cpu_s"] else "| (a') steady state: job too short |  |  |  |  |",
        f"| (b) encoder compute bound ({b['threads']} threads, {b['precision']}, tiles in memory) | "
        f"{b['tiles_per_s']:.0f} | "
        f"{b['tiles_per_cpu_s']:.0f} | {a['tiles_per_s'] / b['tiles_per_s']:.2f} | "
        f"{a['tiles_per_cpu_s'] / b['tiles_per_cpu_s']:.2f} |",
        f"| (c) naive loop (read_region per tile, the trained model, batch of one) | {c['tiles_per_s']:.0f} | "
        f"{c['tiles_per_cpu_s']:.0f} | {a['tiles_per_s'] / c['tiles_per_s']:.2f} | "
        f"{a['tiles_per_cpu_s'] / c['tiles_per_cpu_s']:.2f} |",
        f"| (c') the same loop around nic's folded float32 module | {c2['tiles_per_s']:.0f} | "
        f"{c2['tiles_per_cpu_s']:.0f} | {a['tiles_per_s'] / c2['tiles_per_s']:.2f} | "
        f"{a['tiles_per_cpu_s'] / c2['tiles_per_cpu_s']:.2f} |",
        "",
        f"Inside the encoder actor(s) in (a): {a['actor_read_s']:.1f} s reading and decoding pixels (summed over "
        f"threads), {a['actor_encode_s']:.1f} s in forward passes; (a) took {a['wall_s']:.1f} s wall, "
        f"{a['cpu_s']:.1f} CPU-s in all processes.",
        "",
        "CPU seconds per process in (a): " + ", ".join(
            f"{k}: {v:.1f}" for k, v in sorted(a["cpu_by_process"].items(), key=lambda kv: -kv[1]) if v >= 0.1),
        "",
        "Peak RSS per process in (a): " + ", ".join(
            f"{k}: {v / 2**20:.0f} MiB" for k, v in sorted(a["peak_rss"].items(), key=lambda kv: -kv[1])[:6]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, help="A nic synth cohort folder (its slides/ are compressed).")
    parser.add_argument("--make-cohort", type=int, default=0, metavar="N",
                        help="Generate an N-slide cohort with nic synth into --work/cohort first.")
    parser.add_argument("--size", type=int, default=6000, help="Slide width for --make-cohort.")
    parser.add_argument("--encoder", default="random", help="Encoder (default: the reference CNN, untrained).")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--bound-seconds", type=float, default=20.0)
    parser.add_argument("--naive-tiles", type=int, default=1000)
    parser.add_argument("--large", default="", help="Comma-separated widths of large slides, e.g. 50000,100000.")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--keep", action="store_true", help="Keep the outputs.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the raw numbers here.")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="Extra compress config values for (a), e.g. read_parallelism=1.")
    args = parser.parse_args(argv)

    import yaml

    from nic.config.base import RayOptions
    from nic.runtime import connect

    work = args.work or Path(tempfile.mkdtemp(prefix="nicb"))
    work.mkdir(parents=True, exist_ok=True)
    raw: dict = {"machine": machine(), "args": vars(args) | {"work": str(work)}}
    connect(RayOptions())
    try:
        if args.make_cohort:
            from nic.config.synth import SynthConfig
            from nic.synth.stage import run_synth

            cohort = work / "cohort"
            run_synth(SynthConfig(out=cohort, slides=args.make_cohort, size=args.size,
                                  min_size=max(256, args.size * 2 // 3), patches={"tasks": []}))
            args.cohort = cohort
        if args.cohort:
            slides = args.cohort / "slides"
            extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.extra)}
            print(f"[bench] (a) end to end on {slides} (load {load()})", file=sys.stderr)
            a = end_to_end(slides, work / "grids", args.encoder, args.batch_size, extra)
            print(f"[bench] (b) compute bound (load {load()})", file=sys.stderr)
            tiles, plans = sample_tiles(slides, max(args.batch_size * 8, 2048))
            b = compute_bound(tiles, args.encoder, args.batch_size, args.bound_seconds,
                              bool(extra.get("mixed_precision", True)))
            print(f"[bench] (c) naive loop (load {load()})", file=sys.stderr)
            c = naive(plans, args.encoder, args.naive_tiles)
            c2 = naive(plans, args.encoder, args.naive_tiles, optimise=True)
            raw.update(a=a, b=b, c=c, c2=c2)
            print(report(a, b, c, c2, args))
        if args.large:
            sizes = [int(s) for s in args.large.split(",") if s]
            rows = large(sizes, args.encoder, args.batch_size, work, args.keep)
            raw["large"] = rows
            print("\n| slide | tissue tiles | wall s | tiles/s | wall s per 1000 tiles | CPU-s per 1000 tiles "
                  "| largest peak RSS (process) |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
            for r in rows:
                name, peak = max(r["peak_rss"].items(), key=lambda kv: kv[1])
                print(f"| {r['size']} x {r['size']} px ({r['slide_bytes'] / 2**30:.2f} GiB) | {r['tiles']} | "
                      f"{r['wall_s']:.0f} | {r['tiles_per_s']:.0f} | {1000 * r['wall_s'] / r['tiles']:.1f} | "
                      f"{1000 * r['cpu_s'] / r['tiles']:.1f} | {peak / 2**30:.2f} GiB ({name}) |")
        print(f"\n(load average at the end: {load()})")
    finally:
        if args.json:
            args.json.write_text(json.dumps(raw, indent=2, default=str))
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
