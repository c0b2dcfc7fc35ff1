"""Labelled patch datasets for training the patch encoder, one task each, in the platform's formats.

Patches are cut from small "canvases" rendered by the slide renderer at the patch resolution, so
they look exactly like tiles of the synthetic slides. Each canvas has its own stain and biology
(like a small slide), and gives canvas_patches^2 patches. Every patch carries its own task's label
only:

| task | kind | canvases | label | format | review for nic-synth-2 |
| --- | --- | --- | --- | --- | --- |
| tissue_type | multiclass | one tissue class, few TILs | the canvas's class | folders of PNG by class | labels right (pure-class tiles, as Kather's); tumour now with the slides' mitotic and apoptotic rates |
| tumour | binary | mixed tissue, 35-60 % tumour | tumour in the central 32 x 32 px (PCam's rule) | HDF5 `x`/`y` as PCam | labels right (from the rendered class of every pixel); tumour as in slides, as above |
| mitosis | binary | mixed tissue, 65-95 % tumour, TILs, apoptotic bodies, figures at an enriched rate | 1: a figure centre >= 2 um inside the tile; 0: none inside nor within 5 um (at snr 0.7) outside | folders of PNG by class | redesigned, below; loss weight 2 |
| lymphocyte_density | regression | mixed tissue, TIL density ~ Beta(1.2, 1.5) | lymphocyte centres inside the tile | CSV manifest path,label | labels right (apoptotic bodies, new look-alikes, are not counted); tumour as in slides |
| apoptosis (held out, opt-in) | binary | the mitosis canvases with the roles swapped: apoptotic bodies enriched, figures as look-alikes | 1: an apoptotic body's centre >= 3 um inside the tile; 0: none inside nor within 4 um outside | HDF5 `x`/`y` + `canvas` | for the transfer benchmark; no encoder trains on it |

All canvases now draw the mitotic fraction as a slide does (median x exp(spread z) x (0.3 + 0.7 snr);
it used to ignore snr and the configured spread) and carry apoptotic bodies at a slide's rate, so
their tumour looks like the slides' tumour.

Mitosis. The encoder must find figures as they appear in tiles cut from slides, where the
proliferation target is a count of them. Figures therefore arise as in slides, tumour nuclei drawn
as mitotic figures (`SlideParams.mitotic_fraction`), anywhere in the tile, one or several. (The
positives of nic-synth-1, one figure pasted within 16 px of the centre of figure-free tumour,
taught a centre detector blind to most figures of a slide: val AUC 0.61-0.68.) A canvas's rate is
enriched over slides' (`_figures_per_tile`, log-normal between canvases so some tiles hold
several), then tiles are taken per chunk in a fixed order until the split holds exactly
`mitosis_positive_fraction` positives. Tiles with a figure centre in the border band (less than
2 um inside, up to ~5 um outside: only part of a figure shows) are ambiguous and dropped, not
mislabelled. Negatives are figure-free tiles of the same canvases, 85 % of them tumour-bearing, so
they hold the look-alikes of slides: lymphocytes, apoptotic bodies (enriched like the figures),
necrotic debris and lymphoid aggregates; darkness alone does not tell the classes apart.

Apoptosis (held out). A rare-cell detection task no encoder trains on, for the transfer benchmark
(benchmarks/bench_transfer.py: a linear probe on frozen embeddings), as Cerberus's signet-ring
cells. It is the mitosis task's machinery (`Detection`, `plan_detection_chunk`) with apoptotic
bodies as the target: canvases as the mitosis task's, their apoptotic rate steered so each split
holds exactly APOPTOSIS_POSITIVE_FRACTION positives, mitotic figures at the enriched look-alike
rate, 85 % of the negatives tumour-bearing, border-band tiles dropped. The nuclei task leaves
apoptotic bodies as background and the mitosis task has them among its negatives, so an encoder
has seen them, but none was ever taught to report one. `nic synth` lists it in heldout_tasks.yaml,
never in tasks.yaml, and its HDF5 records each tile's canvas so the probe's folds can keep a
canvas's tiles together.

The formats differ on purpose, so every reader of `nic.patches` is exercised by the demo.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nic.config.synth import HELDOUT_TASKS, SynthConfig
from nic.synth.labels import apoptotic_fraction, sample_look
from nic.synth.params import BACKGROUND, CLASSES, FAT, GROWTH_PATTERNS, TUMOUR, Artefacts, SlideParams
from nic.synth.render import KIND_APOPTOTIC, KIND_LYMPHOCYTE, KIND_MITOSIS, KIND_TUMOUR, NUCLEI, Scene
from nic.synth.sprites import mitosis_scale

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


MITOSIS_WEIGHT = 2.0
"""Loss weight of the mitosis task in tasks.yaml (the others have 1; train-encoder's task_weights
override it). A figure covers ~1 % of a tile while the other tasks read the whole tile, and the
binary loss at chance (~0.65 at 35 % positives) is well below tissue_type's (ln 6 = 1.8), so at
weight 1 its share of the shared trunk's gradient is the smallest of the four."""

