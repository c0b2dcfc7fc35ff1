"""The held-out patch task (apoptosis): labels from the scene's nuclei, determinism, opt-in, and kept out
of tasks.yaml (rendering and file writers only; no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from nic.config.synth import PATCH_TASKS, SynthConfig
from nic.synth.patches import (
    APOPTOSIS_POSITIVE_FRACTION,
    HELD_OUT,
    MITOSIS_OTHER_NEGATIVES,
    MITOSIS_TUMOUR_BEARING,
    TASK_ORDER,
    TASKS,
    Chunk,
    plan_chunks,
    plan_detection_chunk,
    render_chunk,
    render_detection_chunk,
)
from nic.synth.render import KIND_APOPTOTIC, KIND_MITOSIS


@pytest.fixture(scope="module")
def config() -> SynthConfig:
    return SynthConfig(seed=5, patches={"train": 64, "val": 32, "chunk_canvases": 2,
                                        "tasks": ["tissue_type", "apoptosis"]})


@pytest.fixture(scope="module")
def apoptosis_chunk(config):
    """A planned and rendered apoptosis chunk (64 tiles): scenes, planned tiles, pixels, labels, canvases."""
    chunk = Chunk("apoptosis", "train", 0, 0, 64)
    scenes, tiles = plan_detection_chunk(config, chunk)
    x, y, canvas = render_detection_chunk(config, chunk)
    return scenes, tiles, x, y, canvas


def _tile_nuclei(scenes, tile, margin: int = 0) -> np.ndarray:
    """Nuclei (y, x relative to the tile; kind) from the tile's own scene, independent of the planner."""
    nuc = scenes[tile.canvas].nuclei(tile.y0, tile.x0, 128, 128, margin=margin)
    return np.column_stack([nuc[:, 0] - tile.y0, nuc[:, 1] - tile.x0, nuc[:, 2]])


def test_default_tasks_and_seeds_are_unchanged():
    assert SynthConfig().patches.tasks == list(PATCH_TASKS)
    assert "apoptosis" not in {c.task for c in plan_chunks(SynthConfig())}
    # a task's position seeds its chunks: the held-out task comes after every earlier one
    assert TASK_ORDER == ("tissue_type", "tumour", "mitosis", "lymphocyte_density", "nuclei", "tissue_regions",
                          "apoptosis")
    assert HELD_OUT == ("apoptosis",) and TASKS["apoptosis"].format == "hdf5"


def test_apoptosis_tiles_are_regions_of_their_scenes(apoptosis_chunk):
    scenes, tiles, x, y, canvas = apoptosis_chunk
    assert x.shape == (64, 128, 128, 3) and x.dtype == np.uint8
    assert np.array_equal(y, [t.label for t in tiles]) and np.array_equal(canvas, [t.canvas for t in tiles])
    assert (np.diff(canvas) >= 0).all() and len(set(canvas.tolist())) > 3
    for i in (0, 21, 40, 63):
        t = tiles[i]
        assert np.array_equal(x[i], scenes[t.canvas].render(t.y0, t.x0, 128, 128))


def test_apoptosis_labels_agree_with_the_scenes_nuclei(apoptosis_chunk):
    scenes, tiles, x, y, canvas = apoptosis_chunk
    assert y.sum() == round(APOPTOSIS_POSITIVE_FRACTION * 64)  # exact over the chunk: 32 of 64
    figures = {0.0: [], 1.0: []}
    for t in tiles:
        nuc = _tile_nuclei(scenes, t, margin=8)  # 4 um at 0.5 um/px
        bodies = nuc[nuc[:, 2] == KIND_APOPTOTIC, :2]
        inside = ((nuc[:, :2] >= 0) & (nuc[:, :2] < 128)).all(axis=1)
        if t.label == 1:  # a body centred 3 um (6 px) or more inside
            assert ((bodies >= 6) & (bodies < 122)).all(axis=1).any()
        else:  # no body centred in the tile nor within 4 um outside it
            assert len(bodies) == 0
        figures[t.label].append((nuc[inside, 2] == KIND_MITOSIS).any())
    # mitotic figures are look-alikes in both classes, not the label
    assert np.mean(figures[0.0]) > 0.1 and np.mean(figures[1.0]) > 0.1
    negatives = [t for t in tiles if t.label == 0]
    bearing = sum(t.tumour_nuclei >= MITOSIS_TUMOUR_BEARING for t in negatives)
    assert bearing == len(negatives) - round(MITOSIS_OTHER_NEGATIVES * len(negatives))


