"""Labelled patch datasets for training the patch encoder, one task each, in the platform's formats.

Patches are cut from small "canvases" rendered by the slide renderer at the patch resolution, so
they look exactly like tiles of the synthetic slides. Each canvas has its own stain and biology
(like a small slide), and gives canvas_patches^2 patches. Every patch carries its own task's label
only:

| task | kind | label | format |
| --- | --- | --- | --- |
| tissue_type | multiclass | the canvas's single tissue class | folders of PNG by class |
| tumour | binary | tumour in the central 32 x 32 px (PCam's rule) | HDF5 `x`/`y` as PCam |
| mitosis | binary | a mitotic figure placed near the centre (rare) | folders of PNG by class |
| lymphocyte_density | regression | lymphocyte nuclei centred in the patch | CSV manifest path,label |

The formats differ on purpose, so every reader of `nic.patches` is exercised by the demo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nic.config.synth import SynthConfig
from nic.synth.labels import sample_look
from nic.synth.params import BACKGROUND, CLASSES, FAT, GROWTH_PATTERNS, TUMOUR, Artefacts, SlideParams
from nic.synth.render import KIND_LYMPHOCYTE, KIND_MITOSIS, Scene
from nic.synth.sprites import VARIANTS

# tissue_type classes in the order of the task's label indices
TISSUE_TYPE_CLASSES = ("stroma", "tumour", "lymphocytes", "necrosis", "fat", "background")
_TISSUE_CLASS_INDEX = {name: CLASSES.index(name) for name in TISSUE_TYPE_CLASSES}
assert _TISSUE_CLASS_INDEX["background"] == BACKGROUND and _TISSUE_CLASS_INDEX["fat"] == FAT


@dataclass(frozen=True)
class TaskSpec:
    """A patch task as written to tasks.yaml."""

    name: str
    kind: str  # multiclass | binary | regression
    classes: tuple[str, ...] | None
    format: str  # folder | hdf5 | manifest
    path: str  # relative to tasks.yaml
    val_path: str
    weight: float = 1.0

    def to_yaml_dict(self) -> dict:
        out: dict = {"name": self.name, "kind": self.kind}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        out.update(format=self.format, path=self.path, val_path=self.val_path, weight=self.weight)
        return out


TASKS: dict[str, TaskSpec] = {
    "tissue_type": TaskSpec(
        "tissue_type", "multiclass", TISSUE_TYPE_CLASSES, "folder", "patches/tissue_type", "patches/tissue_type_val"
    ),
    "tumour": TaskSpec(
        "tumour", "binary", ("non_tumour", "tumour"), "hdf5", "patches/tumour/train.h5", "patches/tumour/val.h5"
    ),
    "mitosis": TaskSpec("mitosis", "binary", ("absent", "present"), "folder", "patches/mitosis", "patches/mitosis_val"),
    "lymphocyte_density": TaskSpec(
        "lymphocyte_density",
        "regression",
        None,
        "manifest",
        "patches/lymphocyte_density/train.csv",
        "patches/lymphocyte_density/val.csv",
    ),
}
TASK_ORDER = tuple(TASKS)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Chunk:
    """One Ray task's worth of canvases of one task and split."""

    task: str
    split: str
    index: int
    first_patch: int  # global index of this chunk's first patch in its split
    n_patches: int


def canvas_side(config: SynthConfig, task: str) -> int:
    """Patches per canvas side. Tissue type uses at most 2 x 2, so its classes (one per canvas)
    stay balanced and varied even in small datasets."""
    n = config.patches.canvas_patches
    return min(n, 2) if task == "tissue_type" else n


def plan_chunks(config: SynthConfig) -> list[Chunk]:
    """Split each (task, split) into chunks of `chunk_canvases` canvases; deterministic."""
    opts = config.patches
    chunks = []
    for task in opts.tasks:
        per_chunk = opts.canvas_patches**2 * opts.chunk_canvases  # same patch count for every task
        for split in SPLITS:
            total = opts.train if split == "train" else opts.val
            for i, start in enumerate(range(0, total, per_chunk)):
                chunks.append(Chunk(task, split, i, start, min(per_chunk, total - start)))
    return chunks


def _canvas_params(rng: np.random.Generator, config: SynthConfig, canvas_px: int, **overrides) -> SlideParams:
    stain, appearance = sample_look(rng, config.render.stain_variation)
    values = dict(
        slide_id="canvas",
        patient_id="canvas",
        seed=int(rng.integers(0, 2**62)),
        width=canvas_px,
        height=canvas_px,
        mpp=config.patches.mpp,
        stain=stain,
        appearance=appearance,
        growth_pattern=GROWTH_PATTERNS[int(rng.integers(2))],
        mitotic_fraction=float(config.signal.mitotic_fraction * math.exp(rng.normal(0, 0.6))),
        til_density=float(rng.uniform(0.0, 1.0)),
        necrosis_fraction=float(rng.uniform(0.02, 0.3)),
        tumour_fraction=float(rng.uniform(0.3, 0.6)),
        fat_fraction=float(rng.uniform(0.2, 0.6)),
        snr=config.signal.snr,
        artefacts=Artefacts(),
        texture_offset=(float(rng.uniform(0, 512)), float(rng.uniform(0, 512))),
        layout="fill",
    )
    values.update(overrides)
    return SlideParams(**values)


