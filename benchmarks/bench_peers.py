"""nic against the tools a user would pick instead, in one run, on the same slides and tiles.

    .venv/bin/python benchmarks/bench_peers.py                                  # 64 slides, 8 to compress
    .venv/bin/python benchmarks/bench_peers.py --slides 64 --compress-slides 8 --repeats 3 --write
    .venv/bin/python benchmarks/bench_peers.py --slides 2 --compress-slides 1 --repeats 1  # a quick check

Slides: the "anchor" of issue 16, made here from the real H&E fixture (../shared/data/slides/
small_HE.svs, 2220 x 2967 px at 0.499 um/px): its pixels repeated 3 across and 4 down, a
6,660 x 11,868 px tiled JPEG pyramid (256 px tiles, quality 90, 5 levels, nic's own TIFF writer),
then hard-linked N times (distinct file names, one file's bytes in the page cache).

Measured, each as a whole command in its own process (interpreter start, imports, everything),
the median of --repeats runs, the tools interleaved so a change of load hits both:

  tile:     `nic tile --slides DIR --out OUT --num-cpus W` (an embedded run) against
            `python -m hs2p CONFIG` (hs2p 6.1, OpenSlide backend, 0.5 um/px, 128 px tiles, tissue
            coverage >= 0.5 like nic's threshold, its default previews, `speed.num_workers` W),
            on 1 slide and on --slides slides. hs2p runs in the interpreter --hs2p-python names
            (default: this one, if it imports hs2p; hs2p is not a dependency of nic: install it
            in a separate venv, see below); without one, hs2p is skipped with a message.
  compress: `nic compress --slides DIR --encoder E --out OUT` against a CLAM/TRIDENT-style loop
            (this script with `_loop`, also a whole process): per slide a torch Dataset whose
            __getitem__ is OpenSlide read_region of one tile at the planned level, a DataLoader
            (batch 256, --loader-workers workers), the encoder in eval mode; the tiles are the ones
            `nic tile` kept for those slides (the same plan `nic compress` makes, checked). Two
            loops: the model as trained (float32 PatchEncoder) and nic's optimised inference
            module in the precision nic's actors use on this machine.

The ratios are peer time / nic time (above 1: nic is faster). Issue 16's goals: tile on the N-slide
set <= hs2p's time with the same workers, on one slide <= 2x; compress faster than the loop with
nic's own model. Results go to benchmarks/results/peers.md between markers (--write), then
benchmarks/RESULTS.md is re-assembled.

hs2p in its own venv (its dependencies: opencv, wandb, matplotlib...):
    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install "hs2p[openslide]==6.1.0"
    .venv/bin/python benchmarks/bench_peers.py --hs2p-python /work/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_model, ram_gib  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO.parent / "shared" / "data" / "slides" / "small_HE.svs"
RESULTS = REPO / "benchmarks" / "results" / "peers.md"
START, END = "<!-- bench_peers:start -->", "<!-- bench_peers:end -->"
ACROSS, DOWN = 3, 4  # copies of the fixture's pixels: 3 x 2220 = 6660 px wide, 4 x 2967 = 11868 px tall
HS2P_VERSION = "6.1.0"


# -- the slides ------------------------------------------------------------------------------------

def make_anchor(path: Path) -> tuple[int, int]:
    """The anchor slide: the fixture's pixels ACROSS x DOWN times, a JPEG pyramid at its resolution."""
    import numpy as np
    import openslide

    from nic.synth.tiff_writer import write_pyramidal_tiff

    with openslide.OpenSlide(str(FIXTURE)) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    big = np.tile(pixels, (DOWN, ACROSS, 1))
    height, width = big.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    write_pyramidal_tiff(tmp, width, height, lambda y0, x0, h, w: big[y0:y0 + h, x0:x0 + w], mpp=mpp, quality=90)
    tmp.rename(path)
    return width, height


def slide_set(anchor: Path, folder: Path, n: int) -> Path:
    """`folder` holding n hard links to the anchor (copies where links are not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / f"A{i:04d}.tiff"
        if not target.exists():
            try:
                os.link(anchor, target)
            except OSError:
                shutil.copyfile(anchor, target)
    return folder


# -- running whole commands ------------------------------------------------------------------------

def nic_command() -> list[str]:
    """The `nic` console script beside this interpreter, else `python -m nic.cli.main`."""
    script = Path(sys.executable).parent / "nic"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nic.cli.main"]


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of `cmd` as its own process; stops the benchmark when it fails."""
    env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}  # embedded, like a laptop
    start = time.perf_counter()
    with open(log, "w") as sink:
        code = subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"failed (exit {code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return seconds


