"""Patch task specs and readers: folder, HDF5 (PCam layout), CSV/Parquet manifests, bad data.

The helpers at the top write small synthetic patch datasets; the other encoder test files import
them (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from nic.config.base import ConfigError
from nic.patches.readers import PatchDataError, load_task, read_patches
from nic.patches.sampling import MixedPatches, MixedTaskSampler, eval_batches
from nic.patches.tasks import load_tasks, select_tasks

# Class k: a distinct base colour plus stripes of a class-specific period, with noise, so a small
# CNN separates them in an epoch or two but no single pixel gives the class away.
_COLOURS = np.array([[200, 120, 160], [120, 60, 140], [230, 200, 210], [90, 40, 90], [250, 250, 250],
                     [170, 90, 120]], dtype=np.float32)


def synthetic_tiles(labels: np.ndarray, px: int = 128, seed: int = 0) -> np.ndarray:
    """(N, px, px, 3) uint8 tiles whose colour and texture depend on the class label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px]
    out = np.empty((len(labels), px, px, 3), dtype=np.uint8)
    for i, label in enumerate(labels.astype(int)):
        period = 6 + 5 * label
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * (xx + yy * (label % 2)) / period + phase)[..., None] * 25
        tile = _COLOURS[label % len(_COLOURS)] + stripes + rng.normal(0, 12, (px, px, 3))
        out[i] = np.clip(tile, 0, 255).astype(np.uint8)
    return out


def write_folder_task(root: Path, classes: list[str], per_class: int, px: int = 128, seed: int = 0,
                      suffix: str = ".png") -> Path:
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tiles = synthetic_tiles(np.full(per_class, k), px, seed + k)
        for i, tile in enumerate(tiles):
            Image.fromarray(tile).save(folder / f"{name}_{i:04d}{suffix}")
    return root