TASKS: dict[str, TaskSpec] = {
    "tissue_type": TaskSpec(
        "tissue_type", "multiclass", TISSUE_TYPE_CLASSES, "folder", "patches/tissue_type", "patches/tissue_type_val"
    ),
    "tumour": TaskSpec(
        "tumour", "binary", ("non_tumour", "tumour"), "hdf5", "patches/tumour/train.h5", "patches/tumour/val.h5"
    ),
    "mitosis": TaskSpec(
        "mitosis", "binary", ("absent", "present"), "folder", "patches/mitosis", "patches/mitosis_val", MITOSIS_WEIGHT
    ),
    "lymphocyte_density": TaskSpec(
        "lymphocyte_density",
        "regression",
        None,
        "manifest",
        "patches/lymphocyte_density/train.csv",
        "patches/lymphocyte_density/val.csv",
    ),
    # dense tasks (nic.synth.dense): new entries go at the end, a task's position seeds its chunks
    "nuclei": TaskSpec(
        "nuclei", "nuclei", ("tumour", "lymphocyte", "stroma", "mitotic_figure"), "hdf5", "patches/nuclei/train.h5",
        "patches/nuclei/val.h5"
    ),
    "tissue_regions": TaskSpec(
        "tissue_regions", "segmentation", CLASSES, "folder", "patches/tissue_regions", "patches/tissue_regions_val"
    ),
    # held out of encoder training (the transfer benchmark, benchmarks/bench_transfer.py): written
    # to heldout_tasks.yaml, never to tasks.yaml
    "apoptosis": TaskSpec(
        "apoptosis", "binary", ("absent", "present"), "hdf5", "patches/apoptosis/train.h5", "patches/apoptosis/val.h5"
    ),
}
DENSE = ("nuclei", "tissue_regions")
HELD_OUT = HELDOUT_TASKS
"""Tasks no encoder trains on: `nic synth` lists them in heldout_tasks.yaml, not tasks.yaml, so
neither train-encoder nor tune can pick them up; their HDF5 also holds `canvas` (N,) int32, the
canvas each tile was cut from (tiles of one canvas share stain and tissue: keep them in one fold)."""
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
    """A canvas's parameters, sampled like a slide's; `overrides` replace any of them.

    Draw order is part of the datasets' definition (a chunk is a pure function of its seed): new
    draws go at the end.
    """
    sig = config.signal
    stain, appearance = sample_look(rng, config.render.stain_variation)
    values: dict[str, Any] = dict(
        slide_id="canvas",
        patient_id="canvas",
        seed=int(rng.integers(0, 2**62)),
        width=canvas_px,
        height=canvas_px,
        mpp=config.patches.mpp,
        stain=stain,
        appearance=appearance,
        growth_pattern=GROWTH_PATTERNS[int(rng.integers(2))],
        # as a slide's (labels.mitotic_fraction), the patient's z drawn here
        mitotic_fraction=float(min(0.15, sig.mitotic_fraction * math.exp(sig.mitotic_spread * rng.normal())
                                   * (0.3 + 0.7 * sig.snr))),
        til_density=float(rng.uniform(0.0, 1.0)),
        necrosis_fraction=float(rng.uniform(0.02, 0.3)),
        tumour_fraction=float(rng.uniform(0.3, 0.6)),
        fat_fraction=float(rng.uniform(0.2, 0.6)),
        snr=config.signal.snr,
        artefacts=Artefacts(),
        texture_offset=(float(rng.uniform(0, 512)), float(rng.uniform(0, 512))),
        layout="fill",
        apoptotic_fraction=apoptotic_fraction(rng, config),
    )
    values.update(overrides)
    return SlideParams(**values)