def hs2p_interpreter(requested: str | None) -> str | None:
    """The Python that runs hs2p: --hs2p-python, else this one if it imports hs2p, else None."""
    python = requested or sys.executable
    try:
        probe = subprocess.run([python, "-c", "import hs2p, importlib.metadata as m; print(m.version('hs2p'))"],
                               capture_output=True, text=True)
    except OSError as exc:  # no such interpreter
        probe = subprocess.CompletedProcess([python], 127, "", str(exc))
    if probe.returncode != 0:
        where = "--hs2p-python " + requested if requested else f"this interpreter ({sys.executable})"
        print(f"[bench] hs2p is not importable by {where}: hs2p is skipped. Install it in a separate venv "
              f"(python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install 'hs2p[openslide]=="
              f"{HS2P_VERSION}') and pass --hs2p-python /work/peers-venv/bin/python", file=sys.stderr)
        return None
    version = probe.stdout.strip()
    if version != HS2P_VERSION:
        print(f"[bench] hs2p {version} (the settings here were written for {HS2P_VERSION})", file=sys.stderr)
    return python


def hs2p_config(folder: Path, run: Path, workers: int) -> Path:
    """An hs2p CLI config tiling every slide of `folder` as nic does: 0.5 um/px, 128 px tiles, a
    tile kept at >= 50 % tissue (hs2p's default is 1 %), previews on (nic writes overviews)."""
    run.mkdir(parents=True, exist_ok=True)
    rows = ["sample_id,image_path"] + [f"{p.stem},{p}" for p in sorted(folder.glob("*.tiff"))]
    (run / "slides.csv").write_text("\n".join(rows) + "\n")
    config = run / "config.yaml"
    config.write_text(
        f"csv: {run / 'slides.csv'}\n"
        f"output_dir: {run / 'out'}\n"
        "tiling:\n"
        "  backend: openslide\n"
        "  params:\n"
        "    requested_spacing_um: 0.5\n"
        "    requested_tile_size_px: 128\n"
        "  masks:\n"
        "    min_coverage:\n"
        "      tissue: 0.5\n"
        "speed:\n"
        f"  num_workers: {workers}\n"
    )
    return config


def hs2p_tiles(run: Path) -> int:
    """Tiles hs2p kept, summed over its process list."""
    import pandas as pd

    table = pd.read_csv(run / "out" / "process_list.csv")
    return int(table["num_tiles"].sum())


def nic_tiles(out: Path) -> int:
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "slides.parquet").to_pylist()
    bad = [r for r in rows if r["status"] == "failed"]
    if bad:
        raise SystemExit(f"nic failed on {len(bad)} slide(s): {bad[0]['reason']}")
    return sum(int(r["tiles"] or 0) for r in rows)


def bench_tile(folder: Path, work: Path, workers: int, repeats: int, hs2p_python: str | None) -> dict:
    """Whole-command seconds of nic tile and hs2p on `folder` (fresh outputs each run)."""
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"nic": [], "hs2p": [], "slides": len(list(folder.glob("*.tiff")))}
    for r in range(repeats):
        out = work / f"nic-{r}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = nic_command() + ["tile", "--slides", str(folder), "--out", str(out), "--num-cpus", str(workers)]
        result["nic"].append(timed(cmd, work / f"nic-{r}.log"))
        result["nic_tiles"] = nic_tiles(out)
        if hs2p_python:
            run = work / f"hs2p-{r}"
            shutil.rmtree(run, ignore_errors=True)
            config = hs2p_config(folder, run, workers)
            result["hs2p"].append(timed([hs2p_python, "-m", "hs2p", str(config), "--skip-datetime"],
                                        work / f"hs2p-{r}.log"))
            result["hs2p_tiles"] = hs2p_tiles(run)
        print(f"[bench] tile {result['slides']} slide(s), run {r + 1}: nic {result['nic'][-1]:.1f} s"
              + (f", hs2p {result['hs2p'][-1]:.1f} s" if result["hs2p"] else "") + f" (load {load()})",
              file=sys.stderr)
    return result


# -- compress against a DataLoader loop ------------------------------------------------------------

