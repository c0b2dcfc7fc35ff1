"""Patch task datasets: shapes, label definitions and determinism (rendering only; files in the stage test)."""

from __future__ import annotations

import numpy as np
import pytest

from nic.config.synth import SynthConfig
from nic.synth.patches import (
    MITOSIS_OTHER_NEGATIVES,
    MITOSIS_TUMOUR_BEARING,
    TASKS,
    TISSUE_TYPE_CLASSES,
    Chunk,
    plan_chunks,
    plan_mitosis_chunk,
    render_chunk,
)
from nic.synth.render import KIND_APOPTOTIC, KIND_LYMPHOCYTE, KIND_MITOSIS, KIND_TUMOUR


@pytest.fixture(scope="module")
def config() -> SynthConfig:
    return SynthConfig(seed=5, patches={"train": 64, "val": 32, "chunk_canvases": 2})


def test_chunks_cover_every_task_and_split_exactly(config):
    chunks = plan_chunks(config)
    for task in config.patches.tasks:
        for split, total in (("train", 64), ("val", 32)):
            mine = [c for c in chunks if c.task == task and c.split == split]
            assert sum(c.n_patches for c in mine) == total
            assert [c.first_patch for c in mine] == sorted(c.first_patch for c in mine)


def test_tissue_type_patches_are_balanced_and_look_different(config):
    x, y = render_chunk(config, Chunk("tissue_type", "train", 0, 0, 48))
    assert x.shape == (48, 128, 128, 3) and x.dtype == np.uint8
    counts = np.bincount(y.astype(int), minlength=len(TISSUE_TYPE_CLASSES))
    assert (counts == 8).all()
    means = np.array([x[y == k].mean(axis=(0, 1, 2)) for k in range(len(TISSUE_TYPE_CLASSES))])
    background = TISSUE_TYPE_CLASSES.index("background")
    lymph = TISSUE_TYPE_CLASSES.index("lymphocytes")
    assert means[background].min() > 225  # glass
    assert means[lymph].mean() < means[TISSUE_TYPE_CLASSES.index("stroma")].mean() - 25


def test_tumour_labels_follow_the_pcam_centre_rule(config):
    from nic.synth.patches import _canvas_params  # the canvas of chunk 0 is reproducible from its seed
    from nic.synth.render import Scene

    x, y = render_chunk(config, Chunk("tumour", "train", 0, 0, 16))
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert 0 < y.mean() < 1
    seq = np.random.SeedSequence([config.seed, 7, 1, 0, 0])
    rng = np.random.default_rng(seq)
    params = _canvas_params(rng, config, 512, tumour_fraction=float(rng.uniform(0.35, 0.6)))
    scene = Scene(params)
    assert np.array_equal(scene.render(0, 0, 512, 512)[:128, :128], x[0])
    classes = scene.classes(0, 0, 512, 512)
    for k in range(16):
        r, c = divmod(k, 4)
        centre = classes[r * 128 + 48 : r * 128 + 80, c * 128 + 48 : c * 128 + 80]
        assert y[k] == float((centre == 2).any())


@pytest.fixture(scope="module")
def mitosis_chunk(config):
    """A planned and rendered mitosis chunk (160 tiles): scenes, planned tiles, pixels, labels."""
    chunk = Chunk("mitosis", "train", 0, 0, 160)
    scenes, tiles = plan_mitosis_chunk(config, chunk)
    x, y = render_chunk(config, chunk)
    return scenes, tiles, x, y


def _tile_nuclei(scenes, tile, margin: int = 0) -> np.ndarray:
    """Nuclei (y, x relative to the tile; kind) from the tile's own scene, independent of the planner."""
    nuc = scenes[tile.canvas].nuclei(tile.y0, tile.x0, 128, 128, margin=margin)
    return np.column_stack([nuc[:, 0] - tile.y0, nuc[:, 1] - tile.x0, nuc[:, 2]])


def test_mitosis_tiles_are_the_planned_tiles_of_their_scenes(config, mitosis_chunk):
    scenes, tiles, x, y = mitosis_chunk
    assert x.shape == (160, 128, 128, 3) and x.dtype == np.uint8
    assert np.array_equal(y, [t.label for t in tiles]) and set(np.unique(y)) == {0.0, 1.0}
    # every tile is a region of its canvas, as rendered (whole canvas or tile by tile alike)
    for i in (0, 37, 80, 121, 159):
        t = tiles[i]
        assert np.array_equal(x[i], scenes[t.canvas].render(t.y0, t.x0, 128, 128))
    assert len({t.canvas for t in tiles}) > 5  # many canvases: many stains and tissues