# ---------------------------------------------------------------------------------------- mitosis
MITOSIS_MARGIN_IN_UM = 3.0
"""A positive's figure centre lies at least this far inside the tile: most of the figure shows."""
MITOSIS_MARGIN_OUT_UM = 5.0
"""A negative has no figure centre within this distance (times `mitosis_scale(snr)`: 4.9 um at
snr 0.7, 5.8 at 1) outside the tile either: a figure reaches 4.5 um from its centre at snr 0.7
(median; 5.8 um at the 90th percentile), so at most a sliver of one shows. Tiles with a figure
centre in the band between are ambiguous and not used."""
MITOSIS_SPREAD = 0.8
"""SD of log(figures per tumour tile) between mitosis canvases: some canvases have several per tile."""
MITOSIS_TUMOUR = (0.65, 0.95)
"""Tumour fraction of mitosis canvases (uniform): tumour-rich, with stroma, fat and aggregates."""
MITOSIS_TILS = (0.1, 1.0)
"""TIL density of mitosis canvases (uniform): dense lymphocytes are the commonest look-alike."""
MITOSIS_APOPTOTIC = 0.02
"""Median apoptotic fraction of mitosis canvases (log-normal, SD 0.7): about as many apoptotic bodies
as figures, i.e. enriched over slides (0.004) like the figures themselves."""
_TUMOUR_CELL_KINDS = (KIND_TUMOUR, KIND_MITOSIS, KIND_APOPTOTIC)
_TUMOUR_SPEC = next(spec for spec in NUCLEI if spec.kind == KIND_TUMOUR)
_TUMOUR_SPACING_UM = _TUMOUR_SPEC.spacing_um
assert _TUMOUR_SPACING_UM is not None, "tumour nuclei lie on a jittered grid, not Poisson"
TUMOUR_NUCLEI_PER_UM2 = _TUMOUR_SPEC.accept[TUMOUR] / _TUMOUR_SPACING_UM**2 * 0.85
"""Tumour nuclei per um^2 of tumour (the grid's, less ~15 % for gland lumens; measured ~28 per
64 um tile). Converts figures per tile into a mitotic fraction."""
MITOSIS_TUMOUR_BEARING = 8
"""Tumour-cell nuclei (tumour, mitotic, apoptotic) centred in a tile that make it tumour-bearing,
about a third of a tile full of tumour."""
MITOSIS_OTHER_NEGATIVES = 0.15
"""Share of the negatives that are not tumour-bearing (stroma, fat, lymphoid aggregates, necrotic
debris). The rest are tumour-bearing, like nearly all positives, so that the amount of tumour in a
tile does not stand in for the figure. Measured, a tile's tumour-cell count alone separates the
classes with AUC 0.69 when negatives are left to chance, 0.64 with this split: about the 0.60 found
among tumour-bearing tiles, where more tumour cells do mean more chances of a figure."""


