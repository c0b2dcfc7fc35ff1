"""The transfer benchmark's linear probe (benchmarks/bench_transfer.py) on tiny synthetic embeddings:
no Ray, no training, no cohort."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_transfer import bootstrap_indices, linear_probe, outer_folds, paired_difference, score  # noqa: E402

CS = (0.01, 1.0)  # two penalties keep the tests fast; the benchmark searches six


def _data(n: int = 300, dim: int = 8, canvases: int = 60, seed: int = 0):
    """Binary labels (half positive), canvas groups of 5 tiles, and embeddings: `separable` moves the
    positives along one direction, `noise` is independent of the labels."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    groups = np.arange(n) // (n // canvases)
    noise = rng.normal(size=(n, dim))
    separable = noise.copy()
    separable[:, 0] += 6.0 * (2 * y - 1)
    return y, groups, separable, noise


def test_a_separable_embedding_scores_one_and_a_random_one_chance():
    y, groups, separable, noise = _data()
    good = linear_probe(separable, y, "binary", groups, folds=5, seed=0, n_boot=200, cs=CS)
    bad = linear_probe(noise, y, "binary", groups, folds=5, seed=0, n_boot=200, cs=CS)
    assert good.metric == "roc_auc" and good.value > 0.99
    assert good.ci_low <= good.value <= good.ci_high and good.ci_low > 0.97
    assert abs(bad.value - 0.5) < 0.12
    assert bad.ci_low < 0.5 < bad.ci_high  # chance lies inside the interval of an uninformative embedding
    assert bad.ci_high - bad.ci_low > good.ci_high - good.ci_low
    assert good.oof.shape == (len(y),) and set(good.folds.tolist()) == set(range(5))
    assert len(good.chosen_c) == 5


def test_the_interval_narrows_with_more_samples():
    y1, g1, _, n1 = _data(n=200, canvases=40, seed=1)
    y2, g2, _, n2 = _data(n=2000, canvases=400, seed=1)
    small = linear_probe(n1, y1, "binary", g1, n_boot=200, cs=CS)
    large = linear_probe(n2, y2, "binary", g2, n_boot=200, cs=CS)
    assert large.ci_high - large.ci_low < 0.6 * (small.ci_high - small.ci_low)


def test_folds_keep_canvases_together_and_are_the_same_for_every_encoder():
    y, groups, separable, noise = _data()
    folds = outer_folds(y, groups, 5, seed=0)
    for g in np.unique(groups):
        assert len(set(folds[groups == g].tolist())) == 1  # a canvas never straddles a split
    assert np.array_equal(folds, outer_folds(y, groups, 5, seed=0))
    assert not np.array_equal(folds, outer_folds(y, groups, 5, seed=1))
    a = linear_probe(separable, y, "binary", groups, seed=3, n_boot=50, cs=CS)
    b = linear_probe(noise, y, "binary", groups, seed=3, n_boot=50, cs=CS)
    assert np.array_equal(a.folds, b.folds)
    # fold positives within a couple of canvases of a fifth each
    assert all(abs(y[folds == k].mean() - 0.5) < 0.1 for k in range(5))


def test_cluster_bootstrap_draws_whole_canvases():
    groups = np.repeat(np.arange(10), 4)
    for idx in bootstrap_indices(len(groups), groups, 5, seed=0):
        assert len(idx) == 40
        drawn = groups[idx]
        for g in np.unique(drawn):
            assert (drawn == g).sum() % 4 == 0


def test_paired_difference_is_positive_for_the_better_encoder():
    y, groups, separable, noise = _data()
    resamples = bootstrap_indices(len(y), groups, 200, seed=0)
    good = linear_probe(separable, y, "binary", groups, resamples=resamples, cs=CS)
    bad = linear_probe(noise, y, "binary", groups, resamples=resamples, cs=CS)
    diff, lo, hi = paired_difference(good, bad)
    assert diff == pytest.approx(good.value - bad.value) and lo <= diff <= hi and lo > 0.3
    same, lo0, hi0 = paired_difference(good, good)
    assert same == 0 and lo0 == 0 and hi0 == 0


def test_multiclass_probe_reports_balanced_accuracy():
    rng = np.random.default_rng(2)
    y = np.arange(300) % 3
    x = rng.normal(size=(300, 6))
    x[np.arange(300), y] += 5.0  # class k lights up channel k
    result = linear_probe(x, y, "multiclass", None, n_boot=100, cs=CS)
    assert result.metric == "balanced_accuracy" and result.value > 0.95
    assert result.oof.shape == (300, 3) and result.ci_low <= result.value <= result.ci_high
    chance = linear_probe(rng.normal(size=(300, 6)), y, "multiclass", None, n_boot=100, cs=CS)
    assert abs(chance.value - 1 / 3) < 0.12


def test_bad_inputs_are_refused():
    y, groups, separable, _ = _data()
    with pytest.raises(ValueError, match="embeddings must be"):
        linear_probe(separable[:10], y, "binary", groups)
    with pytest.raises(ValueError, match="binary task needs labels 0 and 1"):
        linear_probe(separable, y * 2, "binary", groups)