def write_hdf5_task(path: Path, labels: np.ndarray, px: int = 128, seed: int = 0, pcam_shape: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["x"] = synthetic_tiles(labels, px, seed)
        f["y"] = labels.reshape(-1, 1, 1, 1).astype(np.uint8) if pcam_shape else labels
    return path


def write_manifest_task(folder: Path, labels: np.ndarray, tile_labels: np.ndarray | None = None, px: int = 128,
                        seed: int = 0, fmt: str = "csv") -> Path:
    """Images under folder/img, a manifest with relative paths; `labels` go in the label column."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    tiles = synthetic_tiles(tile_labels if tile_labels is not None else np.zeros(len(labels), int), px, seed)
    paths = []
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / "img" / f"{i:04d}.png")
        paths.append(f"img/{i:04d}.png")
    table = pd.DataFrame({"path": paths, "label": labels})
    out = folder / ("manifest.parquet" if fmt == "parquet" else "manifest.csv")
    if fmt == "parquet":
        table.to_parquet(out)
    else:
        table.to_csv(out, index=False)
    return out


def write_cohort(root: Path, per_class: int = 24, px: int = 128) -> Path:
    """tasks.yaml with a 3-class folder task, a binary HDF5 task and a regression manifest task."""
    write_folder_task(root / "patches" / "tissue", ["stroma", "tumour", "fat"], per_class, px, seed=1)
    rng = np.random.default_rng(5)
    binary = rng.integers(0, 2, 2 * per_class)
    write_hdf5_task(root / "patches" / "tumour.h5", binary, px, seed=2)
    reg_classes = rng.integers(0, 3, 2 * per_class)
    write_manifest_task(root / "patches" / "cells", reg_classes * 10.0 + rng.normal(0, 1, len(reg_classes)),
                        reg_classes, px, seed=3)
    tasks = {"tasks": [
        {"name": "tissue_type", "kind": "multiclass", "classes": ["stroma", "tumour", "fat"], "format": "folder",
         "path": "patches/tissue", "weight": 1.0},
        {"name": "tumour", "kind": "binary", "format": "hdf5", "path": "patches/tumour.h5", "weight": 1.0},
        {"name": "cellularity", "kind": "regression", "format": "manifest", "path": "patches/cells/manifest.csv",
         "weight": 0.5},
    ]}
    (root / "tasks.yaml").write_text(yaml.safe_dump(tasks, sort_keys=False))
    return root / "tasks.yaml"


# ------------------------------------------------------------------------------------ tasks.yaml


def test_tasks_yaml_resolves_paths_and_defaults(tmp_path: Path) -> None:
    tasks_yaml = write_cohort(tmp_path, per_class=4, px=32)
    tasks = load_tasks(tasks_yaml)
    assert [t.name for t in tasks] == ["tissue_type", "tumour", "cellularity"]
    assert tasks[0].path == tmp_path.resolve() / "patches/tissue"
    assert tasks[1].classes == ["negative", "positive"] and tasks[1].num_outputs == 1
    assert tasks[0].num_outputs == 3 and tasks[2].classes is None
    chosen = select_tasks(tasks, ["tumour", "cellularity"], {"tumour": 3.0})
    assert [t.name for t in chosen] == ["tumour", "cellularity"] and chosen[0].weight == 3.0
    assert tasks[1].weight == 1.0  # the originals are untouched


@pytest.mark.parametrize(
    "task, message",
    [
        ({"name": "a", "kind": "multiclass", "classes": ["x"], "format": "folder", "path": "p"}, "at least 2 classes"),
        ({"name": "a", "kind": "regression", "classes": ["x", "y"], "format": "hdf5", "path": "p"}, "no 'classes'"),
        ({"name": "a", "kind": "binary", "format": "folder", "path": "p"}, "needs 'classes'"),
        ({"name": "a", "kind": "multiclass", "classes": ["x", "y"], "format": "zip", "path": "p"}, "tasks.0.format"),
        ({"name": "a", "kind": "binary", "format": "hdf5", "path": "p", "wieght": 2}, "unknown key 'tasks.0.wieght'"),
    ],
)
def test_bad_tasks_yaml_names_file_and_problem(tmp_path: Path, task: dict, message: str) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": [task]}))
    with pytest.raises(ConfigError) as err:
        load_tasks(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_unknown_task_in_subset_is_an_error(tmp_path: Path) -> None:
    tasks = load_tasks(write_cohort(tmp_path, per_class=2, px=32))
    with pytest.raises(ConfigError, match="unknown task 'mitosis'"):
        select_tasks(tasks, ["mitosis"])


# ------------------------------------------------------------------------------------ readers


def test_folder_hdf5_and_manifest_readers(tmp_path: Path) -> None:
    tasks = load_tasks(write_cohort(tmp_path, per_class=6, px=32))
    tissue = read_patches(tasks[0], tasks[0].path, 32)
    assert tissue.images.shape == (18, 32, 32, 3) and tissue.images.dtype == np.uint8
    assert np.bincount(tissue.labels.astype(int)).tolist() == [6, 6, 6]
    # The pixels are the PNGs' pixels, in class order.
    first = np.asarray(Image.open(sorted((tasks[0].path / "stroma").iterdir())[0]))
    assert np.array_equal(tissue.images[0], first)

    tumour = read_patches(tasks[1], tasks[1].path, 32)
    with h5py.File(tasks[1].path) as f:
        assert np.array_equal(tumour.images, f["x"][...])
        assert np.array_equal(tumour.labels, f["y"][...].reshape(-1).astype(np.float32))

    cells = read_patches(tasks[2], tasks[2].path, 32)
    table = pd.read_csv(tasks[2].path)
    assert np.allclose(cells.labels, table["label"].to_numpy(), atol=1e-5)
    assert np.array_equal(cells.images[3], np.asarray(Image.open(tasks[2].path.parent / table["path"][3])))

    limited = read_patches(tasks[0], tasks[0].path, 32, limit=5, seed=1)
    assert len(limited) == 5


def test_pcam_split_files_and_parquet_manifest_with_class_names(tmp_path: Path) -> None:
    from nic.patches.tasks import TaskSpec

    labels = np.array([0, 1, 1, 0, 1])
    with h5py.File(tmp_path / "split_x.h5", "w") as f:
        f["x"] = synthetic_tiles(labels, 32)
    with h5py.File(tmp_path / "split_y.h5", "w") as f:
        f["y"] = labels.reshape(-1, 1, 1, 1).astype(np.uint8)
    spec = TaskSpec(name="pcam", kind="binary", format="hdf5", path=tmp_path / "split_x.h5")
    assert read_patches(spec, spec.path, 32).labels.tolist() == [0, 1, 1, 0, 1]

    manifest = write_manifest_task(tmp_path / "m", np.array(["tumour", "stroma", "tumour"]), px=32, fmt="parquet")
    spec = TaskSpec(name="t", kind="multiclass", classes=["stroma", "tumour"], format="manifest", path=manifest)
    assert read_patches(spec, manifest, 32).labels.tolist() == [1, 0, 1]


def test_stratified_holdout_and_val_path(tmp_path: Path) -> None:
    tasks = load_tasks(write_cohort(tmp_path, per_class=10, px=32))
    train, val = load_task(tasks[0], 32, val_fraction=0.2, seed=0)
    assert len(train) == 24 and len(val) == 6
    assert np.bincount(val.labels.astype(int)).tolist() == [2, 2, 2]  # stratified
    write_folder_task(tmp_path / "val", ["stroma", "tumour", "fat"], 3, 32, seed=9)
    spec = tasks[0].model_copy(update={"val_path": tmp_path / "val"})
    train, val = load_task(spec, 32)
    assert len(train) == 30 and len(val) == 9


# ------------------------------------------------------------------------------------ bad data


def _spec(tmp_path: Path, **kw):
    from nic.patches.tasks import TaskSpec

    base = {"name": "t", "kind": "multiclass", "classes": ["a", "b"], "format": "folder", "path": tmp_path / "d"}
    base.update(kw)
    return TaskSpec(**base)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    write_folder_task(tmp_path / "d", ["a", "b"], 2, 32)
    bad = tmp_path / "d" / "b" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(PatchDataError, match=r"broken\.png: unreadable image"):
        read_patches(_spec(tmp_path), tmp_path / "d", 32)


def test_wrong_tile_size_is_named(tmp_path: Path) -> None:
    write_folder_task(tmp_path / "d", ["a", "b"], 2, 48)
    with pytest.raises(PatchDataError, match=r"a_0000\.png: wrong tile size 48x48 px, expected 32x32"):
        read_patches(_spec(tmp_path), tmp_path / "d", 32)
    write_hdf5_task(tmp_path / "x.h5", np.array([0, 1]), px=48)
    with pytest.raises(PatchDataError, match=r"x\.h5: wrong tile size 48x48"):
        read_patches(_spec(tmp_path, format="hdf5", path=tmp_path / "x.h5"), tmp_path / "x.h5", 32)


def test_empty_class_is_named(tmp_path: Path) -> None:
    write_folder_task(tmp_path / "d", ["a"], 2, 32)
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(PatchDataError, match=r"class 'b' is empty"):
        read_patches(_spec(tmp_path), tmp_path / "d", 32)
    # In an HDF5 task a class without samples is caught when the training split is built.
    write_hdf5_task(tmp_path / "x.h5", np.zeros(6, dtype=int), px=32)
    spec = _spec(tmp_path, format="hdf5", path=tmp_path / "x.h5")
    with pytest.raises(PatchDataError, match=r"class\(es\) \['b'\] have no samples"):
        load_task(spec, 32)


def test_label_out_of_range_is_named(tmp_path: Path) -> None:
    write_hdf5_task(tmp_path / "x.h5", np.array([0, 1, 2, 1]), px=32)
    with pytest.raises(PatchDataError, match=r"x\.h5: label 2\.0 of sample 2 out of range for task 't'"):
        read_patches(_spec(tmp_path, format="hdf5", path=tmp_path / "x.h5"), tmp_path / "x.h5", 32)
    manifest = write_manifest_task(tmp_path / "m", np.array(["a", "c"]), px=32)
    with pytest.raises(PatchDataError, match=r"row 1: label 'c' is not a class"):
        read_patches(_spec(tmp_path, format="manifest", path=manifest), manifest, 32)
    manifest = write_manifest_task(tmp_path / "r", np.array([1.0, np.nan]), px=32)
    with pytest.raises(PatchDataError, match=r"label nan of sample 1 out of range"):
        read_patches(_spec(tmp_path, kind="regression", classes=None, format="manifest", path=manifest), manifest, 32)


def test_missing_files_and_columns(tmp_path: Path) -> None:
    with pytest.raises(PatchDataError, match="folder not found"):
        read_patches(_spec(tmp_path), tmp_path / "nowhere", 32)
    (tmp_path / "m.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(PatchDataError, match=r"m\.csv: manifest lacks column\(s\) \['path'\]"):
        read_patches(_spec(tmp_path, format="manifest"), tmp_path / "m.csv", 32)
    (tmp_path / "n.csv").write_text("path,label\nmissing.png,0\n")
    with pytest.raises(PatchDataError, match=r"missing\.png' listed in the manifest does not exist"):
        read_patches(_spec(tmp_path, format="manifest"), tmp_path / "n.csv", 32)
    (tmp_path / "bad.h5").write_bytes(b"garbage")
    with pytest.raises(PatchDataError, match=r"bad\.h5: not a readable HDF5 file"):
        read_patches(_spec(tmp_path, format="hdf5"), tmp_path / "bad.h5", 32)


# ------------------------------------------------------------------------------------ sampling


def test_mixed_sampler_balances_tasks_and_shards_disjointly() -> None:
    from nic.patches.readers import PatchSet

    sets = [PatchSet("big", np.zeros((90, 4, 4, 3), np.uint8), np.zeros(90, np.float32), "a"),
            PatchSet("small", np.zeros((10, 4, 4, 3), np.uint8), np.ones(10, np.float32), "b")]
    mixed = MixedPatches.concat(sets)
    assert mixed.task_sizes() == [90, 10]
    sampler = MixedTaskSampler(mixed.task_ids, seed=3)
    idx = sampler.indices(epoch=1)
    assert len(idx) == 180
    counts = np.bincount(mixed.task_ids[idx])
    assert counts.tolist() == [90, 90]  # the small task is resampled up to the big one
    small_seen = np.bincount(idx[mixed.task_ids[idx] == 1] - 90, minlength=10)
    assert small_seen.tolist() == [9] * 10  # evenly: every small sample exactly 9 times
    assert not np.array_equal(idx, sampler.indices(epoch=2))
    assert np.array_equal(idx, MixedTaskSampler(mixed.task_ids, seed=3).indices(epoch=1))
    # Every batch mixes both tasks.
    assert all(len(np.unique(mixed.task_ids[b])) == 2 for b in sampler.batches(1, 32))

    shards = [MixedTaskSampler(mixed.task_ids, seed=3, rank=r, world_size=2).indices(1) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 90
    assert np.array_equal(np.sort(np.concatenate(shards)), np.sort(idx))
    assert sorted(np.concatenate(list(eval_batches(7, 2, 0, 2))).tolist() +
                  np.concatenate(list(eval_batches(7, 2, 1, 2))).tolist()) == list(range(7))