def test_apoptotic_bodies_are_drawn_where_the_labels_say(apoptosis_chunk):
    scenes, tiles, x, y, canvas = apoptosis_chunk
    body, other = [], []
    for t, image in zip(tiles, x):
        grey = image.astype(float).sum(axis=-1)
        for ny, nx, kind in _tile_nuclei(scenes, t):
            if 4 <= ny < 124 and 4 <= nx < 124:
                darkest = np.sort(grey[ny - 3 : ny + 4, nx - 3 : nx + 4].ravel())[:8].mean()
                (body if kind == KIND_APOPTOTIC else other).append(darkest)
    assert len(body) >= 32 and np.mean(body) < np.mean(other) - 25  # pyknotic: near-black


def test_apoptosis_chunks_are_deterministic_and_split_fractions_exact(config):
    chunk = Chunk("apoptosis", "val", 0, 0, 16)
    a, b = render_chunk(config, chunk), render_detection_chunk(config, chunk)
    c = render_chunk(config.model_copy(update={"seed": 6}), chunk)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    for split, total in (("train", 64), ("val", 32)):
        chunks = [ch for ch in plan_chunks(config) if ch.task == "apoptosis" and ch.split == split]
        assert sum(ch.n_patches for ch in chunks) == total


def test_heldout_tasks_are_listed_apart_from_the_training_tasks(tmp_path, config):
    from nic.patches.tasks import load_tasks
    from nic.synth.stage import _tasks_yaml

    train = yaml.safe_load(_tasks_yaml(config))["tasks"]
    held = yaml.safe_load(_tasks_yaml(config, held_out=True))["tasks"]
    assert [t["name"] for t in train] == ["tissue_type"] and [t["name"] for t in held] == ["apoptosis"]
    (tmp_path / "heldout_tasks.yaml").write_text(_tasks_yaml(config, held_out=True))
    (spec,) = load_tasks(tmp_path / "heldout_tasks.yaml")
    assert spec.kind == "binary" and spec.classes == ["absent", "present"]
    assert spec.path == tmp_path / "patches/apoptosis/train.h5"


def test_heldout_hdf5_keeps_canvases_through_the_split(tmp_path):
    import h5py

    from nic.patches.readers import read_patches
    from nic.patches.tasks import TaskSpec
    from nic.synth.stage import _split_canvases, _write_h5

    parts = [{"canvas": np.array([0, 0, 1, 2, 2], np.int32)}, {"canvas": np.array([0, 1, 1], np.int32)}]
    canvas = _split_canvases(parts)
    assert canvas.tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    x = np.zeros((8, 16, 16, 3), np.uint8)
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1], np.float32)
    _write_h5(tmp_path / "a.h5", x, y, canvas)
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["canvas"][...].tolist() == canvas.tolist()
    spec = TaskSpec(name="apoptosis", kind="binary", classes=["absent", "present"], format="hdf5", path="a.h5")
    data = read_patches(spec, tmp_path / "a.h5", 16)  # the platform's reader ignores the extra dataset
    assert data.labels.tolist() == y.tolist()


def test_heldout_task_is_written_as_synth_writes_it(tmp_path):
    """The stage's chunk body and finishing step, called in-process as the Ray tasks would: the HDF5
    holds the chunks' tiles in order, and canvases numbered through the split."""
    from nic.patches.readers import read_patches
    from nic.patches.tasks import load_tasks
    from nic.synth.stage import PATCHES_DIR, _finish_patch_task, _tasks_yaml, render_patch_chunk

    config = SynthConfig(seed=3, patches={"train": 32, "val": 16, "chunk_canvases": 1, "tasks": ["apoptosis"]})
    staging = tmp_path / PATCHES_DIR / ".apoptosis.staging"
    results = {"train": [], "val": []}
    for chunk in plan_chunks(config):
        results[chunk.split].append(render_patch_chunk(config.model_dump(mode="json"), chunk, str(staging)))
    summary = _finish_patch_task(tmp_path, "apoptosis", results, "spec")
    assert summary["class_counts"] == {"train": [16, 16], "val": [8, 8]}
    (tmp_path / "heldout_tasks.yaml").write_text(_tasks_yaml(config, held_out=True))
    assert yaml.safe_load(_tasks_yaml(config))["tasks"] == []
    (spec,) = load_tasks(tmp_path / "heldout_tasks.yaml")
    import h5py

    train = read_patches(spec, spec.path, 128)
    first = render_detection_chunk(config, plan_chunks(config)[0])
    assert np.array_equal(train.images[:16], first[0]) and np.array_equal(train.labels[:16], first[1])
    with h5py.File(spec.path) as f:
        canvas = f["canvas"][...]
    assert len(canvas) == 32 and np.array_equal(canvas[:16], first[2])
    assert canvas[16] == canvas[:16].max() + 1 and (np.diff(canvas) >= 0).all()