def test_fast_metrics_equal_scikit_learns():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # rounded: many ties
    assert score("binary", y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    y3 = rng.integers(0, 3, 500)
    p = rng.random((500, 3))
    assert score("multiclass", y3, p) == pytest.approx(balanced_accuracy_score(y3, p.argmax(axis=1)), abs=1e-12)
    assert np.isnan(score("binary", np.ones(5, int), np.arange(5.0)))
    # within folds: the folds' AUCs weighted by their pairs; a shift between folds changes nothing
    folds = np.arange(500) % 2
    shifted = s + 10.0 * folds
    per_fold = [roc_auc_score(y[folds == k], s[folds == k]) for k in (0, 1)]
    pairs = [(y[folds == k] == 1).sum() * (y[folds == k] == 0).sum() for k in (0, 1)]
    assert score("binary", y, shifted, folds) == pytest.approx(np.average(per_fold, weights=pairs), abs=1e-12)


def test_write_replaces_only_the_text_between_the_markers(tmp_path, monkeypatch):
    import bench_transfer

    results = tmp_path / "encoders.md"
    results.write_text(f"# Encoders\n\nbefore\n\n{bench_transfer.START}\nold table\n{bench_transfer.END}\n\nafter\n")
    monkeypatch.setattr(bench_transfer, "RESULTS", results)
    bench_transfer.write_results(f"{bench_transfer.START}\nnew table\n{bench_transfer.END}")
    text = results.read_text()
    assert "new table" in text and "old table" not in text
    assert text.startswith("# Encoders\n\nbefore\n\n") and text.endswith("\n\nafter\n")


def test_encoder_metric_lines_check_the_dense_goals_and_the_patch_task_loss(tmp_path):
    import json

    import bench_transfer

    def encoder(name, metrics):
        folder = tmp_path / "encoders" / name
        folder.mkdir(parents=True)
        (folder / "encoder.json").write_text(json.dumps({"metrics": metrics}))

    encoder("mtl-dense", {"nuclei/dice": 0.85, "nuclei/count_r": 0.88, "nuclei/pq": 0.6, "tissue_regions/dice": 0.9,
                          "tumour/auc": 0.95, "tumour/acc": 0.9, "tissue_type/acc": 0.97, "nuclei/loss": 0.3})
    encoder("mtl", {"tumour/auc": 0.98, "tumour/acc": 0.91, "tissue_type/acc": 0.98})
    text = "\n".join(bench_transfer.encoder_metric_lines(tmp_path, ["mtl-dense", "mtl", "random"]))
    assert "| nuclei/dice | 0.850 | >= 0.8 | yes |" in text
    assert "| nuclei/count_r | 0.880 | >= 0.9 | no |" in text
    assert "nuclei/pq 0.600" in text and "nuclei/loss" not in text
    # tumour is judged on AUC (the first of auc, acc, r2 it reports): 0.03 lost is beyond the limit.
    assert "| tumour | auc | 0.980 | 0.950 | -0.030 | no |" in text
    assert "| tissue_type | acc | 0.980 | 0.970 | -0.010 | yes |" in text
    # No table without the dense encoder's artifact.
    assert bench_transfer.encoder_metric_lines(tmp_path, ["mtl"]) == []


def test_training_cost_lines_report_the_median_epoch_of_each_trained_encoder(tmp_path):
    import json

    import bench_transfer

    for name, epochs in {"mtl-dense": [(225, 130.0), (225, 90.0), (225, 96.0)], "mtl": [(150, 40.0), (150, 30.0)]}.items():
        folder = tmp_path / "encoders" / name
        folder.mkdir(parents=True)
        history = [{"epoch": i + 1, "steps": steps, "seconds": sec} for i, (steps, sec) in enumerate(epochs)]
        (folder / "history.json").write_text(json.dumps(history))
    text = "\n".join(bench_transfer.training_cost_lines(tmp_path, ["mtl-dense", "mtl", "random"]))
    # median 96 s over 225 steps; 316 s in all
    assert "| mtl-dense | 3 | 225 | 1.60 | 0.43 | 5.3 |" in text
    # two epochs: the upper median (40 s)
    assert "| mtl | 2 | 150 | 0.67 | 0.27 | 1.2 |" in text
    assert "| random |" not in text
    assert bench_transfer.training_cost_lines(tmp_path, ["random"]) == []


def test_loss_verdict_says_whether_the_interval_settles_the_limit():
    import bench_transfer

    assert bench_transfer.loss_verdict(+0.01, -0.005, +0.03) == "yes (CI excludes a larger loss)"
    assert bench_transfer.loss_verdict(-0.06, -0.09, -0.03) == "no (CI excludes a smaller loss)"
    assert bench_transfer.loss_verdict(-0.01, -0.04, +0.02) == "yes (CI spans the limit)"
    assert bench_transfer.loss_verdict(-0.03, -0.06, +0.00) == "no (CI spans the limit)"


def test_task_metric_and_head_columns_per_kind():
    import bench_transfer
    import numpy as np

    y = np.array([0, 0, 1, 1])
    assert bench_transfer.task_metric("binary", y, np.array([0.1, 0.6, 0.4, 0.9])) == 0.75
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.1, 0.9], [0.6, 0.4]])
    assert bench_transfer.task_metric("multiclass", y, probs) == 0.5
    assert bench_transfer.task_metric("regression", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    columns = ("head:tumour", "head:tissue_type=a", "head:tissue_type=b", "head:tumour_size", "head:nuclei")
    pred = np.arange(10.0).reshape(2, 5)
    assert bench_transfer._task_outputs(pred, columns, "tumour", "binary").tolist() == [0.0, 5.0]
    assert bench_transfer._task_outputs(pred, columns, "tissue_type", "multiclass").tolist() == [[1.0, 2.0], [6.0, 7.0]]
