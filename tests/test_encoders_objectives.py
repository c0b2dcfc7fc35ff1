"""Training objectives: the masked multitask loss, per-task metrics, and the unsupervised baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nic.config.encoder import AugmentOptions
from nic.encoders.encoder import build_encoder
from nic.encoders.objectives import (
    BiGANObjective,
    ContrastiveObjective,
    MultiTaskObjective,
    TaskHeadSpec,
    VAEObjective,
    multitask_metrics,
    nt_xent,
)
from nic.patches.augment import Augmenter

TASKS = [
    TaskHeadSpec("tissue", "multiclass", 3, weight=1.0, classes=["a", "b", "c"]),
    TaskHeadSpec("tumour", "binary", 1, weight=2.0, classes=["neg", "pos"]),
    TaskHeadSpec("cells", "regression", 1, weight=0.5, target_mean=10.0, target_std=5.0),
]


def _mtl(seed: int = 0) -> MultiTaskObjective:
    torch.manual_seed(seed)
    return MultiTaskObjective(build_encoder("reference", 16, tile_px=64), TASKS)


def _batch(n: int = 8, px: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(seed))


def test_task_absent_from_batch_gets_no_gradient() -> None:
    model = _mtl()
    x = _batch(8)
    task_ids = torch.zeros(8, dtype=torch.long)  # only task A (tissue) in this batch
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], dtype=torch.float32)
    out = model(x, task_ids, labels)
    out["loss"].backward()
    assert set(k for k in out if k.startswith("loss/")) == {"loss/tissue"}
    for name in ("tumour", "cells"):
        grads = [p.grad for p in model.heads[name].parameters()]
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), name
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.heads["tissue"].parameters())
    assert model.encoder.trunk.fc.weight.grad is not None


def test_masked_loss_equals_weighted_sum_of_per_task_losses() -> None:
    model = _mtl()
    model.eval()  # fixed BatchNorm so the two computations see the same embeddings
    x = _batch(6)
    task_ids = torch.tensor([0, 1, 2, 0, 1, 2])
    labels = torch.tensor([2.0, 1.0, 13.0, 0.0, 0.0, 4.0])
    out = model(x, task_ids, labels)
    emb = model.encoder.trunk(model.encoder.normalise(x))
    ce = F.cross_entropy(model.heads["tissue"](emb[[0, 3]]), torch.tensor([2, 0]))
    bce = F.binary_cross_entropy_with_logits(model.heads["tumour"](emb[[1, 4]])[:, 0], torch.tensor([1.0, 0.0]))
    mse = F.mse_loss(model.heads["cells"](emb[[2, 5]])[:, 0], (torch.tensor([13.0, 4.0]) - 10) / 5)
    assert torch.allclose(out["loss"], 1.0 * ce + 2.0 * bce + 0.5 * mse, atol=1e-5)
    assert torch.allclose(out["loss/tumour"], bce, atol=1e-6)


def test_multitask_metrics_are_exact() -> None:
    columns = {
        "task": np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]),
        "label": np.array([0, 1, 2, 1, 0, 0, 1, 1, 10.0, 20.0]),
        "score": np.array([0, 1, 1, 1, 0.1, 0.6, 0.4, 0.9, 12.0, 17.0]),
        "loss": np.array([0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]),
    }
    m = multitask_metrics(TASKS, columns)
    assert m["tissue/acc"] == pytest.approx(0.75)
    assert m["tumour/auc"] == pytest.approx(0.75)  # pairs (pos > neg): 0.4>0.1, 0.9>0.1, 0.9>0.6 of 4
    assert m["tumour/acc"] == pytest.approx(0.5)
    assert m["cells/mae"] == pytest.approx(2.5)
    assert m["cells/r2"] == pytest.approx(1 - (2.0**2 + 3.0**2) / (5.0**2 + 5.0**2))  # 1 - SS_res / SS_tot
    assert m["val_loss"] == pytest.approx(1.0 * 0.1 + 2.0 * 1.0 + 0.5 * 2.0)


def test_regression_r2_is_sklearns_and_null_when_undefined() -> None:
    from sklearn.metrics import r2_score

    from nic.encoders.objectives import finite_or_none

    rng = np.random.default_rng(0)
    y = rng.normal(10, 5, 50)
    s = y + rng.normal(0, 2, 50)
    columns = {"task": np.full(50, 2), "label": y, "score": s, "loss": np.ones(50)}
    m = multitask_metrics(TASKS, columns)
    assert m["cells/r2"] == pytest.approx(r2_score(y, s))
    assert 0.5 < m["cells/r2"] < 1 and "tissue/acc" not in m
    constant = {"task": np.full(3, 2), "label": np.full(3, 4.0), "score": np.array([4.0, 5.0, 3.0]),
                "loss": np.ones(3)}
    assert finite_or_none(multitask_metrics(TASKS, constant)["cells/r2"]) is None  # JSON null, not NaN


def test_validation_step_reports_predictions_in_label_units() -> None:
    model = _mtl()
    model.eval()
    x = _batch(3)
    cols = model.validation_step(x, torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 12.0]))
    assert cols["score"][0] in (0.0, 1.0, 2.0) and 0 <= cols["score"][1] <= 1
    emb = model.encoder.trunk(model.encoder.normalise(x[2:]))
    assert cols["score"][2] == pytest.approx(float(model.heads["cells"](emb)[0, 0].detach()) * 5 + 10, rel=1e-4)


def test_nt_xent_matches_a_direct_computation() -> None:
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    zn = F.normalize(z, dim=1)
    total = 0.0
    for i in range(6):
        j = (i + 3) % 6
        sims = [math.exp(float(zn[i] @ zn[k]) / 0.5) for k in range(6) if k != i]
        total += -math.log(math.exp(float(zn[i] @ zn[j]) / 0.5) / sum(sims))
    assert float(nt_xent(z, 0.5)) == pytest.approx(total / 6, rel=1e-5)


def _fit_steps(objective, steps: int, x: torch.Tensor, views: int = 1, lr: float = 2e-3) -> list[float]:
    phases = objective.phases
    opts = {p: torch.optim.Adam(objective.phase_parameters(p), lr=lr) for p in phases}
    aug = Augmenter(AugmentOptions(hed_sigma=0, hed_bias=0, blur_prob=0, noise_std=0.01), seed=0,
                    crop_scale=0.6 if views > 1 else None)
    losses = []
    t = torch.zeros(len(x) * views, dtype=torch.long)
    y = torch.zeros(len(x) * views)
    for _ in range(steps):
        batch = torch.cat([aug(x) for _ in range(views)]) if views > 1 else x
        total = 0.0
        for p in phases:
            out = objective(batch, t, y, phase=p)
            opts[p].zero_grad()
            out["loss"].backward()
            opts[p].step()
            total += float(out["loss"].detach())
        losses.append(total)
    return losses


@pytest.fixture()
def textured() -> torch.Tensor:
    """8 tiles of 4 kinds (colour + stripe period): structure for the objectives to pick up."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_patches_data import synthetic_tiles

    tiles = synthetic_tiles(np.repeat(np.arange(4), 2), px=64, seed=0)
    return torch.as_tensor(tiles).permute(0, 3, 1, 2).float() / 255


