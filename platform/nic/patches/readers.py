"""Readers for labelled patch datasets: folders of images by class, HDF5 (PCam layout), manifests.

Each reader returns the whole (optionally subsampled) dataset in memory as uint8 tiles: a few
thousand 128 px tiles are a few hundred MB at most, and training then never waits on disk.
Bad data is a `PatchDataError` naming the file and the problem: an unreadable image, a label out
of range, an empty class, a tile of the wrong size.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nic.patches.tasks import TaskSpec
from nic.storage import ensure_local

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class PatchDataError(ValueError):
    """A patch dataset that cannot be used; the message names the file and the problem."""


@dataclass
class PatchSet:
    """One task's patches: tiles (N, P, P, 3) uint8 RGB and labels (N,) float32.

    Classification labels are class indices stored as floats, so every task shares one label
    array type when tasks are mixed in a batch. Dense tasks also carry per-pixel targets
    (nic.patches.dense_readers): `masks` (N, P, P) int16 (class, or nucleus instance id; -1 =
    ignore) and `types` (N, P, P) int16 (nucleus type, 0 = background, -1 = unknown); their
    `labels` are zeros.
    """

    task: str
    images: np.ndarray
    labels: np.ndarray
    source: str
    masks: np.ndarray | None = None
    types: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray) -> PatchSet:
        masks = None if self.masks is None else self.masks[index]
        types = None if self.types is None else self.types[index]
        return PatchSet(self.task, self.images[index], self.labels[index], self.source, masks, types)


def _choose(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of at most `limit` of `n` items (all if no limit)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _read_image(path: Path, tile_px: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PatchDataError(f"{path}: unreadable image ({exc})") from None
    if arr.shape[:2] != (tile_px, tile_px):
        raise PatchDataError(
            f"{path}: wrong tile size {arr.shape[1]}x{arr.shape[0]} px, expected {tile_px}x{tile_px} "
            "(set tile_px to your patch size, or resize the patches)"
        )
    return arr


def _read_images(paths: list[Path], tile_px: int) -> np.ndarray:
    out = np.empty((len(paths), tile_px, tile_px, 3), dtype=np.uint8)
    if not paths:
        return out

    def load(i: int) -> None:
        out[i] = _read_image(paths[i], tile_px)

    # Image decoding releases the GIL, so a few threads read a folder several times faster.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(load, range(len(paths))))
    return out


def _check_labels(spec: TaskSpec, labels: np.ndarray, source: str, index: np.ndarray | None = None) -> np.ndarray:
    """Validate labels for the task's kind and return them as float32."""
    try:
        values = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError):
        raise PatchDataError(f"{source}: task '{spec.name}' has non-numeric labels") from None
    bad = ~np.isfinite(values)
    if spec.kind != "regression":
        k = len(spec.classes or [])
        bad |= (values != np.round(values)) | (values < 0) | (values >= k)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        row = int(index[first]) if index is not None else first
        allowed = "a finite number" if spec.kind == "regression" else f"an integer in [0, {len(spec.classes or []) - 1}]"
        raise PatchDataError(
            f"{source}: label {float(values[first])!r} of sample {row} out of range for task '{spec.name}' "
            f"({spec.kind}: expected {allowed}); {int(bad.sum())} bad label(s) in all"
        )
    return values.astype(np.float32)


