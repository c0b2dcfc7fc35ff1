"""Crops, rotations/flips, the lazy grid dataset (real grid files written by nic.grids), the models,
and test-time averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downstream_helpers import blob_mask, make_cohort, write_grid
from nic.downstream.crops import center_crop, center_weights, crop, dihedral, random_crop, sample_centers
from nic.downstream.dataset import EpochSampler, GridDataset, GridSource, balanced_weights
from nic.downstream.evaluate import predict_slides, tta_predict_slide
from nic.downstream.models import AttentionMIL, NicGridCNN, build_model, load_model, save_model
from nic.grids.dihedral import transform_image
from nic.grids.reader import load_grid


def test_center_weights_follow_distance_from_background():
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:8, 1:8] = True
    w = center_weights(mask)
    assert w.sum() == pytest.approx(1.0)
    assert (w[~mask] == 0).all()
    assert w[4, 4] == w.max() and w[4, 4] == pytest.approx(4 * w[1, 1])  # distance 4 vs 1
    edge = np.ones((5, 5), dtype=bool)  # tissue touching the grid border counts as a border
    assert center_weights(edge)[0, 0] < center_weights(edge)[2, 2]
    assert center_weights(np.zeros((3, 3), dtype=bool)) == pytest.approx(np.full((3, 3), 1 / 9))


def test_sampled_centres_prefer_the_tissue_interior():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:18, 2:18] = True
    centers = sample_centers(mask, 4000, np.random.default_rng(0))
    assert mask[centers[:, 0], centers[:, 1]].all()
    inner = (np.abs(centers - 9.5) < 4).all(axis=1).mean()
    assert inner > 0.35  # the inner 8x8 is 25 % of the tissue area but gets far more centres


def test_crop_pads_small_grids_and_stays_inside_large_ones():
    grid = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4) + 1
    mask = np.ones((5, 4), dtype=bool)
    g, m = crop(grid, mask, (2, 1), 8)  # larger than the grid in both directions: padded
    assert g.shape == (2, 8, 8) and m.sum() == 20
    assert np.array_equal(g[:, m].reshape(2, 5, 4), grid)  # the whole grid, unchanged
    assert (g[:, ~m] == 0).all()
    big = np.random.default_rng(0).normal(size=(3, 30, 30)).astype(np.float32)
    g2, m2 = crop(big, np.ones((30, 30), bool), (0, 29), 10)  # near a corner: window clamped inside
    assert np.array_equal(g2, big[:, 0:10, 20:30]) and m2.all()
    g3, _ = center_crop(grid, mask, 9)
    assert g3.shape == (2, 9, 9)
    g4, m4 = random_crop(big, np.ones((30, 30), bool), 6, np.random.default_rng(1))
    assert g4.shape == (3, 6, 6) and m4.all()
    with pytest.raises(ValueError):
        crop(grid, mask, (0, 0), 0)


def test_dihedral_is_the_grid_formats_numbering():
    grid = np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32)
    mask = grid[0] > 0
    seen = set()
    for k in range(8):
        g, m = dihedral(grid, mask, k)
        assert np.array_equal(g, transform_image(grid, k, axes=(1, 2)))
        assert np.array_equal(m, transform_image(mask, k))
        assert g.flags["C_CONTIGUOUS"]
        seen.add(g.tobytes())
    assert len(seen) == 8


def _store(tmp_path, n=6, dihedral_variants=False):
    rng = np.random.default_rng(0)
    grids = tmp_path / "grids"
    for i in range(n):
        mask = blob_mask(7, 9, rng)
        emb = rng.normal(size=(4, 7, 9)).astype(np.float32)
        emb[:, ~mask] = 0
        write_grid(grids, f"s{i}", emb, mask, dihedral=dihedral_variants, variant_offset=100.0)
    return grids


class CountingLoader:
    def __init__(self):
        self.calls = []

    def __call__(self, grids_dir, slide_id, transform=0):
        self.calls.append((slide_id, transform))
        return load_grid(grids_dir, slide_id, transform=transform)


def test_dataset_is_lazy_and_its_cache_bounded(tmp_path):
    grids = _store(tmp_path, n=6)
    loader = CountingLoader()
    ids = [f"s{i}" for i in range(6)]
    ds = GridDataset(grids, ids, {"target": np.arange(6)}, crop_size=5, train=True, cache_size=2, loader=loader)
    assert loader.calls == [] and ds.source.loads == 0  # building the dataset reads no grid
    for i in range(6):
        item = ds[i]
        assert item["grid"].shape == (4, 5, 5) and item["mask"].dtype == torch.bool
        assert int(item["target"]) == i
    assert len(loader.calls) == 6 and ds.source.cached == 2  # never more than 2 grids held
    ds[5]
    assert len(loader.calls) == 6  # the most recent grid came from the cache
    ds[0]
    assert len(loader.calls) == 7  # an evicted one is read again
    assert {c[1] for c in loader.calls} == {0}  # no stored variants: identity read, cells moved


def test_grid_cache_is_bounded_in_bytes_as_well_as_count(tmp_path):
    grids = _store(tmp_path, n=4)
    loader = CountingLoader()
    one = GridSource(grids, cache_size=64, loader=loader)
    grid, mask = one.load("s0")
    per_grid = grid.nbytes + mask.nbytes
    # A budget of two and a half grids keeps two, however many the count allows.
    source = GridSource(grids, cache_size=64, loader=loader, max_cache_bytes=int(2.5 * per_grid))
    for i in range(4):
        source.load(f"s{i}")
    assert source.cached == 2
    calls = len(loader.calls)
    source.load("s3"), source.load("s2")
    assert len(loader.calls) == calls  # the two most recent came from the cache
    source.load("s0")
    assert len(loader.calls) == calls + 1  # an evicted one is read again
    # A grid larger than the whole budget is still served (and held alone).
    tiny = GridSource(grids, cache_size=64, loader=loader, max_cache_bytes=1)
    tiny.load("s0"), tiny.load("s1")
    assert tiny.cached == 1


def test_dataset_reads_stored_dihedral_variants(tmp_path):
    grids = _store(tmp_path, n=1, dihedral_variants=True)
    loader = CountingLoader()
    source = GridSource(grids, cache_size=0, loader=loader)
    assert source.variants("s0") == tuple(range(8))
    for k in range(8):
        g, m = source.transform("s0", k)
        # The stored variant k carries +100 k in channel 1 (see write_grid): it is read, not rotated.
        assert g[1][m].mean() == pytest.approx(100.0 * k, abs=5)
    assert [c[1] for c in loader.calls] == list(range(8))
    # Without variants, transform k is the identity grid with its cells moved.
    plain = GridSource(_store(tmp_path / "plain", n=1))
    ident, _ = plain.transform("s0", 0)
    rotated, _ = plain.transform("s0", 5)
    assert np.array_equal(rotated, transform_image(ident, 5, axes=(1, 2)))


def test_eval_dataset_is_deterministic(tmp_path):
    grids = _store(tmp_path, n=2)
    ds = GridDataset(grids, ["s0", "s1"], {"target": np.zeros(2)}, crop_size=12, train=False)
    a, b = ds[0], ds[0]
    assert torch.equal(a["grid"], b["grid"]) and a["grid"].shape == (4, 12, 12)
    assert int(a["mask"].sum()) == int(load_grid(grids, "s0")[1].sum())  # small grid: all of it, padded


def test_epoch_sampler_shards_and_balances():
    s0 = EpochSampler(10, rank=0, world_size=3, seed=1)
    s1 = EpochSampler(10, rank=1, world_size=3, seed=1)
    s2 = EpochSampler(10, rank=2, world_size=3, seed=1)
    parts = [list(s) for s in (s0, s1, s2)]
    assert all(len(p) == 4 == len(s0) for p in parts)
    assert set(sum(parts, [])) == set(range(10))  # every sample is seen in the epoch
    s0.set_epoch(1)
    assert list(s0) != parts[0]
    classes = np.array([0] * 90 + [1] * 10)
    bal = EpochSampler(100, seed=0, weights=balanced_weights(classes))
    drawn = []
    for epoch in range(20):
        bal.set_epoch(epoch)
        drawn += list(bal)
    assert 0.4 < classes[drawn].mean() < 0.6  # rare class drawn half the time


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 16), (33, 20)])
def test_models_take_grids_of_any_size(shape):
    torch.manual_seed(0)
    grid = torch.randn(3, 8, *shape)
    mask = torch.rand(3, *shape) > 0.3
    for model in (NicGridCNN(8, outputs=1), AttentionMIL(8, outputs=4)):
        out = model.eval()(grid, mask)
        assert out.shape[0] == 3 and torch.isfinite(out).all()


def test_nic_cnn_has_the_papers_layout():
    model = NicGridCNN(128, outputs=1)
    strides = [b.depthwise.stride[0] for b in model.features]
    assert strides == [2, 2, 2, 2, 2, 2, 1, 1]
    assert all(b.pointwise.out_channels == 128 for b in model.features)
    assert all(isinstance(b.drop, torch.nn.Dropout2d) and b.drop.p == 0.2 for b in model.features)
    assert model.head[0].out_features == 128


def test_attention_ignores_cells_off_tissue():
    torch.manual_seed(0)
    model = AttentionMIL(4, outputs=1).eval()
    grid = torch.randn(1, 4, 5, 5)
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    _, weights = model.attention(grid, mask)
    assert weights[0][~mask.reshape(-1)].sum() == 0
    assert weights.sum().item() == pytest.approx(1.0)
    changed = grid.clone()
    changed[:, :, 4, 4] = 50.0  # background content must not change the output
    assert torch.allclose(model(grid, mask), model(changed, mask))
    empty = torch.zeros(1, 5, 5, dtype=torch.bool)  # no tissue: attends everywhere instead of NaN
    assert torch.isfinite(model(grid, empty)).all()


def test_save_and_load_model(tmp_path):
    model = build_model("attention-mil", 8, 3)
    meta = {"model": "attention-mil", "in_channels": 8, "outputs": 3, "kind": "multiclass"}
    save_model(tmp_path / "m.pt", model, meta)
    loaded, got = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(loaded(x), model.eval()(x)) and got["kind"] == "multiclass"
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.pt: not a usable downstream model"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", 8, 1)


class CountCells(torch.nn.Module):
    """Predicts the number of tissue cells in a view and records how many views it saw."""

    def __init__(self):
        super().__init__()
        self.views = 0

    def forward(self, grid, mask):
        self.views += grid.shape[0]
        return mask.flatten(1).sum(1, keepdim=True).float()


def test_tta_averages_over_crops_and_rotations(tmp_path):
    grids, _ = make_cohort(tmp_path, n=3, channels=4, size=(6, 9), patients_with_two=0)
    source = GridSource(grids)
    cells = int(load_grid(grids, "s000")[1].sum())
    model = CountCells()
    # Crops larger than the grid hold all of it in every view: the average is exactly the cell count.
    whole = tta_predict_slide(model, source, "s000", "regression", 12, tta_crops=3)
    assert float(whole) == pytest.approx(cells) and model.views == 3 * 8
    # Small crops see part of the tissue; the average lies strictly between the extremes.
    model.views = 0
    part = tta_predict_slide(model, source, "s000", "regression", 3, tta_crops=5, transforms=(0, 3))
    assert 0 < float(part) <= 9 and model.views == 5 * 2
    torch.manual_seed(0)
    cnn = NicGridCNN(4, outputs=1).eval()
    preds = predict_slides(cnn, grids, ["s000", "s001", "s002"], "regression", 8, tta_crops=2,
                           target_mean=10.0, target_std=2.0)
    assert preds.shape == (3,)
    again = predict_slides(cnn, grids, ["s000", "s001", "s002"], "regression", 8, tta_crops=2,
                           target_mean=10.0, target_std=2.0)
    assert np.array_equal(preds, again)  # test-time views are seeded: repeatable
    probs = predict_slides(build_model("attention-mil", 4, 3).eval(), grids, ["s000"], "multiclass", 8, tta_crops=2)
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    p = predict_slides(cnn, grids, ["s001"], "binary", 8, tta_crops=2)
    assert 0 < float(p[0]) < 1
