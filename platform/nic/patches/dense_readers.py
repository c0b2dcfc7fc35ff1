"""Readers for dense (per-pixel) task datasets: folders of image/mask PNG pairs, and HDF5.

Dense targets are validated as strictly as patch labels, because a wrong mask trains silently:
a mask whose size differs from its image, a class value outside the task's classes, a nucleus
type outside its types, an unreadable file, an image without a mask are each a `PatchDataError`
naming the file (and for HDF5 the sample).

What the readers return (`PatchSet.masks`, `PatchSet.types`, both (N, P, P) int16):

- segmentation: `masks` = class index per pixel, the task's `ignore_index` becomes -1;
  `types` is None.
- nuclei: `masks` = instance id per pixel, renumbered 1..n per tile (0 = background), so ids
  from any source (16-bit PNG, int32 HDF5) fit int16; `types` = nucleus type per pixel
  (0 = background, k = the k-th type name), -1 where a nucleus pixel has type 0 (type unknown:
  not scored); None for untyped tasks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nic.patches.readers import IMAGE_SUFFIXES, PatchDataError, PatchSet, _choose, _read_images, open_hdf5
from nic.patches.tasks import TaskSpec

MAX_INSTANCES = 32767
"""Nuclei per tile that fit the int16 instance map (a 128 px tile holds a few dozen)."""

IMAGES_DIR, MASKS_DIR, TYPES_DIR = "images", "masks", "types"


def _read_mask_png(path: Path) -> np.ndarray:
    """A single-channel mask PNG (8- or 16-bit, or palette) as its integer values."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise PatchDataError(f"{path}: mask must be single-channel (8/16-bit or palette), got mode {img.mode}")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, PatchDataError):
            raise
        raise PatchDataError(f"{path}: unreadable mask ({exc})") from None
    return arr.astype(np.int64)


def _check_size(mask: np.ndarray, image_hw: tuple[int, int], where: str) -> None:
    if mask.shape != image_hw:
        raise PatchDataError(
            f"{where}: mask size {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} px differs from its "
            f"image's {image_hw[1]}x{image_hw[0]} px"
        )


def segmentation_mask(spec: TaskSpec, raw: np.ndarray, where: str) -> np.ndarray:
    """Class indices as int16, ignore_index -> -1; any other value outside the classes is an error."""
    k = len(spec.classes or [])
    ignore = raw == spec.ignore_index
    bad = ~ignore & ((raw < 0) | (raw >= k))
    if bad.any():
        values = sorted({int(v) for v in np.unique(raw[bad])[:5]})
        raise PatchDataError(
            f"{where}: class value(s) {values} out of range for task '{spec.name}' (classes 0..{k - 1}, "
            f"ignore_index {spec.ignore_index}); {int(bad.sum())} pixel(s)"
        )
    return np.where(ignore, -1, raw).astype(np.int16)


def instance_mask(spec: TaskSpec, raw: np.ndarray, where: str) -> np.ndarray:
    """Instance ids renumbered 1..n (0 stays background) as int16; negative ids are an error."""
    if (raw < 0).any():
        raise PatchDataError(f"{where}: negative instance id(s) in the nuclei mask of task '{spec.name}' "
                             "(0 = background, 1.. = nuclei)")
    ids, inverse = np.unique(raw, return_inverse=True)
    if ids[0] != 0:  # no background pixel: ids start at 1
        inverse = inverse + 1
    if inverse.max(initial=0) > MAX_INSTANCES:
        raise PatchDataError(f"{where}: more than {MAX_INSTANCES} nuclei in one tile")
    return inverse.reshape(raw.shape).astype(np.int16)


def type_map(spec: TaskSpec, raw: np.ndarray, instances: np.ndarray, where: str) -> np.ndarray:
    """Nucleus types 0..K as int16; type 0 inside a nucleus -> -1 (unknown); > K is an error."""
    k = len(spec.classes or [])
    bad = (raw < 0) | (raw > k)
    if bad.any():
        values = sorted({int(v) for v in np.unique(raw[bad])[:5]})
        raise PatchDataError(
            f"{where}: nucleus type value(s) {values} out of range for task '{spec.name}' (0 = background, "
            f"1..{k} = {spec.classes}); {int(bad.sum())} pixel(s)"
        )
    types = np.where(instances == 0, 0, raw)
    return np.where((instances > 0) & (types == 0), -1, types).astype(np.int16)