@dataclass(frozen=True)
class DetectionTile:
    """One tile of a detection canvas (mitosis, apoptosis): where, its label and what it holds."""

    canvas: int  # index of the canvas in the chunk's sequence
    y0: int
    x0: int
    label: float | None  # None: ambiguous (a target centre in the border band), never used
    targets: np.ndarray  # (k, 2) target nuclei centres (y, x) relative to the tile, within the outer margin
    tumour_nuclei: int  # tumour-cell nuclei centred in the tile

    @property
    def group(self) -> str | None:
        """The quota the tile counts against: positive, tumour (negative) or other (negative)."""
        if self.label is None:
            return None
        if self.label == 1.0:
            return "positive"
        return "tumour" if self.tumour_nuclei >= MITOSIS_TUMOUR_BEARING else "other"


def _figures_per_tile(positive_fraction: float, core_share: float) -> float:
    """Median figures per tumour tile m at which tiles full of tumour are positive with probability
    `positive_fraction`: E_z[1 - exp(-m exp(MITOSIS_SPREAD z) core_share)] = fraction (Gauss-Hermite
    over z, bisection on log m).

    Over a canvas's usable tiles the positive share then comes out close to the fraction (measured
    0.34 at 0.35, 0.13 at 0.15): tiles with less tumour are offset by the ambiguous ones
    dropped. The per-chunk selection makes it exact; this only keeps the canvases it discards few.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(24)
    weights = weights / weights.sum()
    target = min(positive_fraction, 0.97)
    lo, hi = math.log(1e-3), math.log(20.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        share = float(np.sum(weights * (1 - np.exp(-math.exp(mid) * np.exp(MITOSIS_SPREAD * nodes) * core_share))))
        lo, hi = (mid, hi) if share < target else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def _mitosis_params(rng: np.random.Generator, config: SynthConfig, canvas_px: int, per_tile: float) -> SlideParams:
    """A tumour-rich canvas with look-alikes, its mitotic rate drawn around `per_tile` figures/tile."""
    tile_um2 = (config.patches.patch_px * config.patches.mpp) ** 2
    figures = per_tile * math.exp(MITOSIS_SPREAD * rng.normal())
    return _canvas_params(
        rng, config, canvas_px,
        tumour_fraction=float(rng.uniform(*MITOSIS_TUMOUR)),
        til_density=float(rng.uniform(*MITOSIS_TILS)),
        mitotic_fraction=float(min(0.15, figures / (TUMOUR_NUCLEI_PER_UM2 * tile_um2))),
        apoptotic_fraction=float(min(0.15, MITOSIS_APOPTOTIC * math.exp(0.7 * rng.normal()))),
    )


def _apoptosis_params(rng: np.random.Generator, config: SynthConfig, canvas_px: int, per_tile: float) -> SlideParams:
    """The mitosis canvases with the roles swapped: the apoptotic rate drawn around `per_tile` bodies
    per tile, mitotic figures (the look-alikes here) at the rate mitosis canvases have apoptotic bodies."""
    tile_um2 = (config.patches.patch_px * config.patches.mpp) ** 2
    bodies = per_tile * math.exp(MITOSIS_SPREAD * rng.normal())
    return _canvas_params(
        rng, config, canvas_px,
        tumour_fraction=float(rng.uniform(*MITOSIS_TUMOUR)),
        til_density=float(rng.uniform(*MITOSIS_TILS)),
        mitotic_fraction=float(min(0.15, MITOSIS_APOPTOTIC * math.exp(0.7 * rng.normal()))),
        apoptotic_fraction=float(min(0.15, bodies / (TUMOUR_NUCLEI_PER_UM2 * tile_um2))),
    )


@dataclass(frozen=True)
class Detection:
    """A binary detection task on tumour-rich canvases: a tile is positive when a nucleus of `kind`
    is centred `margin_in_um` or more inside it, negative when none is centred in it or within
    `margin_out_um` outside it (times `mitosis_scale(snr)` if `scales_with_snr`), else ambiguous."""

    kind: int
    margin_in_um: float
    margin_out_um: float
    scales_with_snr: bool
    params: Callable[[np.random.Generator, SynthConfig, int, float], SlideParams]
    positive_fraction: float | None  # None: patches.mitosis_positive_fraction

    def fraction(self, config: SynthConfig) -> float:
        return config.patches.mitosis_positive_fraction if self.positive_fraction is None else self.positive_fraction


APOPTOSIS_MARGIN_OUT_UM = 4.0
"""A negative of the apoptosis task has no apoptotic body centred within this distance outside the
tile: a body's dense pink cell reaches at most 3.8 um from its centre (its pale halo up to 5.4 um),
so at most a sliver of halo shows. The inner margin is the mitosis task's."""
APOPTOSIS_POSITIVE_FRACTION = 0.5
"""Positives of the apoptosis task, exact over each split: balanced, for the tightest probe AUC."""