def bench_compress(folder: Path, tiled: Path, work: Path, args: argparse.Namespace) -> dict:
    """nic compress (whole command) and the two DataLoader loops (whole processes), interleaved."""
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"nic": [], "trained": [], "nic_model": []}
    for r in range(args.repeats):
        out = work / f"grids-{r}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = nic_command() + ["compress", "--slides", str(folder), "--encoder", args.encoder, "--out", str(out),
                               "--batch-size", str(args.batch_size)]
        result["nic"].append(timed(cmd, work / f"compress-{r}.log"))
        result["nic_tiles"] = nic_tiles(out)
        for model in ("trained", "nic_model"):
            report = work / f"loop-{model}-{r}.json"
            loop = [sys.executable, str(Path(__file__).resolve()), "_loop", "--tiled", str(tiled),
                    "--encoder", args.encoder, "--model", model, "--batch-size", str(args.batch_size),
                    "--loader-workers", str(args.loader_workers), "--report", str(report)]
            result[model].append(timed(loop, work / f"loop-{model}-{r}.log"))
            facts = json.loads(report.read_text())
            result["loop_tiles"], result[f"{model}_precision"] = facts["tiles"], facts["precision"]
        print(f"[bench] compress run {r + 1}: nic {result['nic'][-1]:.1f} s, loop (as trained) "
              f"{result['trained'][-1]:.1f} s, loop (nic's model) {result['nic_model'][-1]:.1f} s (load {load()})",
              file=sys.stderr)
    if result["loop_tiles"] != result["nic_tiles"]:
        raise SystemExit(f"the loop read {result['loop_tiles']} tiles, nic compress encoded {result['nic_tiles']}: "
                         "not the same tiles")
    return result


def run_loop(args: argparse.Namespace) -> int:
    """The CLAM/TRIDENT-style loop, in its own process: read_region per tile, DataLoader, batches."""
    import numpy as np
    import openslide
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from nic.encoders import load_encoder
    from nic.encoders.inference import reduced_precision

    class Tiles(Dataset):
        """One slide's tiles: (x, y) level-0 origins read at `level`, `size` px there, resized to px."""

        def __init__(self, path: str, xs: list[int], ys: list[int], level: int, size: int, px: int) -> None:
            self.path, self.xs, self.ys, self.level, self.size, self.px = path, xs, ys, level, size, px
            self.slide: openslide.OpenSlide | None = None  # opened in each loader worker

        def __len__(self) -> int:
            return len(self.xs)

        def __getitem__(self, i: int) -> torch.Tensor:
            if self.slide is None:
                self.slide = openslide.OpenSlide(self.path)
            region = self.slide.read_region((self.xs[i], self.ys[i]), self.level, (self.size, self.size))
            region = region.convert("RGB")
            if self.size != self.px:
                region = region.resize((self.px, self.px), Image.Resampling.BOX)
            return torch.from_numpy(np.asarray(region)).permute(2, 0, 1)

    if args.model == "trained":
        model, info = load_encoder(args.encoder, optimise=False)  # the PatchEncoder as trained, float32
        precision = "float32"
    else:
        model, info = load_encoder(args.encoder)
        dtype = reduced_precision("cpu", True)
        model.set_precision(dtype)
        precision = str(dtype or torch.float32).replace("torch.", "")
    tiles = 0
    for row in pq.read_table(Path(args.tiled) / "slides.parquet").to_pylist():
        if row["status"] not in ("ok", "skipped"):
            continue
        table = pq.read_table(Path(args.tiled) / "tiles" / f"{row['slide_id']}.parquet")
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        px, level = int(meta["nic.tile_px"]), int(row["level"])
        with openslide.OpenSlide(row["path"]) as slide:  # the planned level's px per working px
            scale = float(row["mpp"]) / (float(row["base_mpp"]) * float(slide.level_downsamples[level]))
        size = max(1, round(px * scale))
        dataset = Tiles(row["path"], table.column("x").to_pylist(), table.column("y").to_pylist(),
                        level, size, px)
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.loader_workers)
        for batch in loader:
            model(batch)
            tiles += len(batch)
    Path(args.report).write_text(json.dumps({"tiles": tiles, "precision": precision}))
    return 0


# -- report ------------------------------------------------------------------------------------------

def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def med(values: list[float]) -> float:
    return statistics.median(values)


