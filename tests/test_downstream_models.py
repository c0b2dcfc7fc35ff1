"""Slide heads pool over tissue only (issue 13): pooling as a choice, background that cannot change
a prediction, crops per slide per epoch, the config's pool defaults, and model files with pool."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nic.config.base import ConfigError, load_config
from nic.config.downstream import DEFAULT_POOL, TrainDownstreamConfig
from nic.downstream.dataset import EpochSampler, balanced_weights
from nic.downstream.models import POOLS, AttentionMIL, NicGridCNN, build_model, load_model, save_model

MODELS = ("nic-cnn", "attention-mil")
CASES = list(itertools.product(MODELS, POOLS))


def _batch(b: int = 4, c: int = 6, h: int = 19, w: int = 23, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random grids with blob-like masks (a rectangle of tissue plus random cells), one per crop."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randn(b, c, h, w, generator=gen)
    mask = torch.rand(b, h, w, generator=gen) > 0.7
    mask[:, 3:12, 4:15] = True
    return grid, mask


def _model(name: str, pool: str, c: int = 6, outputs: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, c, outputs, pool=pool).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("name,pool", CASES)
def test_background_cells_cannot_change_the_prediction(name, pool):
    model = _model(name, pool)
    grid, mask = _batch()
    with torch.no_grad():
        ref = model(grid, mask)
        background = ~mask.unsqueeze(1).expand_as(grid)
        for fill in (torch.randn(grid.shape) * 1e3, torch.full(grid.shape, float("nan")),
                     torch.full(grid.shape, float("inf"))):
            changed = torch.where(background, fill, grid)
            out = model(changed, mask)
            assert torch.isfinite(out).all()
            assert torch.allclose(out, ref, atol=1e-6, rtol=0), (name, pool, (out - ref).abs().max())


@pytest.mark.parametrize("pool", POOLS)
def test_attention_mil_ignores_padding_with_background(pool):
    model = _model("attention-mil", pool)
    grid, mask = _batch()
    padded = torch.nn.functional.pad(grid, (3, 5, 2, 7), value=9.0)  # junk in the new cells
    padded_mask = torch.nn.functional.pad(mask, (3, 5, 2, 7), value=False)
    with torch.no_grad():
        assert torch.allclose(model(padded, padded_mask), model(grid, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,pool", CASES)
def test_a_crop_without_tissue_has_a_finite_fixed_prediction(name, pool):
    """No tissue pools to the zero vector: the same finite output whatever the crop holds, and
    finite gradients in training (no 0/0 from a softmax or mean over no cells)."""
    model = _model(name, pool)
    grid, mask = _batch()
    mask[1] = False
    with torch.no_grad():
        out = model(grid, mask)
        other = model(torch.randn_like(grid), mask)
    assert torch.isfinite(out).all() and torch.equal(out[1], other[1])
    model.train()
    grid.requires_grad_(True)
    model(grid, mask).sum().backward()
    assert torch.isfinite(grid.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_pool_choice_changes_the_model(name):
    grid, mask = _batch(b=2, h=150, w=140)  # the CNN's output is 3 x 3 here (1 x 1 below 65 cells)
    outs = {}
    for pool in POOLS:
        model = _model(name, pool)
        assert model.pool == pool
        outs[pool] = model(grid, mask).detach()
    # max and mean models have the same parameters: only the pooling differs.
    assert set(_model(name, "max").state_dict()) == set(_model(name, "mean").state_dict())
    assert not torch.allclose(outs["max"], outs["mean"])
    assert not torch.allclose(outs["attention"], outs["mean"])


def test_defaults_keep_each_models_own_pooling():
    assert NicGridCNN(4).pool == "max" and AttentionMIL(4).pool == "attention"
    with pytest.raises(ValueError, match="unknown pool 'median'"):
        build_model("nic-cnn", 4, 1, pool="median")  # type: ignore[arg-type]


def test_cnn_carries_the_mask_through_its_strided_layers():
    model = _model("nic-cnn", "mean")
    grid, mask = _batch(h=40, w=33)
    feats, weight = model.feature_map(grid, mask)
    assert feats.shape[2:] == weight.shape[1:] == (1, 1)  # 40 x 33 after six stride-2 layers
    assert torch.equal(model(grid, None), model(grid, torch.ones_like(mask)))  # no mask = all tissue
    # Tissue in one corner only: output cells whose receptive field (~380 cells wide) never saw
    # it have a zero weight and zero features, so pooling leaves them out.
    corner = torch.zeros(1, 512, 512, dtype=torch.bool)
    corner[0, :10, :10] = True
    feats, weight = model.feature_map(torch.randn(1, 6, 512, 512), corner)
    assert feats.shape[2:] == (8, 8) and weight[0, 0, 0] > 0
    assert (weight[0, 4:, :] == 0).all() and (weight[0, :, 4:] == 0).all()
    assert (feats[0, :, 4:, :] == 0).all() and (feats[0, :, :, 4:] == 0).all()
    # The weight is the tissue fraction of the receptive field: 1 inside tissue, between 0 and 1 at its border.
    _, full = model.feature_map(torch.randn(1, 6, 16, 16), torch.ones(1, 16, 16, dtype=torch.bool))
    assert (full > 0).all() and (full <= 1).all()


@pytest.mark.parametrize("name,pool", CASES)
def test_save_and_load_keep_the_pooling(tmp_path, name, pool):
    model = _model(name, pool)
    save_model(tmp_path / "m.pt", model, {"model": name, "in_channels": 6, "outputs": 2, "kind": "regression"})
    loaded, meta = load_model(tmp_path / "m.pt")
    grid, mask = _batch()
    assert meta["pool"] == pool and loaded.pool == pool
    assert torch.equal(loaded(grid, mask), model(grid, mask))


def test_model_files_without_pool_load_as_before(tmp_path):
    """Files written before pooling was a choice: nic-cnn unmasked with a global max over all
    cells, attention-mil with its masked gated attention."""
    torch.manual_seed(0)
    old_cnn = NicGridCNN(6, outputs=1).eval()
    torch.save({"meta": {"model": "nic-cnn", "in_channels": 6, "outputs": 1}, "state_dict": old_cnn.state_dict()},
               tmp_path / "cnn.pt")
    loaded, meta = load_model(tmp_path / "cnn.pt")
    assert "pool" not in meta and loaded.pool == "max" and loaded.masked is False
    grid, mask = _batch()
    with torch.no_grad():
        expected = old_cnn.head(old_cnn.features(grid).amax(dim=(2, 3)))  # the old forward
        assert torch.equal(loaded(grid, mask), expected)
    mil = AttentionMIL(6, outputs=1).eval()
    torch.save({"meta": {"model": "attention-mil", "in_channels": 6, "outputs": 1}, "state_dict": mil.state_dict()},
               tmp_path / "mil.pt")
    loaded, _ = load_model(tmp_path / "mil.pt")
    assert loaded.pool == "attention" and torch.equal(loaded(grid, mask), mil(grid, mask))


@pytest.mark.parametrize("n,k,world", [(21, 8, 1), (10, 3, 3), (7, 1, 2), (5, 4, 4)])
def test_epoch_sampler_draws_every_slide_k_times(n, k, world):
    samplers = [EpochSampler(n, rank=r, world_size=world, seed=3, repeats=k) for r in range(world)]
    for epoch in (0, 1):
        parts = []
        for s in samplers:
            s.set_epoch(epoch)
            parts.append(list(s))
        assert all(len(p) == len(samplers[0]) == -(-n * k // world) for p in parts)  # same steps on every rank
        whole = EpochSampler(n, seed=3, repeats=k)
        whole.set_epoch(epoch)
        order = list(whole)
        assert np.array_equal(np.bincount(order, minlength=n), np.full(n, k))  # exactly k per slide
        # Each round of n is a permutation: a slide comes back only after every other slide.
        assert all(sorted(order[i * n:(i + 1) * n]) == list(range(n)) for i in range(k))
        sharded = sum(parts, [])
        counts = np.bincount(sharded, minlength=n)
        assert (counts >= k).all() and counts.sum() - n * k < world  # only the DDP padding repeats


def test_epoch_sampler_repeats_in_unshuffled_and_balanced_modes():
    assert list(EpochSampler(3, shuffle=False, repeats=2)) == [0, 1, 2, 0, 1, 2]
    classes = np.array([0] * 18 + [1] * 2)
    bal = EpochSampler(20, seed=0, weights=balanced_weights(classes), repeats=8)
    assert len(bal) == 160
    drawn = []
    for epoch in range(10):
        bal.set_epoch(epoch)
        drawn += list(bal)
    assert len(drawn) == 1600 and 0.4 < classes[drawn].mean() < 0.6
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        EpochSampler(3, repeats=0)
    one = EpochSampler(9, seed=2)  # repeats=1 is the sampler's old order
    assert list(one) == np.random.default_rng((2, 0)).permutation(9).tolist()


def _config(**extra) -> TrainDownstreamConfig:
    values = dict(grids="g", labels="l.csv", out="o", kind="regression", target="y")
    values.update(extra)
    return load_config(TrainDownstreamConfig, values=values)


def test_config_pool_defaults_per_model_and_kind():
    for model, kinds in DEFAULT_POOL.items():
        for kind, pool in kinds.items():
            assert _config(model=model, kind=kind).pool == pool
    assert _config().pool == "mean" and _config(kind="binary").pool == "max"  # the provisional table
    assert _config(kind="binary", pool="attention").pool == "attention"  # an explicit choice wins
    cfg = _config()
    assert cfg.crops_per_slide == 8 and _config(crops_per_slide=1).crops_per_slide == 1


@pytest.mark.parametrize("pool", POOLS)
def test_config_accepts_each_pool(pool):
    assert _config(pool=pool).pool == pool


def test_config_rejects_unknown_pools_and_crop_counts():
    with pytest.raises(ConfigError, match=r"key 'pool'.*'max', 'mean' or 'attention'.*got 'median'"):
        _config(pool="median")
    with pytest.raises(ConfigError, match="key 'crops_per_slide'.*greater than or equal to 1"):
        _config(crops_per_slide=0)


def test_strided_layers_follow_the_paper_at_400_and_keep_a_map_on_small_crops():
    from nic.downstream.models import strided_layers_for

    assert strided_layers_for(400) == 6  # the paper: 400 / 2^6 -> a 7 x 7 last map
    assert strided_layers_for(46) == 2   # the demo grids: 12 x 12, not 1 x 1
    assert strided_layers_for(8) == 0
    model = NicGridCNN(8, 1, strided=strided_layers_for(46)).eval()
    x, weight = model.feature_map(torch.randn(2, 8, 46, 46), torch.ones(2, 46, 46, dtype=torch.bool))
    assert x.shape[-2:] == (12, 12) and weight.shape[-2:] == (12, 12)


def test_strided_layers_survive_save_and_load(tmp_path):
    model = build_model("nic-cnn", 8, 1, pool="mean", strided=2).eval()
    save_model(tmp_path / "m.pt", model, {"model": "nic-cnn", "in_channels": 8, "outputs": 1})
    loaded, meta = load_model(tmp_path / "m.pt")
    assert meta["strided"] == 2 and loaded.strided == 2
    grid, mask = torch.randn(1, 8, 30, 30), torch.ones(1, 30, 30, dtype=torch.bool)
    assert torch.equal(model(grid, mask), loaded(grid, mask))
