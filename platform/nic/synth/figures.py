"""Pictures of a synthetic cohort for the README: slide thumbnails, full-resolution details, patches.

    python -m nic.synth.figures COHORT_DIR OUT_DIR

reads what `nic synth` wrote (through OpenSlide and the patch datasets, like any user would) and
writes synth_thumbnail.png, synth_detail.png and synth_patches.png into OUT_DIR.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import yaml

from nic.storage import ensure_local


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(cohort: Path) -> list[dict]:
    with open(cohort / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _pick_slides(cohort: Path, n: int) -> list[dict]:
    """Alternate growth patterns, prefer slides with artefacts so the figure shows them too."""
    truth = {s["params"]["slide_id"]: s["params"] for s in json.loads((cohort / "truth.json").read_text())["slides"]}
    rows = _rows(cohort)

    def score(r: dict) -> int:
        art = truth[r["slide_id"]]["artefacts"]
        return -(int(art["pen"]) + int(art["fold"]) + int(art["blur"]))

    by_pattern = {g: sorted([r for r in rows if r["growth_pattern_name"] == g], key=score) for g in
                  ("desmoplastic", "replacement")}
    picked = []
    for i in range(n):
        pool = by_pattern["desmoplastic" if i % 2 == 0 else "replacement"] or rows
        picked.append(pool[(i // 2) % len(pool)])
    for r in picked:
        r["artefacts"] = [k for k in ("pen", "fold", "blur") if truth[r["slide_id"]]["artefacts"][k]]
    return picked


def thumbnails(cohort: Path, out: Path, n: int = 6) -> None:
    import openslide

    plt = _plt()
    picked = _pick_slides(cohort, n)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(4 * ((n + 1) // 2), 8.4))
    for ax, row in zip(axes.ravel(), picked):
        slide = openslide.OpenSlide(str(ensure_local(cohort / row["path"])))  # rendered on any node
        ax.imshow(slide.get_thumbnail((900, 900)))
        w, h = slide.dimensions
        extra = f", {'+'.join(row['artefacts'])}" if row["artefacts"] else ""
        ax.set_title(f"{row['slide_id']}: {row['growth_pattern_name']}{extra}\n"
                     f"{w} x {h} px, prolif. {float(row['proliferation']):+.2f}", fontsize=9)
        ax.axis("off")
    for ax in axes.ravel()[len(picked):]:
        ax.axis("off")
    fig.suptitle("nic synth: synthetic H&E slides (thumbnails read back with OpenSlide)", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def details(cohort: Path, out: Path, size: int = 700) -> None:
    """Full-resolution crops at the tumour border of a desmoplastic and a replacement slide."""
    import openslide

    from nic.synth.params import TUMOUR, SlideParams
    from nic.synth.render import Scene

    plt = _plt()
    truth = json.loads((cohort / "truth.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.3))
    for ax, pattern in zip(axes, ("desmoplastic", "replacement")):
        entry = next(s for s in truth["slides"] if s["params"]["growth_pattern"] == pattern)
        params = SlideParams.from_dict(entry["params"])
        scene = Scene(params)
        classes = scene.layout.classes
        # a map pixel on the tumour border, away from the slide edge
        tumour = classes == TUMOUR
        border = tumour & ~np.roll(tumour, 3, axis=1)
        ys, xs = np.nonzero(border)
        k = len(ys) // 2
        scale = scene.layout.map_um / params.mpp
        cy = int(np.clip(ys[k] * scale, size // 2, params.height - size // 2))
        cx = int(np.clip(xs[k] * scale, size // 2, params.width - size // 2))
        slide = openslide.OpenSlide(str(cohort / f"slides/{params.slide_id}.tiff"))
        crop = slide.read_region((cx - size // 2, cy - size // 2), 0, (size, size)).convert("RGB")
        ax.imshow(crop)
        ax.set_title(f"{params.slide_id}, {pattern} border, level 0 ({size * params.mpp:.0f} um wide)", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _load_task(cohort: Path, task: dict, n_per_class: int) -> list[tuple[str, list[np.ndarray]]]:
    from PIL import Image

    path = cohort / task["path"]
    if task["format"] == "folder":
        return [(c, [np.asarray(Image.open(p).convert("RGB")) for p in sorted((path / c).glob("*.png"))[:n_per_class]])
                for c in task["classes"]]
    if task["format"] == "hdf5":
        import h5py

        with h5py.File(path, "r") as f:
            x, y = f["x"][:], f["y"][:].ravel()
        return [(c, list(x[y == i][:n_per_class])) for i, c in enumerate(task["classes"])]
    with open(path, newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: float(r["label"]))
    picks = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n_per_class)]
    return [("count " + ", ".join(f"{float(r['label']):.0f}" for r in picks),
             [np.asarray(Image.open(path.parent / r["path"]).convert("RGB")) for r in picks])]


def patch_sheet(cohort: Path, out: Path, n_per_class: int = 8) -> None:
    plt = _plt()
    tasks = yaml.safe_load((cohort / "tasks.yaml").read_text())["tasks"]
    rows = []
    for task in tasks:
        if task["kind"] in ("segmentation", "nuclei"):  # per-pixel labels: no one label per patch to show
            continue
        for name, images in _load_task(cohort, task, n_per_class):
            if images:
                rows.append((f"{task['name']}: {name}", images))
    fig, axes = plt.subplots(len(rows), 1, figsize=(n_per_class * 1.3, len(rows) * 1.45))
    for ax, (label, images) in zip(np.atleast_1d(axes), rows):
        strip = np.concatenate([np.pad(im, ((0, 0), (0, 4), (0, 0)), constant_values=255) for im in images], axis=1)
        ax.imshow(strip)
        ax.set_title(label, fontsize=9, loc="left")
        ax.axis("off")
    fig.suptitle("nic synth patch datasets (128 px at 0.5 um/px), one label per task", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def make_figures(cohort: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "synth_thumbnail.png", out_dir / "synth_detail.png", out_dir / "synth_patches.png"]
    thumbnails(cohort, paths[0])
    details(cohort, paths[1])
    patch_sheet(cohort, paths[2])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    for path in make_figures(args.cohort, args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
