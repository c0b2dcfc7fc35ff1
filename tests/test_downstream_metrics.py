"""Metrics against hand-computed values, bootstrap intervals, and the plots (real PNG files)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from nic.downstream.metrics import (
    accuracy,
    bootstrap_ci,
    c_index,
    compute_metrics,
    pearson,
    quadratic_kappa,
    roc_auc,
    spearman,
)
from nic.downstream.plots import logrank_p, plot_kaplan_meier, plot_roc, plot_scatter, risk_groups


def test_roc_auc_by_hand():
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) -> 3/4
    assert roc_auc(np.array([1, 0, 1, 0]), np.array([0.8, 0.6, 0.4, 0.2])) == pytest.approx(0.75)
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_multiclass_auc_and_kappa():
    y = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert roc_auc(y, perfect) == pytest.approx(1.0)
    assert quadratic_kappa(y, y) == pytest.approx(1.0)
    # Quadratic weights punish a 0<->2 swap more than a 0<->1 swap.
    near = quadratic_kappa(np.array([0, 1, 2, 2, 1, 0]), np.array([1, 1, 2, 2, 1, 0]))
    far = quadratic_kappa(np.array([0, 1, 2, 2, 1, 0]), np.array([2, 1, 2, 2, 1, 0]))
    assert near > far


def test_accuracy_and_kappa_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 1, 1])
    assert accuracy(y, p) == pytest.approx(0.75)
    # Binary kappa: po = 0.75, pe = 0.5*0.25 + 0.5*0.75 = 0.5 -> (0.75-0.5)/(1-0.5) = 0.5
    assert quadratic_kappa(y, p) == pytest.approx(0.5)


def test_spearman_and_pearson():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone: rank correlation 1
    assert pearson(x, x**3) < 0.99  # but not linear
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_c_index_uses_risk_with_the_right_sign():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 0])
    risk = np.array([4.0, 3.0, 2.0, 1.0])  # earliest event has the highest risk: perfect
    assert c_index(time, event, risk) == pytest.approx(1.0)
    assert c_index(time, event, -risk) == pytest.approx(0.0)
    # Hand count: admissible pairs (i event, t_i < t_j): (1,2) (1,3) (1,4) (2,3) (2,4) (3,4) = 6;
    # risk [1, 3, 2, 4]: concordant when risk_i > risk_j: (2,3) only -> 1/6
    assert c_index(time, event, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(1 / 6)
    assert math.isnan(c_index(time, np.zeros(4), risk))


def test_bootstrap_ci_brackets_the_estimate_and_is_repeatable():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(0, 1.0, 200)
    lo, hi = bootstrap_ci(roc_auc, (y, s), n_bootstrap=300, seed=1)
    value = roc_auc(y, s)
    assert lo < value < hi
    assert 0.5 < lo and hi < 1.0
    assert (lo, hi) == bootstrap_ci(roc_auc, (y, s), n_bootstrap=300, seed=1)
    # Wider with fewer slides.
    lo_s, hi_s = bootstrap_ci(roc_auc, (y[:30], s[:30]), n_bootstrap=300, seed=1)
    assert hi_s - lo_s > hi - lo
    assert all(math.isnan(v) for v in bootstrap_ci(roc_auc, (y, s), n_bootstrap=0))


def test_compute_metrics_per_kind():
    y = np.array([0, 1, 0, 1, 1, 0])
    m = compute_metrics("binary", target=y, prediction=np.array([0.1, 0.9, 0.2, 0.7, 0.8, 0.4]), n_bootstrap=50)
    assert set(m) == {"roc_auc", "accuracy", "kappa_quadratic"}
    assert m["roc_auc"]["value"] == pytest.approx(1.0) and m["accuracy"]["value"] == pytest.approx(1.0)
    assert m["roc_auc"]["n"] == 6
    r = compute_metrics("regression", target=np.arange(5.0), prediction=np.arange(5.0) * 2, n_bootstrap=50)
    assert r["spearman"]["value"] == pytest.approx(1.0) and r["mse"]["value"] == pytest.approx(6.0)
    s = compute_metrics("survival", time=np.array([1.0, 2, 3]), event=np.array([1, 1, 0]),
                        prediction=np.array([3.0, 2, 1]), n_bootstrap=0)
    assert s["c_index"]["value"] == pytest.approx(1.0) and s["c_index"]["ci_low"] is None
    mc = compute_metrics("multiclass", target=np.array([0, 1, 2]), prediction=np.eye(3), n_bootstrap=0)
    assert mc["accuracy"]["value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown target kind"):
        compute_metrics("ranking", target=y, prediction=y)


def _png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 200 and img.size[1] > 200
        return np.asarray(img.convert("L"))


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    roc = plot_roc(y, y + rng.normal(0, 0.8, 60), tmp_path / "roc.png")
    assert _png(roc).std() > 5  # not a blank canvas
    roc3 = plot_roc(rng.integers(0, 3, 60), rng.dirichlet([1, 1, 1], 60), tmp_path / "roc3.png", classes=["a", "b", "c"])
    _png(roc3)
    _png(plot_scatter(np.arange(20.0), np.arange(20.0) + rng.normal(0, 1, 20), tmp_path / "scatter.png",
                      annotation="Spearman 0.9"))
    risk = rng.normal(size=80)
    time = np.exp(-risk + rng.normal(0, 0.3, 80))  # high risk -> short time
    event = (rng.random(80) < 0.8).astype(int)
    path, p = plot_kaplan_meier(time, event, risk, tmp_path / "km.png")
    _png(path)
    assert p < 1e-3  # risk groups separate strongly by construction
    _, p3 = plot_kaplan_meier(time, event, risk, tmp_path / "km3.png", groups=3)
    assert p3 < 1e-3
    assert not list(tmp_path.glob(".*.tmp"))


def test_risk_groups_and_logrank():
    risk = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    assert risk_groups(risk, 2).tolist() == [0, 1, 1, 0, 1, 0]
    assert sorted(set(risk_groups(np.arange(9.0), 3))) == [0, 1, 2]
    assert math.isnan(logrank_p(np.ones(3), np.ones(3), np.zeros(3)))
