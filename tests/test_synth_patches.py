"""Patch task datasets: shapes, label definitions and determinism (rendering only; files in the stage test)."""

from __future__ import annotations

import numpy as np
import pytest

from nic.config.synth import SynthConfig
from nic.synth.patches import TISSUE_TYPE_CLASSES, Chunk, plan_chunks, render_chunk


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


def test_mitosis_positives_are_rare_and_darker(config):
    x, y = render_chunk(config, Chunk("mitosis", "train", 0, 0, 160))
    assert 0.05 < y.mean() < 0.3
    # a mitotic figure near the centre: the darkest small spots there are darker in positives
    centre = x[:, 40:88, 40:88].astype(float).sum(axis=-1)
    darkest = np.sort(centre.reshape(len(x), -1), axis=1)[:, :30].mean(axis=1)
    assert darkest[y == 1].mean() < darkest[y == 0].mean()


def test_lymphocyte_density_counts_nuclei(config):
    x, y = render_chunk(config, Chunk("lymphocyte_density", "train", 0, 0, 32))
    assert (y >= 0).all() and (y == np.round(y)).all()
    assert y.max() > 5 and y.min() < y.max()
    # more lymphocytes, darker patch (they are the darkest nuclei)
    darkness = 255 - x.mean(axis=(1, 2, 3))
    assert np.corrcoef(darkness, y)[0, 1] > 0.2


def test_chunks_are_deterministic(config):
    a = render_chunk(config, Chunk("mitosis", "val", 1, 16, 16))
    b = render_chunk(config, Chunk("mitosis", "val", 1, 16, 16))
    c = render_chunk(config.model_copy(update={"seed": 6}), Chunk("mitosis", "val", 1, 16, 16))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