def _cut(image: np.ndarray, n: int, px: int) -> list[np.ndarray]:
    return [image[r * px : (r + 1) * px, c * px : (c + 1) * px] for r in range(n) for c in range(n)]


def render_chunk(config: SynthConfig, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """Patches (N, px, px, 3) uint8 and labels (N,) float32 of one chunk; pure function of its inputs."""
    opts = config.patches
    n, px = canvas_side(config, chunk.task), opts.patch_px
    canvas_px = n * px
    task_index = TASK_ORDER.index(chunk.task)
    seq = np.random.SeedSequence([config.seed, 7, task_index, SPLITS.index(chunk.split), chunk.index])
    rng = np.random.default_rng(seq)
    images: list[np.ndarray] = []
    labels: list[float] = []
    canvas = 0
    if chunk.task == "mitosis":
        # exactly the wanted fraction of positives over the split, shuffled within the chunk
        f = opts.mitosis_positive_fraction
        n_pos = math.floor((chunk.first_patch + chunk.n_patches) * f + 0.5) - math.floor(chunk.first_patch * f + 0.5)
        wanted = np.zeros(-(-chunk.n_patches // (n * n)) * n * n, bool)
        wanted[rng.choice(chunk.n_patches, n_pos, replace=False)] = True
    while len(images) < chunk.n_patches:
        global_canvas = chunk.first_patch // (n * n) + canvas
        if chunk.task == "tissue_type":
            name = TISSUE_TYPE_CLASSES[global_canvas % len(TISSUE_TYPE_CLASSES)]
            # a pure class: few infiltrating lymphocytes, so stroma does not look lymphoid
            p = _canvas_params(rng, config, canvas_px, layout="uniform", uniform_class=_TISSUE_CLASS_INDEX[name],
                               til_density=float(rng.uniform(0.0, 0.3)))
            scene = Scene(p)
            patches = _cut(scene.render(0, 0, canvas_px, canvas_px), n, px)
            labels.extend([float(TISSUE_TYPE_CLASSES.index(name))] * len(patches))
        elif chunk.task == "tumour":
            p = _canvas_params(rng, config, canvas_px, tumour_fraction=float(rng.uniform(0.35, 0.6)))
            scene = Scene(p)
            patches = _cut(scene.render(0, 0, canvas_px, canvas_px), n, px)
            q = px // 4  # PCam: positive when the central 32 x 32 of 96 px holds tumour
            for k in range(n * n):
                r, c = divmod(k, n)
                centre = scene.classes(r * px + px // 2 - q // 2, c * px + px // 2 - q // 2, q, q)
                labels.append(float((centre == TUMOUR).any()))
        elif chunk.task == "mitosis":
            # tumour epithelium without natural mitoses; figures are placed near chosen centres
            p = _canvas_params(rng, config, canvas_px, layout="uniform", uniform_class=TUMOUR, mitotic_fraction=0.0)
            positive = wanted[canvas * n * n : (canvas + 1) * n * n]
            jitter = rng.integers(-px // 8, px // 8 + 1, size=(n * n, 2))
            variant = rng.integers(0, VARIANTS, n * n)
            extra = []
            for k in np.flatnonzero(positive):
                r, c = divmod(int(k), n)
                extra.append((r * px + px // 2 + jitter[k, 0], c * px + px // 2 + jitter[k, 1], KIND_MITOSIS, variant[k]))
            scene = Scene(p, extra_nuclei=np.array(extra, np.int32).reshape(-1, 4))
            patches = _cut(scene.render(0, 0, canvas_px, canvas_px), n, px)
            labels.extend(float(v) for v in positive)
        elif chunk.task == "lymphocyte_density":
            p = _canvas_params(rng, config, canvas_px, til_density=float(rng.beta(1.2, 1.5)))
            scene = Scene(p)
            patches = _cut(scene.render(0, 0, canvas_px, canvas_px), n, px)
            nuc = scene.nuclei(0, 0, canvas_px, canvas_px)
            lymph = nuc[nuc[:, 2] == KIND_LYMPHOCYTE]
            counts = np.zeros((n, n), np.float32)
            np.add.at(counts, (lymph[:, 0] // px, lymph[:, 1] // px), 1.0)
            labels.extend(float(v) for v in counts.ravel())
        else:  # guarded by PatchOptions validation
            raise ValueError(f"unknown patch task {chunk.task!r}")
        images.extend(patches)
        canvas += 1
    x = np.stack(images[: chunk.n_patches]).astype(np.uint8)
    y = np.asarray(labels[: chunk.n_patches], np.float32)
    return x, y


def png_name(task: str, split: str, index: int) -> str:
    return f"{task}_{split}_{index:06d}.png"


def write_pngs(folder: Path, task: str, split: str, first: int, x: np.ndarray, y: np.ndarray) -> list[str]:
    """Write patches as PNG; class subfolders for classification tasks, flat for regression.

    Returns the file names relative to `folder`.
    """
    spec = TASKS[task]
    names = []
    for i, (image, label) in enumerate(zip(x, y)):
        name = png_name(task, split, first + i)
        if spec.classes is not None:
            rel = Path(spec.classes[int(label)]) / name
        else:
            rel = Path("images") / name
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # level 1: 4x faster than PIL's default on these textured patches, ~15 % larger files
        Image.fromarray(image).save(target, format="PNG", compress_level=1)
        names.append(rel.as_posix())
    return names


def class_names_for(task: str) -> tuple[str, ...] | None:
    return TASKS[task].classes