DETECTIONS: dict[str, Detection] = {
    "mitosis": Detection(KIND_MITOSIS, MITOSIS_MARGIN_IN_UM, MITOSIS_MARGIN_OUT_UM, True, _mitosis_params, None),
    "apoptosis": Detection(KIND_APOPTOTIC, MITOSIS_MARGIN_IN_UM, APOPTOSIS_MARGIN_OUT_UM, False, _apoptosis_params,
                           APOPTOSIS_POSITIVE_FRACTION),
}


def detection_tile(scene: Scene, canvas: int, y0: int, x0: int, px: int, task: str = "mitosis") -> DetectionTile:
    """The tile at (y0, x0), labelled from the scene's nuclei: 1.0 if a target nucleus's centre lies
    the inner margin or more inside it, 0.0 if no target centre lies in it or within the outer margin
    outside it, None otherwise (ambiguous: only part of a target shows). Targets: mitotic figures
    (mitosis, outer margin scaled with the figures' size) or apoptotic bodies (apoptosis)."""
    det = DETECTIONS[task]
    m_in = int(round(det.margin_in_um / scene.mpp))
    scale = mitosis_scale(scene.params.snr) if det.scales_with_snr else 1.0
    m_out = int(round(det.margin_out_um * scale / scene.mpp))
    nuc = scene.nuclei(y0, x0, px, px, margin=m_out)
    rel = nuc[:, :2].astype(np.int64) - np.array([y0, x0])
    inside = ((rel >= 0) & (rel < px)).all(axis=1)
    tumour = int(np.isin(nuc[inside, 2], _TUMOUR_CELL_KINDS).sum())
    found = rel[nuc[:, 2] == det.kind]
    label: float | None = 0.0
    if len(found):
        label = 1.0 if ((found >= m_in) & (found < px - m_in)).all(axis=1).any() else None
    return DetectionTile(canvas, y0, x0, label, found, tumour)


def mitosis_tile(scene: Scene, canvas: int, y0: int, x0: int, px: int) -> DetectionTile:
    """`detection_tile` of the mitosis task."""
    return detection_tile(scene, canvas, y0, x0, px, "mitosis")