def test_mitosis_positives_hold_figures_anywhere_in_the_tile(mitosis_chunk):
    scenes, tiles, x, y = mitosis_chunk
    assert y.mean() == pytest.approx(0.35)  # the configured fraction, exactly (56 of 160)
    far, several = [], []
    for t in (t for t in tiles if t.label == 1):
        nuc = _tile_nuclei(scenes, t)
        fig = nuc[nuc[:, 2] == KIND_MITOSIS, :2]
        assert ((fig >= 4) & (fig < 124)).all(axis=1).any()  # a figure centre 2 um or more inside
        far.append(np.hypot(*(fig - 63.5).T).min() > 24)
        several.append(len(fig) >= 2)
    # figures lie anywhere (uniform over the core: 87 % beyond 24 px), not at the centre only
    assert np.mean(far) > 0.6
    assert sum(several) >= 5


def test_mitosis_figures_are_drawn_where_the_labels_say(mitosis_chunk):
    scenes, tiles, x, y = mitosis_chunk
    figure, tumour = [], []
    for t, image in zip(tiles, x):
        if t.label != 1:
            continue
        grey = image.astype(float).sum(axis=-1)
        for ny, nx, kind in _tile_nuclei(scenes, t):
            if 4 <= ny < 124 and 4 <= nx < 124 and kind in (KIND_MITOSIS, KIND_TUMOUR):
                darkest = np.sort(grey[ny - 4 : ny + 5, nx - 4 : nx + 5].ravel())[:10].mean()
                (figure if kind == KIND_MITOSIS else tumour).append(darkest)
    assert np.mean(figure) < np.mean(tumour) - 25


def test_mitosis_negatives_are_figure_free_tumour_with_look_alikes(mitosis_chunk):
    from sklearn.metrics import roc_auc_score

    scenes, tiles, x, y = mitosis_chunk
    negatives = [t for t in tiles if t.label == 0]
    apoptotic, lymphocytes, bearing = [], [], []
    for t in negatives:
        nuc = _tile_nuclei(scenes, t, margin=10)  # 5 um: no figure even just outside the tile
        assert not (nuc[:, 2] == KIND_MITOSIS).any()
        inside = ((nuc[:, :2] >= 0) & (nuc[:, :2] < 128)).all(axis=1)
        apoptotic.append((nuc[inside, 2] == KIND_APOPTOTIC).any())
        lymphocytes.append((nuc[inside, 2] == KIND_LYMPHOCYTE).sum() >= 3)
        bearing.append(t.tumour_nuclei >= MITOSIS_TUMOUR_BEARING)
    assert np.mean(apoptotic) > 0.1 and np.mean(lymphocytes) > 0.3
    # negatives are mostly tumour (so tumour does not stand in for figures), some other tissue
    assert np.sum(bearing) == len(negatives) - round(MITOSIS_OTHER_NEGATIVES * len(negatives))
    # with look-alikes in the negatives, the darkest pixels of a tile do not give the label away
    darkest = -np.sort(x.astype(float).sum(axis=-1).reshape(len(x), -1), axis=1)[:, :60].mean(axis=1)
    assert roc_auc_score(y, darkest) < 0.75


def test_mitosis_split_positive_fraction_is_the_configured_one(config):
    for fraction in (0.35, 0.15):
        cfg = config.model_copy(update={"patches": config.patches.model_copy(
            update={"mitosis_positive_fraction": fraction})})
        for split, total in (("train", 64), ("val", 32)):
            chunks = [c for c in plan_chunks(cfg) if c.task == "mitosis" and c.split == split]
            labels = [t.label for c in chunks for t in plan_mitosis_chunk(cfg, c)[1]]
            assert len(labels) == total
            assert sum(labels) == round(fraction * total)


def test_lymphocyte_density_counts_nuclei(config):
    x, y = render_chunk(config, Chunk("lymphocyte_density", "train", 0, 0, 32))
    assert (y >= 0).all() and (y == np.round(y)).all()
    assert y.max() > 5 and y.min() < y.max()
    # more lymphocytes, darker patch (they are the darkest nuclei)
    darkness = 255 - x.mean(axis=(1, 2, 3))
    assert np.corrcoef(darkness, y)[0, 1] > 0.2


@pytest.mark.parametrize("task", ["mitosis", "lymphocyte_density"])
def test_chunks_are_deterministic(config, task):
    a = render_chunk(config, Chunk(task, "val", 1, 16, 16))
    b = render_chunk(config, Chunk(task, "val", 1, 16, 16))
    c = render_chunk(config.model_copy(update={"seed": 6}), Chunk(task, "val", 1, 16, 16))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_mitosis_task_is_weighted_in_tasks_yaml():
    weights = {name: spec.to_yaml_dict()["weight"] for name, spec in TASKS.items()}
    assert weights == {"tissue_type": 1.0, "tumour": 1.0, "mitosis": 2.0, "lymphocyte_density": 1.0,
                       "nuclei": 1.0, "tissue_regions": 1.0, "apoptosis": 1.0}