def report(args: argparse.Namespace, tile_rows: list[dict], comp: dict | None, hs2p: str | None,
           anchor_size: tuple[int, int], load_start: str) -> str:
    argv = " ".join(a for a in sys.argv[1:] if a != "--write")
    lines = [
        START,
        f"Command: `.venv/bin/python benchmarks/bench_peers.py{' ' + argv if argv else ''}`",
        "",
        f"Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}, {ram_gib():.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; load average {load_start} at the start, {load()} at the end.",
        f"Slides: the anchor, {anchor_size[0]:,} x {anchor_size[1]:,} px JPEG pyramid made from small_HE.svs "
        f"({ACROSS} x {DOWN} copies of its pixels), hard-linked per slide. Each time is a whole command in its own "
        f"process, median of {args.repeats} runs, tools interleaved; {args.workers} worker(s) each.",
        "",
    ]
    if tile_rows:
        lines += ["| tile: tissue + tile grid | slides | nic tile (s) | tiles | hs2p (s) | tiles | hs2p / nic |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in tile_rows:
            nic = med(row["nic"])
            if row["hs2p"]:
                peer = med(row["hs2p"])
                tail = f"{peer:.2f} | {row['hs2p_tiles']:,} | {peer / nic:.2f} |"
            else:
                tail = "skipped | | |"
            lines.append(f"| whole command | {row['slides']} | {nic:.2f} | {row['nic_tiles']:,} | {tail}")
        lines.append("")
        if hs2p:
            lines.append(f"hs2p {HS2P_VERSION} (`{hs2p} -m hs2p CONFIG --skip-datetime`): OpenSlide backend, "
                         "0.5 um/px, 128 px tiles, tissue coverage >= 0.5, its default HSV segmentation and "
                         "previews; the tools segment tissue differently, hence different tile counts. Goals "
                         "(issue 16): N slides hs2p / nic >= 1; one slide >= 0.5.")
        else:
            lines.append("hs2p: skipped (not importable; see --hs2p-python).")
        lines.append("")
    if comp:
        nic = med(comp["nic"])
        lines += [
            f"| compress {args.compress_slides} slides ({comp['nic_tiles']:,} tiles, encoder `{args.encoder}`) "
            "| whole command (s) | tiles/s | time / nic's |",
            "| --- | ---: | ---: | ---: |",
            f"| nic compress | {nic:.2f} | {comp['nic_tiles'] / nic:.0f} | 1.00 |",
        ]
        for key, label in (("nic_model", f"DataLoader loop, nic's optimised model ({comp['nic_model_precision']})"),
                           ("trained", f"DataLoader loop, the model as trained ({comp['trained_precision']})")):
            t = med(comp[key])
            lines.append(f"| {label} | {t:.2f} | {comp['loop_tiles'] / t:.0f} | {t / nic:.2f} |")
        lines += ["", f"The loop: per slide a torch Dataset (OpenSlide read_region per tile at the planned level), "
                      f"DataLoader batch {args.batch_size}, {args.loader_workers} loader worker(s), the tiles "
                      "`nic tile` kept (the same as nic compress encoded). Goal (issue 16): nic faster than the "
                      "loop with nic's own model (time / nic's > 1).", ""]
    lines.append(END)
    return "\n".join(lines)


def write_results(table: str) -> None:
    import collect_results

    collect_results.replace_section(RESULTS, START, END, table, "# nic against its peers")
    collect_results.main()
    print(f"wrote {RESULTS} and benchmarks/RESULTS.md", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_loop":
        lp = argparse.ArgumentParser(prog="bench_peers.py _loop")
        lp.add_argument("--tiled", required=True)
        lp.add_argument("--encoder", required=True)
        lp.add_argument("--model", choices=("trained", "nic_model"), required=True)
        lp.add_argument("--batch-size", type=int, default=256)
        lp.add_argument("--loader-workers", type=int, default=2)
        lp.add_argument("--report", required=True)
        return run_loop(lp.parse_args(argv[1:]))

    cpus = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=64, help="slides in the many-slides tile measure")
    ap.add_argument("--compress-slides", type=int, default=8, help="slides compressed (0: no compress measure)")
    ap.add_argument("--workers", type=int, default=cpus, help="workers of nic tile and of hs2p")
    ap.add_argument("--loader-workers", type=int, default=cpus, help="DataLoader workers of the loop")
    ap.add_argument("--encoder", default="random", help="encoder for compress and the loops (a folder or built-in)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hs2p-python", default=None, help="a Python that imports hs2p (default: this one, if it does)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--write", action="store_true", help=f"write the table into {RESULTS.relative_to(REPO)}")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="nic-peers-"))
    load_start = load()
    try:
        anchor = work / "anchor.tiff"
        if not anchor.exists():
            t = time.perf_counter()
            make_anchor(anchor)
            print(f"[bench] anchor slide written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        import openslide

        with openslide.OpenSlide(str(anchor)) as slide:
            anchor_size = slide.dimensions
        hs2p = hs2p_interpreter(args.hs2p_python)
        tile_rows = []
        for n in sorted({1, args.slides}):
            folder = slide_set(anchor, work / f"slides-{n}", n)
            tile_rows.append(bench_tile(folder, work / f"tile-{n}", args.workers, args.repeats, hs2p))
        comp = None
        if args.compress_slides:
            folder = slide_set(anchor, work / f"slides-{args.compress_slides}", args.compress_slides)
            tiled = work / "compress-tiles"
            shutil.rmtree(tiled, ignore_errors=True)
            timed(nic_command() + ["tile", "--slides", str(folder), "--out", str(tiled), "--thumbnail-px", "64"],
                  work / "compress-tiles.log")
            comp = bench_compress(folder, tiled, work / "compress", args)
        table = report(args, tile_rows, comp, hs2p, anchor_size, load_start)
        print(table)
        if args.write:
            write_results(table)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
