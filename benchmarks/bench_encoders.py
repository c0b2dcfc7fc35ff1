"""Encoder forward throughput on CPU: tiles/s at batch 256 for each architecture.

Run:  .venv/bin/python benchmarks/bench_encoders.py [--batch 256] [--seconds 10] [--repeats 3] [--write]

For the reference NIC encoder, the small ResNet and mean RGB it measures what the compression
stage runs: the module `nic.encoders.load_encoder` returns (BatchNorms and input scaling folded
into the convolutions, channels-last), fed uint8 (256, 3, 128, 128) batches. The plain eval-mode
PatchEncoder is measured too, to show what the folding buys. torch uses all cores (threads =
os.cpu_count()), and then one thread (what one `nic compress` actor with one CPU gets). Each
measurement repeats batches for `--seconds` and reports the median of `--repeats` runs, in tiles
per wall-second and tiles per CPU-second (process CPU time over all threads), since the machine
may be shared. `--write` puts the table into
benchmarks/results/encoders.md between the bench_encoders markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nic.encoders import build_encoder, count_parameters, optimise_for_inference

RESULTS = Path(__file__).resolve().parent / "results" / "encoders.md"
START, END = "<!-- bench_encoders:start -->", "<!-- bench_encoders:end -->"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs, {cpu}, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, torch {torch.__version__}"


def measure(module: torch.nn.Module, x: torch.Tensor, seconds: float) -> tuple[float, float]:
    """(tiles per wall-second, tiles per CPU-second) over batches repeated for `seconds`."""
    module(x)  # warm-up: allocator, oneDNN primitive caches
    n = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        module(x)
        n += x.shape[0]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return n / wall, n / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/results/encoders.md")
    args = parser.parse_args()

    all_threads = os.cpu_count() or 1
    x = torch.randint(0, 256, (args.batch, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = []
    for threads in sorted({all_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for arch, dim in (("reference", 128), ("resnet", 128), ("mean-rgb", 3)):
            encoder = build_encoder(arch, dim, 128, seed=0).eval()
            variants = [("load_encoder module (folded, channels-last)", optimise_for_inference(encoder))]
            if arch != "mean-rgb":
                variants.append(("plain eval PatchEncoder", encoder))
            for label, module in variants:
                runs = [measure(module, x, args.seconds) for _ in range(args.repeats)]
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                rows.append((arch, count_parameters(encoder), label, threads, wall, cpu))
                print(f"{arch:10s} {label:45s} threads {threads} {wall:9.0f} tiles/s {cpu:9.0f} tiles/CPU-s",
                      flush=True)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        START,
        f"Command: `.venv/bin/python benchmarks/bench_encoders.py --batch {args.batch} --seconds {args.seconds:g} "
        f"--repeats {args.repeats}`",
        "",
        f"Machine: {machine()}; load average at the end {load} (shared machine).",
        f"Input: uint8 tiles ({args.batch}, 3, 128, 128); median of {args.repeats} runs of {args.seconds:g} s each.",
        "",
        "| architecture | parameters | module | torch threads | tiles/s (wall) | tiles per CPU-second |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for arch, params, label, threads, wall, cpu in rows:
        lines.append(f"| {arch} | {params:,} | {label} | {threads} | {wall:.0f} | {cpu:.0f} |")
    lines.append(END)
    table = "\n".join(lines)
    print(table)
    if args.write:
        from collect_results import replace_section

        replace_section(RESULTS, START, END, table, "# Encoder benchmarks")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
