"""Dense (per-pixel) task datasets from the synthetic ground truth: nuclei and tissue regions.

Like independent public datasets (PanNuke/CoNSeP for nuclei, a tissue-region segmentation set),
each comes from its own canvases, with its own images, in its own format:

| task | kind | canvases | target | format |
| --- | --- | --- | --- | --- |
| nuclei | nuclei, typed | mixed tissue, 40-80 % tumour, TILs, mitotic figures enriched (~1 per tile) | instance map + type map (tumour, lymphocyte, stroma, mitotic_figure) | HDF5 `x`, `y`, `types` |
| tissue_regions | segmentation | mixed tissue as slides | the rendered tissue class of every pixel (background, stroma, tumour, lymphocytes, necrosis, fat) | folder of PNG pairs |

A nucleus's pixels are those where its own sprite (haematoxylin stamp) exceeds
`NUCLEUS_THRESHOLD`; where two sprites overlap, the pixel belongs to the darker one, exactly as
the renderer stamps them (an elementwise maximum). Types: tumour nuclei -> tumour, lymphocytes ->
lymphocyte, fibroblasts and fat-cell nuclei -> stroma, mitotic figures -> mitotic_figure.
Apoptotic bodies and necrotic debris are not nuclei of any of these types and stay background
(the model must learn to leave them out, as a pathologist counting nuclei would).

Every chunk is a pure function of (config, chunk): the same seed gives the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from nic.config.synth import SynthConfig
from nic.synth.params import CLASSES
from nic.synth.render import KIND_FAT, KIND_FIBROBLAST, KIND_LYMPHOCYTE, KIND_MITOSIS, KIND_TUMOUR, Scene

NUCLEUS_TYPES = ("tumour", "lymphocyte", "stroma", "mitotic_figure")
_TYPE_OF_KIND = {KIND_TUMOUR: 1, KIND_LYMPHOCYTE: 2, KIND_FIBROBLAST: 3, KIND_FAT: 3, KIND_MITOSIS: 4}
NUCLEUS_THRESHOLD = 0.3
"""Haematoxylin concentration of a sprite (before the slide's nuclear scale) above which a pixel
belongs to the nucleus: about where the anti-aliased edge is half inside."""
NUCLEI_MITOTIC_PER_TILE = 1.0
"""Median mitotic figures per tile of tumour on nuclei canvases: enriched over slides, so the
mitotic_figure type has enough examples to be learned."""
REGION_CLASSES = CLASSES


def nucleus_instances(scene: Scene, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (h, w) int32 (1..n in the order of the scene's nuclei) and types (h, w) uint8."""
    inst = np.zeros((h, w), np.int32)
    types = np.zeros((h, w), np.uint8)
    best = np.zeros((h, w), np.float32)
    nuclei = scene.nuclei(y0, x0, h, w, margin=scene.max_half)
    next_id = 0
    for y, x, kind, variant in nuclei.tolist():
        t = _TYPE_OF_KIND.get(kind)
        if t is None:
            continue
        sprite = scene.banks[kind].sprites[variant]
        half, size = scene.halves[kind], scene.sizes[kind]
        ya, xa = y - half - y0, x - half - x0
        sy0, sx0 = max(0, -ya), max(0, -xa)
        yb, xb = min(ya + size, h), min(xa + size, w)
        ya, xa = max(ya, 0), max(xa, 0)
        if ya >= yb or xa >= xb:
            continue
        src = sprite[sy0 : sy0 + yb - ya, sx0 : sx0 + xb - xa]
        win = (src > NUCLEUS_THRESHOLD) & (src > best[ya:yb, xa:xb])
        if not win.any():
            continue
        next_id += 1
        inst[ya:yb, xa:xb][win] = next_id
        types[ya:yb, xa:xb][win] = t
        best[ya:yb, xa:xb][win] = src[win]
    # ids of nuclei that lost every pixel to darker neighbours are gaps: renumber 1..n
    ids = np.unique(inst)
    lookup = np.zeros(next_id + 1, np.int32)
    lookup[ids] = np.arange(len(ids), dtype=np.int32)
    return lookup[inst], types


def _nuclei_params(rng: np.random.Generator, config: SynthConfig, canvas_px: int):
    from nic.synth.patches import TUMOUR_NUCLEI_PER_UM2, _canvas_params

    tile_um2 = (config.patches.patch_px * config.patches.mpp) ** 2
    figures = NUCLEI_MITOTIC_PER_TILE * math.exp(0.5 * rng.normal())
    return _canvas_params(rng, config, canvas_px, tumour_fraction=float(rng.uniform(0.4, 0.8)),
                          til_density=float(rng.uniform(0.2, 1.0)),
                          mitotic_fraction=float(min(0.15, figures / (TUMOUR_NUCLEI_PER_UM2 * tile_um2))))


def render_dense_chunk(config: SynthConfig, chunk) -> dict[str, np.ndarray]:
    """`x` (N, px, px, 3) uint8, `y` (N, px, px) masks (instance ids or classes), `types` (nuclei),
    and `stats` (N, K): nuclei per type, or pixels per class. A pure function of its inputs."""
    from nic.synth.patches import _chunk_rng, _cut, canvas_side

    opts = config.patches
    n, px = canvas_side(config, chunk.task), opts.patch_px
    canvas_px = n * px
    rng = _chunk_rng(config, chunk)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    ts: list[np.ndarray] = []
    while len(xs) < chunk.n_patches:
        if chunk.task == "nuclei":
            scene = Scene(_nuclei_params(rng, config, canvas_px))
            xs.extend(_cut(scene.render(0, 0, canvas_px, canvas_px), n, px))
            for r in range(n):
                for c in range(n):
                    inst, types = nucleus_instances(scene, r * px, c * px, px, px)
                    ys.append(inst)
                    ts.append(types)
        elif chunk.task == "tissue_regions":
            from nic.synth.patches import _canvas_params

            scene = Scene(_canvas_params(rng, config, canvas_px))
            xs.extend(_cut(scene.render(0, 0, canvas_px, canvas_px), n, px))
            ys.extend(_cut(scene.classes(0, 0, canvas_px, canvas_px), n, px))
        else:
            raise ValueError(f"unknown dense task {chunk.task!r}")
    k = chunk.n_patches
    out = {"x": np.stack(xs[:k]).astype(np.uint8)}
    if chunk.task == "nuclei":
        out["y"] = np.stack(ys[:k]).astype(np.uint16)
        out["types"] = np.stack(ts[:k]).astype(np.uint8)
        out["stats"] = np.stack([_nuclei_by_type(m, t) for m, t in zip(out["y"], out["types"])])
    else:
        out["y"] = np.stack(ys[:k]).astype(np.uint8)
        out["stats"] = np.stack([np.bincount(m.ravel(), minlength=len(REGION_CLASSES)) for m in out["y"]])
    return out


def _nuclei_by_type(inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """Nuclei of each type in a tile (a nucleus's type read at any of its pixels)."""
    first = np.zeros(int(inst.max()) + 1, np.int64)
    first[inst.ravel()] = types.ravel()
    return np.bincount(first[1:], minlength=len(NUCLEUS_TYPES) + 1)[1:]


def write_pairs(folder: Path, task: str, split: str, first: int, x: np.ndarray, masks: np.ndarray) -> list[str]:
    """images/<name>.png and masks/<name>.png (the class index per pixel); names relative to `folder`."""
    from nic.synth.patches import png_name

    names = []
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (image, mask) in enumerate(zip(x, masks)):
        name = png_name(task, split, first + i)
        Image.fromarray(image).save(folder / "images" / name, format="PNG", compress_level=1)
        Image.fromarray(mask).save(folder / "masks" / name, format="PNG", compress_level=1)
        names.append(f"images/{name}")
    return names


def write_dense_h5(path: Path, x: np.ndarray, y: np.ndarray, types: np.ndarray) -> None:
    """`x` (N, px, px, 3) uint8, `y` (N, px, px) uint16 instance ids, `types` (N, px, px) uint8;
    no timestamps (determinism)."""
    import h5py

    from nic.artifacts import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver="earliest") as f:
            chunks = (min(len(x), 32), *x.shape[1:]) if len(x) else None
            f.create_dataset("x", data=x, dtype="uint8", chunks=chunks, compression="gzip", compression_opts=4,
                             track_times=False)
            for key, data in (("y", y), ("types", types)):
                f.create_dataset(key, data=data, chunks=chunks[:3] if chunks else None, compression="gzip",
                                 compression_opts=4, track_times=False)