def test_vae_loss_decreases(textured: torch.Tensor) -> None:
    torch.manual_seed(0)
    vae = VAEObjective(build_encoder("reference", 16, tile_px=64), beta=1.0)
    losses = _fit_steps(vae, 12, textured, lr=3e-3)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    vae.eval()
    cols = vae.validation_step(textured, None, None)
    assert cols["loss"].shape == (8,) and vae.validation_metrics(cols)["recon_mse"] > 0


def test_contrastive_loss_decreases(textured: torch.Tensor) -> None:
    torch.manual_seed(0)
    obj = ContrastiveObjective(build_encoder("reference", 16, tile_px=64), projection_dim=8, temperature=0.5)
    losses = _fit_steps(obj, 25, textured, views=2)
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.2
    obj.eval()
    cols = obj.validation_step(torch.cat([textured, textured]), None, None)
    assert cols["loss"].shape == (8,)


def test_bigan_trains_both_players(textured: torch.Tensor) -> None:
    torch.manual_seed(0)
    obj = BiGANObjective(build_encoder("reference", 16, tile_px=64))
    enc_before = obj.encoder.trunk.fc.weight.detach().clone()
    d_before = obj.discriminator.joint[-1].weight.detach().clone()
    # Phase "d" must not touch the encoder; phase "eg" must not touch the discriminator.
    opt_d = torch.optim.Adam(obj.phase_parameters("d"), lr=1e-3)
    out = obj(textured, None, None, phase="d")
    opt_d.zero_grad()
    out["loss"].backward()
    assert obj.encoder.trunk.fc.weight.grad is None
    opt_d.step()
    assert torch.equal(obj.encoder.trunk.fc.weight, enc_before)
    assert not torch.equal(obj.discriminator.joint[-1].weight, d_before)
    losses = _fit_steps(obj, 8, textured)
    assert all(np.isfinite(losses))
    assert not torch.equal(obj.encoder.trunk.fc.weight, enc_before)
    obj.eval()
    cols = obj.validation_step(textured, None, None, torch.Generator().manual_seed(0))
    m = obj.validation_metrics(cols)
    assert 0 <= m["d_acc"] <= 1 and np.isfinite(m["val_loss"])
    # The discriminator learns to tell real pairs from generated ones (its loss falls below chance).
    assert m["val_loss"] < 2 * math.log(2)