def read_folder(spec: TaskSpec, path: Path, tile_px: int, limit: int | None = None, seed: int = 0) -> PatchSet:
    """`<path>/<class>/*.png|jpg|tif`: one sub-folder per class name, in `spec.classes` order."""
    if not path.is_dir():
        raise PatchDataError(f"{path}: task '{spec.name}': folder not found")
    classes = spec.classes or []
    unknown = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise PatchDataError(f"{path}: task '{spec.name}': folders {unknown} are not among the classes {classes}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = path / name
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise PatchDataError(f"{folder}: task '{spec.name}': class '{name}' is empty (no .png/.jpg/.tif images)")
        files += found
        labels += [label] * len(found)
    index = _choose(len(files), limit, seed)
    images = _read_images([files[i] for i in index], tile_px)
    return PatchSet(spec.name, images, np.asarray(labels, dtype=np.float32)[index], str(path))


def _h5_labels_file(path: Path) -> Path | None:
    """PCam ships x and y in sibling files (`..._x.h5`, `..._y.h5`)."""
    if path.stem.endswith("_x"):
        sibling = path.with_name(path.stem[:-2] + "_y" + path.suffix)
        return sibling if sibling.exists() else None
    return None


def open_hdf5(spec: TaskSpec, path: Path) -> Any:
    """The task's HDF5 file opened for reading, or PatchDataError naming it (missing, unreadable)."""
    import h5py

    if not path.is_file():
        raise PatchDataError(f"{path}: task '{spec.name}': HDF5 file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise PatchDataError(f"{path}: not a readable HDF5 file ({exc})") from None


def read_hdf5(spec: TaskSpec, path: Path, tile_px: int, limit: int | None = None, seed: int = 0) -> PatchSet:
    """HDF5 with `x` (N, H, W, 3) uint8 and `y` (N,) or (N, 1, 1, 1), as PatchCamelyon ships them."""
    with open_hdf5(spec, path) as handle:
        if "x" not in handle:
            raise PatchDataError(f"{path}: no dataset 'x' (found: {sorted(handle.keys())})")
        x = handle["x"]
        if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8:
            raise PatchDataError(f"{path}: 'x' must be (N, H, W, 3) uint8, got {x.shape} {x.dtype}")
        if x.shape[1:3] != (tile_px, tile_px):
            raise PatchDataError(
                f"{path}: wrong tile size {x.shape[2]}x{x.shape[1]} px, expected {tile_px}x{tile_px} "
                "(set tile_px to your patch size, or resize the patches)"
            )
        n_total = int(x.shape[0])
        index = _choose(n_total, limit, seed)
        images = x[index] if len(index) < n_total else x[...]
        if "y" in handle:
            y_all, y_source = handle["y"][...], path
        else:
            y_path = _h5_labels_file(path)
            if y_path is None:
                raise PatchDataError(f"{path}: no dataset 'y' (and no sibling '*_y.h5' file)")
            import h5py

            with h5py.File(y_path, "r") as yh:
                if "y" not in yh:
                    raise PatchDataError(f"{y_path}: no dataset 'y'")
                y_all, y_source = yh["y"][...], y_path
    y_all = np.asarray(y_all).reshape(len(y_all), -1) if np.ndim(y_all) else np.asarray(y_all)
    if y_all.ndim != 2 or y_all.shape[1] != 1 or y_all.shape[0] != n_total:
        raise PatchDataError(
            f"{y_source}: 'y' must hold one label per tile ({n_total}), got shape {np.shape(y_all)}"
        )
    labels = _check_labels(spec, y_all[:, 0][index], str(y_source), index)
    return PatchSet(spec.name, np.ascontiguousarray(images), labels, str(path))


def _read_table(path: Path):
    import pandas as pd

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # pandas/pyarrow raise many types for a corrupt file
        raise PatchDataError(f"{path}: unreadable manifest ({exc})") from None


def read_manifest(spec: TaskSpec, path: Path, tile_px: int, limit: int | None = None, seed: int = 0) -> PatchSet:
    """CSV or Parquet with columns `path` (relative to the manifest) and `label` (index or class name)."""
    if not path.is_file():
        raise PatchDataError(f"{path}: task '{spec.name}': manifest not found")
    table = _read_table(path)
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise PatchDataError(f"{path}: manifest lacks column(s) {missing}; found {list(table.columns)}")
    if len(table) == 0:
        raise PatchDataError(f"{path}: manifest has no rows")
    raw = table["label"].to_numpy()
    if spec.classes and raw.dtype == object:
        lookup = {name: i for i, name in enumerate(spec.classes)}
        as_index = []
        for row, value in enumerate(raw):
            if isinstance(value, str) and not _is_number(value):
                if value not in lookup:
                    raise PatchDataError(
                        f"{path}: row {row}: label '{value}' is not a class of task '{spec.name}' {spec.classes}"
                    )
                as_index.append(lookup[value])
            else:
                as_index.append(value)
        raw = np.asarray(as_index, dtype=object)
    try:
        raw = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise PatchDataError(f"{path}: task '{spec.name}' has non-numeric labels") from None
    index = _choose(len(table), limit, seed)
    labels = _check_labels(spec, raw[index], str(path), index)
    base = path.resolve().parent
    files = [Path(p) if Path(p).is_absolute() else base / str(p) for p in table["path"].to_numpy()[index]]
    for f in files:
        if not f.is_file():
            raise PatchDataError(f"{path}: image '{f}' listed in the manifest does not exist")
    images = _read_images(files, tile_px)
    return PatchSet(spec.name, images, labels, str(path))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


READERS = {"folder": read_folder, "hdf5": read_hdf5, "manifest": read_manifest}


def read_patches(spec: TaskSpec, path: Path, tile_px: int, limit: int | None = None, seed: int = 0) -> PatchSet:
    """Read one dataset of a task in the task's format (fetched first when on an object store)."""
    path = Path(path)
    # A manifest names images beside it; PCam's x file has its labels in a sibling y file.
    ensure_local(path.parent if spec.format == "manifest" else path, missing_ok=True)
    if spec.format == "hdf5" and path.stem.endswith("_x"):
        ensure_local(path.with_name(path.stem[:-2] + "_y" + path.suffix), missing_ok=True)
    if spec.dense:
        from nic.patches.dense_readers import DENSE_READERS

        return DENSE_READERS[spec.format](spec, path, tile_px, limit, seed)
    return READERS[spec.format](spec, path, tile_px, limit, seed)


def check_classes_present(spec: TaskSpec, data: PatchSet) -> None:
    """Every class must have training samples, or its logit is never taught anything."""
    if spec.kind == "regression" or spec.dense:  # dense tasks: pixels of every class are not required
        return
    classes = spec.classes or []  # never None here: TaskSpec gives every class task its names
    counts = np.bincount(data.labels.astype(np.int64), minlength=len(classes))
    empty = [classes[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        raise PatchDataError(f"{data.source}: task '{spec.name}': class(es) {empty} have no samples")


def load_task(
    spec: TaskSpec,
    tile_px: int,
    val_fraction: float = 0.2,
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> tuple[PatchSet, PatchSet]:
    """A task's training and validation sets: `val_path` if given, else a stratified hold-out."""
    from sklearn.model_selection import train_test_split

    if spec.val_path is not None:
        train = read_patches(spec, spec.path, tile_px, max_train, seed)
        val = read_patches(spec, spec.val_path, tile_px, max_val, seed + 1)
    else:
        cap = None if max_train is None else math.ceil(max_train / (1 - val_fraction))
        full = read_patches(spec, spec.path, tile_px, cap, seed)
        if len(full) < 2:
            raise PatchDataError(f"{full.source}: task '{spec.name}' needs at least 2 patches to hold out validation")
        index = np.arange(len(full))
        stratify = full.labels if spec.kind not in ("regression", "segmentation", "nuclei") else None
        try:
            tr, va = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=stratify)
        except ValueError:  # a class too small to stratify: a plain random split still works
            tr, va = train_test_split(index, test_size=val_fraction, random_state=seed)
        train, val = full.subset(np.sort(tr)), full.subset(np.sort(va))
        if max_val is not None and len(val) > max_val:
            val = val.subset(_choose(len(val), max_val, seed + 1))
    check_classes_present(spec, train)
    return train, val