def plan_detection_chunk(config: SynthConfig, chunk: Chunk) -> tuple[list[Scene], list[DetectionTile]]:
    """The canvases of a detection chunk (mitosis, apoptosis) and the tiles taken from them, before
    any pixel is rendered.

    Canvases are drawn one after another; each tile's label comes from the scene's nuclei, and
    tiles are taken in canvas order while their group still has room in the chunk's quota, ambiguous
    ones never. Quotas: positives exactly as the task's positive fraction says over the split, and
    of the negatives MITOSIS_OTHER_NEGATIVES not tumour-bearing. A pure function of (config, chunk).
    """
    det = DETECTIONS[chunk.task]
    opts = config.patches
    rng = _chunk_rng(config, chunk)
    n, px = canvas_side(config, chunk.task), opts.patch_px
    f = det.fraction(config)
    n_pos = math.floor((chunk.first_patch + chunk.n_patches) * f + 0.5) - math.floor(chunk.first_patch * f + 0.5)
    n_other = int(round(MITOSIS_OTHER_NEGATIVES * (chunk.n_patches - n_pos)))
    room = {"positive": n_pos, "tumour": chunk.n_patches - n_pos - n_other, "other": n_other}
    core_share = (1 - 2 * det.margin_in_um / (px * opts.mpp)) ** 2
    scenes: list[Scene] = []
    tiles: list[DetectionTile] = []
    limit = 50 * (chunk.n_patches // (n * n) + 1)  # a bound, never reached for fractions in (0, 1)
    while any(room.values()):
        if len(scenes) >= limit:
            raise RuntimeError(f"{chunk.task} chunk {chunk}: {room} tiles still missing after {limit} canvases")
        # steer each canvas's rate towards the positive share still missing (within a factor of 2
        # of the configured one), so both quotas fill together and few tiles are discarded
        missing = room["positive"] / sum(room.values())
        per_tile = _figures_per_tile(min(max(missing, f / 2), 2 * f), core_share)
        scene = Scene(det.params(rng, config, n * px, per_tile))
        for k in range(n * n):
            tile = detection_tile(scene, len(scenes), (k // n) * px, (k % n) * px, px, chunk.task)
            if tile.group is not None and room[tile.group] > 0:
                room[tile.group] -= 1
                tiles.append(tile)
        scenes.append(scene)
    return scenes, tiles


def plan_mitosis_chunk(config: SynthConfig, chunk: Chunk) -> tuple[list[Scene], list[DetectionTile]]:
    """`plan_detection_chunk` of a mitosis chunk."""
    if chunk.task != "mitosis":
        raise ValueError(f"not a mitosis chunk: {chunk}")
    return plan_detection_chunk(config, chunk)


def render_detection_chunk(config: SynthConfig, chunk: Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the planned tiles of a detection chunk: patches, labels and each tile's canvas index
    (int32, in the chunk's sequence). A whole canvas is rendered when at least half of it is used,
    else tile by tile (the same pixels either way, a region's pixels do not depend on how the slide
    is cut)."""
    n, px = canvas_side(config, chunk.task), config.patches.patch_px
    scenes, tiles = plan_detection_chunk(config, chunk)
    used = np.bincount([t.canvas for t in tiles], minlength=len(scenes))
    x = np.empty((len(tiles), px, px, 3), np.uint8)
    canvas, image = -1, np.empty((0, 0, 3), np.uint8)  # canvas -1 matches no tile: set before use
    for i, t in enumerate(tiles):  # in canvas order
        if 2 * used[t.canvas] < n * n:
            x[i] = scenes[t.canvas].render(t.y0, t.x0, px, px)
            continue
        if t.canvas != canvas:
            canvas, image = t.canvas, scenes[t.canvas].render(0, 0, n * px, n * px)
        x[i] = image[t.y0 : t.y0 + px, t.x0 : t.x0 + px]
    return x, np.array([t.label for t in tiles], np.float32), np.array([t.canvas for t in tiles], np.int32)


def _chunk_rng(config: SynthConfig, chunk: Chunk) -> np.random.Generator:
    seq = np.random.SeedSequence([config.seed, 7, TASK_ORDER.index(chunk.task), SPLITS.index(chunk.split), chunk.index])
    return np.random.default_rng(seq)


def _cut(image: np.ndarray, n: int, px: int) -> list[np.ndarray]:
    return [image[r * px : (r + 1) * px, c * px : (c + 1) * px] for r in range(n) for c in range(n)]


def render_chunk(config: SynthConfig, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """Patches (N, px, px, 3) uint8 and labels (N,) float32 of one chunk; pure function of its inputs.
    Patch tasks only: dense tasks are rendered by nic.synth.dense.render_dense_chunk."""
    if chunk.task in DENSE:
        raise ValueError(f"{chunk.task} is a dense task: use nic.synth.dense.render_dense_chunk")
    if chunk.task in DETECTIONS:
        return render_detection_chunk(config, chunk)[:2]
    opts = config.patches
    n, px = canvas_side(config, chunk.task), opts.patch_px
    canvas_px = n * px
    rng = _chunk_rng(config, chunk)
    images: list[np.ndarray] = []
    labels: list[float] = []
    canvas = 0
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

