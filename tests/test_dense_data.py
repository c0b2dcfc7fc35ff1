"""Dense task specs and readers: image/mask PNG pairs and HDF5, and their bad inputs.

The helpers at the top write small synthetic dense datasets (discs as nuclei, colour regions as
tissue); tests/test_dense_train.py imports them.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from nic.config.base import ConfigError
from nic.patches.readers import PatchDataError, load_task, read_patches
from nic.patches.sampling import MixedPatches
from nic.patches.tasks import TaskSpec, load_tasks

REGION_COLOURS = np.array([[245, 240, 245], [220, 140, 190], [150, 80, 170]], np.float32)
NUCLEUS_TYPES = ["small", "large"]


def synthetic_nuclei(n: int, px: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles (n, px, px, 3) uint8 with dark discs; instance map and type map (1 small, 2 large)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px]
    x = np.empty((n, px, px, 3), np.uint8)
    inst = np.zeros((n, px, px), np.int32)
    types = np.zeros((n, px, px), np.uint8)
    for i in range(n):
        tile = np.full((px, px, 3), (235, 190, 215), np.float32)
        for k in range(int(rng.integers(1, 5))):
            t = int(rng.integers(1, 3))
            r = 2.5 if t == 1 else 4.5
            cy, cx = rng.uniform(r, px - r, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            inst[i][disc] = 10 * (k + 1)  # not consecutive: the reader renumbers
            types[i][disc] = t
            tile[disc] = (70, 30, 110) if t == 1 else (120, 60, 150)
        x[i] = np.clip(tile + rng.normal(0, 6, tile.shape), 0, 255).astype(np.uint8)
    return x, inst, types


def synthetic_regions(n: int, px: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiles with three colour regions split by a random line; the class mask (0, 1, 2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px]
    x = np.empty((n, px, px, 3), np.uint8)
    y = np.empty((n, px, px), np.uint8)
    for i in range(n):
        a, b = rng.uniform(0.3, 0.7, 2) * px
        mask = np.where(xx < a, 1, 2)
        mask[yy < b * 0.4] = 0
        x[i] = np.clip(REGION_COLOURS[mask] + rng.normal(0, 8, (px, px, 3)), 0, 255).astype(np.uint8)
        y[i] = mask
    return x, y


def write_pairs(root: Path, x: np.ndarray, masks: np.ndarray, types: np.ndarray | None = None) -> Path:
    """images/<i>.png, masks/<i>.png (16-bit when ids exceed 255) and types/<i>.png."""
    for sub in ("images", "masks") + (("types",) if types is not None else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(len(x)):
        Image.fromarray(x[i]).save(root / "images" / f"t{i:04d}.png")
        m = masks[i]
        Image.fromarray(m.astype(np.uint16) if m.max() > 255 else m.astype(np.uint8)).save(root / "masks" / f"t{i:04d}.png")
        if types is not None:
            Image.fromarray(types[i].astype(np.uint8)).save(root / "types" / f"t{i:04d}.png")
    return root


def write_dense_h5(path: Path, x: np.ndarray, masks: np.ndarray, types: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["x"] = x
        f["y"] = masks
        if types is not None:
            f["types"] = types
    return path


def seg_spec(path: Path, fmt: str = "folder", **kw) -> TaskSpec:
    return TaskSpec(name="regions", kind="segmentation", classes=["glass", "light", "dark"], format=fmt,
                    path=path, **kw)


def nuclei_spec(path: Path, fmt: str = "hdf5", typed: bool = True) -> TaskSpec:
    return TaskSpec(name="cells", kind="nuclei", classes=NUCLEUS_TYPES if typed else None, format=fmt, path=path)


# ------------------------------------------------------------------------------------ specs


def test_dense_specs_validate(tmp_path: Path) -> None:
    spec = seg_spec(tmp_path)
    assert spec.dense and spec.num_outputs == 3 and spec.ignore_index == 255 and spec.background == 0
    assert nuclei_spec(tmp_path).num_outputs == 3 + 3 and nuclei_spec(tmp_path, typed=False).num_outputs == 3
    with pytest.raises(ValueError, match="folder or hdf5, not manifest"):
        seg_spec(tmp_path, fmt="manifest")
    with pytest.raises(ValueError, match="ignore_index 1 is a class index"):
        seg_spec(tmp_path, ignore_index=1)
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        TaskSpec(name="s", kind="segmentation", classes=["a"], format="folder", path=tmp_path)
    # patch tasks: the dense-only fields stay out of the run identity (config hashes unchanged)
    patch = TaskSpec(name="t", kind="binary", format="hdf5", path=tmp_path)
    assert "ignore_index" not in patch.identity() and "ignore_index" in spec.identity()


def test_tasks_yaml_with_dense_tasks(tmp_path: Path) -> None:
    x, y = synthetic_regions(4, seed=1)
    write_pairs(tmp_path / "regions", x, y)
    xn, inst, types = synthetic_nuclei(4, seed=2)
    write_dense_h5(tmp_path / "cells.h5", xn, inst, types)
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "regions", "kind": "segmentation", "classes": ["glass", "light", "dark"], "format": "folder",
         "path": "regions"},
        {"name": "cells", "kind": "nuclei", "classes": NUCLEUS_TYPES, "format": "hdf5", "path": "cells.h5"},
    ]}))
    tasks = load_tasks(tmp_path / "tasks.yaml")
    assert [t.kind for t in tasks] == ["segmentation", "nuclei"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "r", "kind": "segmentation", "classes": ["a", "b"], "format": "manifest", "path": "m.csv"}]}))
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_tasks(tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------ formats


def test_segmentation_pairs_and_hdf5_read_the_same(tmp_path: Path) -> None:
    x, y = synthetic_regions(5, seed=3)
    y[0, 0, :4] = 255  # unlabelled pixels
    folder = read_patches(seg_spec(tmp_path / "p"), write_pairs(tmp_path / "p", x, y), 32)
    h5 = read_patches(seg_spec(tmp_path / "s.h5", "hdf5"), write_dense_h5(tmp_path / "s.h5", x, y), 32)
    for data in (folder, h5):
        assert data.images.shape == (5, 32, 32, 3) and data.masks.shape == (5, 32, 32) and data.types is None
        assert data.masks.dtype == np.int16 and data.labels.tolist() == [0.0] * 5
        np.testing.assert_array_equal(data.images, x)
        assert (data.masks[0, 0, :4] == -1).all()  # ignore_index -> -1
        np.testing.assert_array_equal(data.masks[1:], y[1:])


def test_nuclei_pairs_and_hdf5_renumber_instances(tmp_path: Path) -> None:
    x, inst, types = synthetic_nuclei(4, seed=4)
    inst[1][inst[1] > 0] += 300  # ids beyond 8 bits: a 16-bit PNG
    pairs = read_patches(nuclei_spec(tmp_path / "p", "folder"), write_pairs(tmp_path / "p", x, inst, types), 32)
    h5 = read_patches(nuclei_spec(tmp_path / "n.h5"), write_dense_h5(tmp_path / "n.h5", x, inst, types), 32)
    for data in (pairs, h5):
        for i in range(4):
            ids = np.unique(data.masks[i])
            assert ids.tolist() == list(range(len(ids)))  # 0 then 1..n
            assert ((data.masks[i] > 0) == (inst[i] > 0)).all()
        np.testing.assert_array_equal(data.types, types)
    # a nucleus pixel of type 0 is "type unknown": -1, not background
    types[0][inst[0] > 0] = 0
    data = read_patches(nuclei_spec(tmp_path / "u.h5"), write_dense_h5(tmp_path / "u.h5", x, inst, types), 32)
    assert (data.types[0][inst[0] > 0] == -1).all()
    untyped = read_patches(nuclei_spec(tmp_path / "n.h5", typed=False), tmp_path / "n.h5", 32)
    assert untyped.types is None


def test_dense_holdout_and_mixing_with_patch_tasks(tmp_path: Path) -> None:
    from test_patches_data import write_hdf5_task

    x, inst, types = synthetic_nuclei(10, seed=5)
    spec = nuclei_spec(write_dense_h5(tmp_path / "n.h5", x, inst, types))
    train, val = load_task(spec, 32, val_fraction=0.2, seed=0)
    assert len(train) == 8 and len(val) == 2 and train.masks.shape == (8, 32, 32)
    patch_spec = TaskSpec(name="t", kind="binary", format="hdf5",
                          path=write_hdf5_task(tmp_path / "b.h5", np.array([0, 1, 0, 1]), px=32))
    patch = read_patches(patch_spec, patch_spec.path, 32)
    mixed = MixedPatches.concat([patch, train])
    assert mixed.dense_index.tolist() == [-1] * 4 + list(range(8))
    np.testing.assert_array_equal(mixed.masks, train.masks)
    keys = set(mixed.arrays("train_"))
    assert {"train_dense_index", "train_masks", "train_types"} <= keys
    patch_only = MixedPatches.concat([patch])
    assert patch_only.dense_index is None and set(patch_only.arrays("val_")) == {"val_images", "val_labels",
                                                                                 "val_tasks"}


# ------------------------------------------------------------------------------------ bad inputs


def test_mask_size_differs_from_image_names_the_file(tmp_path: Path) -> None:
    x, y = synthetic_regions(3, seed=6)
    write_pairs(tmp_path / "p", x, y)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "p" / "masks" / "t0001.png")
    with pytest.raises(PatchDataError, match=r"t0001\.png: mask size 16x16 px differs from its image's 32x32"):
        read_patches(seg_spec(tmp_path / "p"), tmp_path / "p", 32)
    write_dense_h5(tmp_path / "s.h5", x, y[:, :16, :16])
    with pytest.raises(PatchDataError, match=r"s\.h5: 'y' mask size 16x16 px differs"):
        read_patches(seg_spec(tmp_path / "s.h5", "hdf5"), tmp_path / "s.h5", 32)


def test_class_value_out_of_range_names_the_file(tmp_path: Path) -> None:
    x, y = synthetic_regions(3, seed=7)
    y[2, 5, 5] = 7
    write_pairs(tmp_path / "p", x, y)
    with pytest.raises(PatchDataError, match=r"t0002\.png: class value\(s\) \[7\] out of range .*1 pixel"):
        read_patches(seg_spec(tmp_path / "p"), tmp_path / "p", 32)
    write_dense_h5(tmp_path / "s.h5", x, y)
    with pytest.raises(PatchDataError, match=r"s\.h5: sample 2: class value\(s\) \[7\]"):
        read_patches(seg_spec(tmp_path / "s.h5", "hdf5"), tmp_path / "s.h5", 32)
    xn, inst, types = synthetic_nuclei(3, seed=8)
    types[1][inst[1] > 0] = 3  # 2 types only
    write_dense_h5(tmp_path / "n.h5", xn, inst, types)
    with pytest.raises(PatchDataError, match=r"n\.h5: 'types' of sample 1: nucleus type value\(s\) \[3\]"):
        read_patches(nuclei_spec(tmp_path / "n.h5"), tmp_path / "n.h5", 32)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    x, y = synthetic_regions(3, seed=9)
    write_pairs(tmp_path / "p", x, y)
    (tmp_path / "p" / "masks" / "t0001.png").write_bytes(b"not a png")
    with pytest.raises(PatchDataError, match=r"t0001\.png: unreadable mask"):
        read_patches(seg_spec(tmp_path / "p"), tmp_path / "p", 32)
    write_pairs(tmp_path / "q", x, y)
    (tmp_path / "q" / "images" / "t0002.png").write_bytes(b"junk")
    with pytest.raises(PatchDataError, match=r"t0002\.png: unreadable image"):
        read_patches(seg_spec(tmp_path / "q"), tmp_path / "q", 32)
    (tmp_path / "bad.h5").write_bytes(b"junk")
    with pytest.raises(PatchDataError, match=r"bad\.h5: not a readable HDF5 file"):
        read_patches(seg_spec(tmp_path / "bad.h5", "hdf5"), tmp_path / "bad.h5", 32)


def test_missing_pairs_and_datasets_are_named(tmp_path: Path) -> None:
    x, y = synthetic_regions(3, seed=10)
    write_pairs(tmp_path / "p", x, y)
    (tmp_path / "p" / "masks" / "t0001.png").unlink()
    with pytest.raises(PatchDataError, match=r"t0001\.png: image without a mask"):
        read_patches(seg_spec(tmp_path / "p"), tmp_path / "p", 32)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "p" / "masks" / "extra.png")
    with pytest.raises(PatchDataError, match=r"extra\.png: mask without an image"):
        read_patches(seg_spec(tmp_path / "p"), tmp_path / "p", 32)
    xn, inst, _ = synthetic_nuclei(2, seed=11)
    write_dense_h5(tmp_path / "n.h5", xn, inst)
    with pytest.raises(PatchDataError, match=r"n\.h5: no dataset 'types'"):
        read_patches(nuclei_spec(tmp_path / "n.h5"), tmp_path / "n.h5", 32)
    write_pairs(tmp_path / "r", x, y)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "r" / "masks" / "t0000.png")
    with pytest.raises(PatchDataError, match=r"t0000\.png: mask must be single-channel"):
        read_patches(seg_spec(tmp_path / "r"), tmp_path / "r", 32)