def convert_masks(spec: TaskSpec, raw_masks: np.ndarray, raw_types: np.ndarray | None,
                  where: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate and convert a stack of raw masks (N, P, P); `where[i]` names sample i in errors."""
    masks = np.empty(raw_masks.shape, np.int16)
    types = None if raw_types is None else np.empty(raw_masks.shape, np.int16)
    for i in range(len(raw_masks)):
        if spec.kind == "segmentation":
            masks[i] = segmentation_mask(spec, raw_masks[i], where[i])
        else:
            masks[i] = instance_mask(spec, raw_masks[i], where[i])
            if types is not None and raw_types is not None:
                types[i] = type_map(spec, raw_types[i], masks[i], where[i])
    return masks, types


def _typed(spec: TaskSpec) -> bool:
    return spec.kind == "nuclei" and bool(spec.classes)


def read_dense_folder(spec: TaskSpec, path: Path, tile_px: int, limit: int | None = None, seed: int = 0) -> PatchSet:
    """`<path>/images/*.png|jpg|tif` and `<path>/masks/<same stem>.png` (typed nuclei also
    `<path>/types/<same stem>.png`); pairs are matched by file stem."""
    if not path.is_dir():
        raise PatchDataError(f"{path}: task '{spec.name}': folder not found")
    image_dir, mask_dir, type_dir = path / IMAGES_DIR, path / MASKS_DIR, path / TYPES_DIR
    for folder in (image_dir, mask_dir) + ((type_dir,) if _typed(spec) else ()):
        if not folder.is_dir():
            raise PatchDataError(f"{folder}: task '{spec.name}' ({spec.kind}) needs this folder "
                                 f"(layout: {IMAGES_DIR}/, {MASKS_DIR}/{', ' + TYPES_DIR + '/' if _typed(spec) else ''})")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PatchDataError(f"{image_dir}: task '{spec.name}': no images")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    orphans = sorted(set(masks) - {p.stem for p in images})
    if orphans:
        raise PatchDataError(f"{mask_dir / masks[orphans[0]].name}: mask without an image in {image_dir} "
                             f"({len(orphans)} in all)")
    index = _choose(len(images), limit, seed)
    chosen = [images[i] for i in index]
    mask_files = []
    for image in chosen:
        if image.stem not in masks:
            raise PatchDataError(f"{image}: image without a mask (expected {mask_dir / image.stem}.png)")
        mask_files.append(masks[image.stem])
    x = _read_images(chosen, tile_px)
    raw = np.empty((len(chosen), tile_px, tile_px), np.int64)
    for i, f in enumerate(mask_files):
        m = _read_mask_png(f)
        _check_size(m, (tile_px, tile_px), str(f))
        raw[i] = m
    raw_types = None
    if _typed(spec):
        raw_types = np.empty_like(raw)
        for i, image in enumerate(chosen):
            f = type_dir / f"{image.stem}.png"
            if not f.is_file():
                raise PatchDataError(f"{image}: typed nuclei task '{spec.name}' has no type map {f}")
            t = _read_mask_png(f)
            _check_size(t, (tile_px, tile_px), str(f))
            raw_types[i] = t
    where = [str(f) for f in mask_files]
    if spec.kind == "segmentation":
        masks_out, types_out = convert_masks(spec, raw, None, where)
    else:
        masks_out, _ = convert_masks(spec, raw, None, where)
        types_out = None
        if raw_types is not None:
            types_out = np.stack([type_map(spec, raw_types[i], masks_out[i], str(type_dir / f"{image.stem}.png"))
                                  for i, image in enumerate(chosen)])
    return PatchSet(spec.name, x, np.zeros(len(chosen), np.float32), str(path), masks_out, types_out)


def read_dense_hdf5(spec: TaskSpec, path: Path, tile_px: int, limit: int | None = None, seed: int = 0) -> PatchSet:
    """HDF5 with `x` (N, P, P, 3) uint8 and `y` (N, P, P) integer masks (or (N, P, P, 1)); typed
    nuclei also `types` (N, P, P)."""
    with open_hdf5(spec, path) as handle:
        for key in ("x", "y") + (("types",) if _typed(spec) else ()):
            if key not in handle:
                raise PatchDataError(f"{path}: no dataset '{key}' (found: {sorted(handle.keys())})")
        x = handle["x"]
        if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
            raise PatchDataError(f"{path}: 'x' must be (N, H, W, 3) uint8, got {x.shape} {x.dtype}")
        if x.shape[1:3] != (tile_px, tile_px):
            raise PatchDataError(f"{path}: wrong tile size {x.shape[2]}x{x.shape[1]} px, expected "
                                 f"{tile_px}x{tile_px} (set tile_px to your patch size, or resize the patches)")
        n = int(x.shape[0])
        index = _choose(n, limit, seed)
        arrays = {}
        for key in ("y", "types") if _typed(spec) else ("y",):
            d = handle[key]
            shape = tuple(d.shape[:3]) if d.ndim == 4 and d.shape[3] == 1 else tuple(d.shape)
            if len(shape) != 3 or shape[0] != n:
                raise PatchDataError(f"{path}: '{key}' must be (N, H, W) with N = {n} like 'x', got {d.shape}")
            if shape[1:] != x.shape[1:3]:
                raise PatchDataError(f"{path}: '{key}' mask size {shape[2]}x{shape[1]} px differs from the "
                                     f"images' {x.shape[2]}x{x.shape[1]} px")
            if not np.issubdtype(d.dtype, np.integer):
                raise PatchDataError(f"{path}: '{key}' must hold integers, got {d.dtype}")
            values = d[index] if len(index) < n else d[...]
            arrays[key] = np.asarray(values).reshape(len(index), tile_px, tile_px).astype(np.int64)
        images = np.ascontiguousarray(x[index] if len(index) < n else x[...])
    where = [f"{path}: sample {int(i)}" for i in index]
    masks, _ = convert_masks(spec, arrays["y"], None, where)
    types = None
    if "types" in arrays:
        types = np.stack([type_map(spec, arrays["types"][i], masks[i], f"{path}: 'types' of sample {int(j)}")
                          for i, j in enumerate(index)])
    return PatchSet(spec.name, images, np.zeros(len(index), np.float32), str(path), masks, types)


DENSE_READERS = {"folder": read_dense_folder, "hdf5": read_dense_hdf5}
