"""Downstream throughput on CPU: grid reads, crops from the lazy dataset, training steps of the NIC
grid CNN and the attention-MIL head, test-time averaging per slide, and the Cox loss.

Run:  .venv/bin/python benchmarks/bench_downstream.py [--grid 200] [--channels 128] [--crop 128] [--repeats 3]

Writes a few synthetic grid files (grid x grid cells, C channels, an elliptic tissue blob covering
~60 % of the cells, written through nic.grids), then measures in one process, one torch thread:
  - load_grid: grids per second (Parquet -> dense (C, H, W) float32),
  - GridDataset: random crops per second, cold (every item reads its grid) and warm (LRU cache hits),
  - a training step (forward + backward + Adam) of each model at batch 16, R x R crops: crops/s,
  - TTA: seconds per slide for T = 10 crops x 8 rotations/flips,
  - cox_ph_loss (Efron) forward + backward at batch 16 and 100 000.
Medians of --repeats runs; CPU seconds as well as wall seconds (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from downstream_helpers import blob_mask, write_grid  # noqa: E402
from nic.downstream.dataset import GridDataset, GridSource  # noqa: E402
from nic.downstream.evaluate import tta_predict_slide  # noqa: E402
from nic.downstream.losses import cox_ph_loss, cross_entropy  # noqa: E402
from nic.downstream.models import build_model  # noqa: E402
from nic.grids.reader import load_grid  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall s, median CPU s) of fn()."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", type=int, default=200, help="Grid side in cells (200 = a ~25k px slide).")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []

    with tempfile.TemporaryDirectory(prefix="nicb-") as tmp:
        grids = Path(tmp) / "grids"
        ids = [f"s{i}" for i in range(args.slides)]
        for sid in ids:
            mask = blob_mask(args.grid, args.grid, rng)
            emb = rng.normal(size=(args.channels, args.grid, args.grid)).astype(np.float32)
            emb[:, ~mask] = 0
            write_grid(grids, sid, emb, mask)
        size_mb = sum(p.stat().st_size for p in grids.rglob("*.parquet")) / 2**20
        tiles = int(load_grid(grids, ids[0])[1].sum())

        wall, cpu = timed(lambda: [load_grid(grids, s) for s in ids], args.repeats)
        rows.append(("load_grid (Parquet -> dense grid)", f"{len(ids) / wall:.1f} grids/s", f"{len(ids) / cpu:.1f} grids/CPU-s"))

        n_items = 32
        targets = {"target": np.zeros(len(ids), dtype=np.int64)}

        def crops(ds: GridDataset):
            for i in range(n_items):
                ds[i % len(ids)]

        wall, cpu = timed(lambda: crops(GridDataset(grids, ids, targets, args.crop, train=True, cache_size=0)),
                          args.repeats)
        rows.append((f"random {args.crop}^2 crops, cold (a grid read per crop)", f"{n_items / wall:.1f} crops/s",
                     f"{n_items / cpu:.1f} crops/CPU-s"))
        warm = GridDataset(grids, ids, targets, args.crop, train=True, cache_size=len(ids))
        crops(warm)  # fill the cache
        wall, cpu = timed(lambda: crops(warm), args.repeats)
        rows.append((f"random {args.crop}^2 crops, warm (LRU holds all {len(ids)} grids)", f"{n_items / wall:.1f} crops/s",
                     f"{n_items / cpu:.1f} crops/CPU-s"))

        batch = torch.randn(16, args.channels, args.crop, args.crop)
        mask = torch.ones(16, args.crop, args.crop, dtype=torch.bool)
        y = torch.randint(0, 2, (16,))
        for name in ("nic-cnn", "attention-mil"):
            model = build_model(name, args.channels, 1)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt):
                out = model(batch, mask)
                loss = cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            wall, cpu = timed(step, args.repeats)
            params = sum(p.numel() for p in model.parameters())
            rows.append((f"train step {name} ({params / 1e3:.0f} k params), batch 16 x {args.crop}^2",
                         f"{16 / wall:.1f} crops/s", f"{16 / cpu:.1f} crops/CPU-s"))

            model.eval()
            source = GridSource(grids, cache_size=1)
            wall, cpu = timed(lambda model=model, source=source: tta_predict_slide(model, source, ids[0], "binary", args.crop,
                                                                                   tta_crops=10), args.repeats)
            rows.append((f"TTA {name}: 10 crops x 8 transforms, one slide", f"{wall:.2f} s/slide", f"{cpu:.2f} CPU-s/slide"))

        for n in (16, 100_000):
            eta = torch.randn(n, requires_grad=True)
            t = torch.from_numpy(rng.integers(1, 200, n).astype(np.float32))
            e = torch.from_numpy((rng.random(n) < 0.6).astype(np.float32))

            def cox(eta=eta, t=t, e=e):
                cox_ph_loss(eta, t, e).backward()

            wall, cpu = timed(cox, max(args.repeats, 5))
            rows.append((f"cox_ph_loss Efron fwd+bwd, n={n}", f"{wall * 1e3:.2f} ms", f"{cpu * 1e3:.2f} CPU-ms"))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Command: `.venv/bin/python benchmarks/bench_downstream.py --grid {args.grid} --channels {args.channels} "
          f"--crop {args.crop} --slides {args.slides} --repeats {args.repeats}`\n")
    print(f"Grids: {args.slides} x {args.grid}^2 cells, C={args.channels}, {tiles} tissue cells each, "
          f"{size_mb:.1f} MiB of Parquet in all. torch {torch.__version__}, 1 thread; {os.cpu_count()} CPUs, "
          f"load average at the end {load}.\n")
    print("| measure | wall | CPU |\n| --- | ---: | ---: |")
    for name, wall_text, cpu_text in rows:
        print(f"| {name} | {wall_text} | {cpu_text} |")


if __name__ == "__main__":
    main()
