"""A cheap regression guard for the encoder's headline goal (>= 0.9 tissue-type accuracy on the
synthetic cohort after a few minutes of `nic train-encoder`, see benchmarks/results/encoders.md).

Full training takes minutes; this trains the same objective with the same augmentation on a
small rendering of the synthetic tissue_type task for a few dozen steps and checks that it is
learning well above chance (1/6) on validation patches from other canvases. It fails if the
patches, the augmentation, the normalisation or the masked loss lose the tissue-type signal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nic.config.encoder import AugmentOptions
from nic.config.synth import SynthConfig
from nic.encoders.encoder import build_encoder
from nic.encoders.objectives import MultiTaskObjective, TaskHeadSpec
from nic.patches.augment import Augmenter, to_float01
from nic.synth.patches import TISSUE_TYPE_CLASSES, Chunk, render_chunk

pytestmark = pytest.mark.slow


def test_mtl_learns_synthetic_tissue_type_quickly() -> None:
    config = SynthConfig(seed=3, patches={"train": 96, "val": 48, "chunk_canvases": 6})
    parts = [render_chunk(config, Chunk("tissue_type", "train", i, 48 * i, 48)) for i in range(2)]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_val, y_val = render_chunk(config, Chunk("tissue_type", "val", 0, 0, 48))
    assert np.bincount(y_val.astype(int), minlength=6).min() > 0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MultiTaskObjective(build_encoder("reference", 32),
                                   [TaskHeadSpec("tissue_type", "multiclass", len(TISSUE_TYPE_CLASSES))])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        augment = Augmenter(AugmentOptions(), seed=0)
        rng = np.random.default_rng(0)
        for _ in range(60):
            idx = rng.choice(len(x_train), 24, replace=False)
            out = model(augment(to_float01(x_train[idx])), torch.zeros(24, dtype=torch.long),
                        torch.as_tensor(y_train[idx]))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    model.eval()
    cols = model.validation_step(to_float01(x_val), torch.zeros(len(y_val), dtype=torch.long), torch.as_tensor(y_val))
    accuracy = float(np.mean(cols["score"] == y_val))
    assert accuracy >= 0.45, f"tissue_type validation accuracy {accuracy:.2f} after 60 steps (chance 0.17)"
