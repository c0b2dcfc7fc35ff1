"""The linear probe (nic.downstream.probe): tissue-only features, a signal found by every model,
no held-out slide informing a fold, the exact fast Cox fit, and the stage's error handling. No Ray:
grid stores are written with nic.grids' writer and the probe itself takes seconds."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from downstream_helpers import blob_mask, write_grid
from nic.downstream import probe
from nic.downstream.labels import load_labels
from nic.downstream.metrics import c_index, roc_auc, spearman
from nic.downstream.splits import TEST_FOLD, make_splits
from nic.grids.reader import list_slides, load_grid


def _signal_cohort(root: Path, n: int = 60, channels: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """n slides (a few patients with two): z ~ N(0, 1) per patient is the tissue mean of channel 0
    (plus cell noise); 'score' = z + noise, 'label' = z > 0, survival hazard exp(1.5 z), 20 %
    censored. Background cells are never written (the grid writer stores tissue cells only)."""
    rng = np.random.default_rng(seed)
    n_patients = n - 6
    z = rng.normal(size=n_patients)
    slide_patient = list(range(n_patients)) + list(rng.choice(n_patients, 6, replace=False))
    rows = []
    for i, p in enumerate(slide_patient):
        h, w = (int(v) for v in rng.integers(8, 13, size=2))
        mask = blob_mask(h, w, rng)
        emb = rng.normal(0, 1, size=(channels, h, w)).astype(np.float32)
        emb[0] += z[p]
        sid = f"s{i:03d}"
        write_grid(root / "grids", sid, emb, mask)
        time = rng.exponential(1.0 / np.exp(1.5 * z[p])) + 0.01
        rows.append({"slide_id": sid, "patient_id": f"p{p:03d}", "score": z[p] + rng.normal(0, 0.3),
                     "label": int(z[p] > 0), "time": time, "event": int(rng.random() < 0.8)})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return root / "grids", labels


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return _signal_cohort(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def features(cohort):
    grids, _ = cohort
    return probe.slide_features(grids, list_slides(grids))


def _labels(cohort, kind: str, target: str | None):
    grids, labels_csv = cohort
    return load_labels(labels_csv, kind, target=target, available_slides=list_slides(grids), min_per_class=3)


def _cv_rows(run: probe.ProbeRun, labels) -> pd.DataFrame:
    return run.predictions[run.predictions["split"] == "cv"].merge(labels.frame, on="slide_id")


# --- features -----------------------------------------------------------------------------------


def test_features_are_tissue_mean_and_sd_and_ignore_background(cohort, features):
    grids, _ = cohort
    slide = list_slides(grids)[0]
    grid, mask = load_grid(grids, slide)
    cells = grid[:, mask]
    expected = np.concatenate([cells.mean(axis=1), cells.std(axis=1)])
    assert features.columns.tolist() == probe.feature_names(grid.shape[0])
    assert features.loc[slide].to_numpy() == pytest.approx(expected, rel=1e-5)

    # Whatever the background cells hold (zeros as read, or anything else), the features are the same.
    noisy = grid.copy()
    noisy[:, ~mask] = np.random.default_rng(1).normal(5, 3, size=(grid.shape[0], int((~mask).sum())))
    assert probe.grid_statistics(noisy, mask) == pytest.approx(probe.grid_statistics(grid, mask))
    # ... and a slide with less tissue is not diluted by its glass: a channel constant on tissue has
    # that constant as its mean and SD 0 however large the background.
    flat = np.zeros((2, 30, 30), dtype=np.float32)
    small = np.zeros((30, 30), dtype=bool)
    small[:3, :3] = True
    flat[:, small] = 2.0
    assert probe.grid_statistics(flat, small).tolist() == [2.0, 2.0, 0.0, 0.0]
    assert probe.grid_statistics(flat, np.zeros((30, 30), dtype=bool)).tolist() == [0.0] * 4


# --- signal --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, target, metric, floor", [
    ("regression", "score", "spearman", 0.8),
    ("binary", "label", "roc_auc", 0.85),
    ("survival", None, "c_index", 0.62),
])
def test_each_probe_finds_a_tissue_mean_signal(cohort, features, kind, target, metric, floor):
    labels = _labels(cohort, kind, target)
    splits = make_splits(labels, 3, 0.2, seed=0)
    run = probe.cross_validate_probe(features, labels, splits, seed=0)
    assert run.model == probe.MODEL_OF_KIND[kind]
    cv = _cv_rows(run, labels)
    assert sorted(cv["slide_id"]) == sorted(splits.loc[splits["fold"] >= 0, "slide_id"])  # each dev slide once
    test = run.predictions[run.predictions["split"] == "test"]
    assert len(test) == 3 * int((splits["fold"] == TEST_FOLD).sum())  # every fold model predicts the test set
    if metric == "spearman":
        value = spearman(cv["target"].to_numpy(), cv["prediction"].to_numpy())
    elif metric == "roc_auc":
        value = roc_auc(cv["target"].to_numpy(), cv["prediction"].to_numpy())
        assert set(cv["predicted_class"]) <= {0, 1}
    else:
        value = c_index(cv["time"].to_numpy(), cv["event"].to_numpy(), cv["prediction"].to_numpy())
    assert value > floor, (metric, value)
    assert all(r["penalty"] in probe.PENALTIES[run.model] for r in run.folds)


def test_logistic_probe_keeps_class_columns_when_a_class_is_missing():
    x = np.random.default_rng(0).normal(size=(12, 3))
    y = probe.ProbeTargets("multiclass", target=np.array([0, 2] * 6), n_classes=3)
    proba = probe.make_probe("multiclass", 1.0, 3).fit(x, y).predict(x)
    assert proba.shape == (12, 3) and (proba[:, 1] == 0).all()
    assert proba.sum(axis=1) == pytest.approx(np.ones(12))


def test_fast_cox_fit_is_lifelines_penalised_cox():
    """The probe fits lifelines on the training slides' principal coordinates with a per-column
    penalizer; the coefficients must be those of CoxPHFitter(penalizer) on the features."""
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 12))
    y = probe.ProbeTargets("survival", time=rng.exponential(np.exp(-x[:, 0])), event=(rng.random(40) < 0.8).astype(int))
    for penalty in (0.05, 1.0):
        model = probe.CoxProbe(penalty).fit(x, y)
        z = model.prep.transform(x)
        frame = pd.DataFrame(z, columns=[f"x{i}" for i in range(z.shape[1])])
        frame["time"], frame["event"] = y.time, y.event
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = CoxPHFitter(penalizer=penalty).fit(frame, "time", "event").params_.to_numpy()
        assert model.beta == pytest.approx(reference, abs=1e-5)


# --- no leakage ----------------------------------------------------------------------------------


def test_no_held_out_slide_informs_its_fold(cohort, features):
    """Fold k's model sees the other folds' slides only. Scrambling the targets of fold k and of
    the test set, and the test set's features, leaves fold k's out-of-fold predictions exactly as
    they were: any use of held-out data in standardisation, the inner penalty search or the fit
    would move them. The same scrambling does move the other folds' predictions (fold k is their
    training data), so the check can fail."""
    from dataclasses import replace

    labels = _labels(cohort, "regression", "score")
    splits = make_splits(labels, 3, 0.2, seed=0)
    base = probe.cross_validate_probe(features, labels, splits, seed=0).predictions
    k = 1
    test_ids = splits.loc[splits["fold"] == TEST_FOLD, "slide_id"]
    hidden = splits.loc[splits["fold"].isin([k, TEST_FOLD]), "slide_id"]
    scrambled = labels.frame.copy()
    rows = scrambled["slide_id"].isin(hidden)
    scrambled.loc[rows, "target"] = np.random.default_rng(5).normal(100, 50, size=int(rows.sum()))
    moved = features.copy()
    moved.loc[test_ids] = moved.loc[test_ids] * 3 + 7

    other = probe.cross_validate_probe(moved, replace(labels, frame=scrambled), splits, seed=0).predictions
    assert other["slide_id"].tolist() == base["slide_id"].tolist()
    cv = base["split"] == "cv"
    mine, theirs = cv & (base["fold"] == k), cv & (base["fold"] != k)
    assert other.loc[mine, "prediction"].to_numpy() == pytest.approx(base.loc[mine, "prediction"].to_numpy())
    assert not np.allclose(other.loc[theirs, "prediction"], base.loc[theirs, "prediction"])

    # The test set's features alone: no fold model is fitted on them, so every out-of-fold prediction stays.
    only_test = probe.cross_validate_probe(moved, labels, splits, seed=0).predictions
    assert only_test.loc[cv, "prediction"].to_numpy() == pytest.approx(base.loc[cv, "prediction"].to_numpy())


def test_inner_folds_keep_patients_together():
    groups = np.repeat(np.arange(10), 2)
    y = probe.ProbeTargets("binary", target=np.tile([0, 1], 10), n_classes=2)
    folds = probe.inner_folds(y, groups, seed=0)
    assert pd.Series(folds).groupby(groups).nunique().max() == 1
    assert probe.inner_folds(y, np.zeros(20), seed=0) is None  # one patient: no inner CV


# --- in the stage --------------------------------------------------------------------------------


def _stage_config(cohort, tmp_path, **extra):
    from nic.config.base import load_config
    from nic.config.downstream import TrainDownstreamConfig

    grids, labels_csv = cohort
    values = dict(grids=str(grids), labels=str(labels_csv), out=str(tmp_path / "out"), kind="binary",
                  target="label", folds=3, test_fraction=0.2, bootstrap=20)
    values.update(extra)
    return load_config(TrainDownstreamConfig, values=values)


def test_stage_probe_entry_has_the_cnn_layout(cohort, tmp_path):
    from nic.train.downstream_stage import _probe_line, run_probe

    config = _stage_config(cohort, tmp_path)
    assert config.probe is True  # on by default
    labels = _labels(cohort, "binary", "label")
    splits = make_splits(labels, 3, 0.2, seed=0)
    entry, predictions = run_probe(config, labels, splits)
    assert "error" not in entry and entry["model"] == "logistic" and entry["features"] == probe.FEATURES
    assert set(entry["cv"]["metrics"]) == {"roc_auc", "accuracy", "kappa_quadratic"}
    assert entry["cv"]["slides"] == int((splits["fold"] >= 0).sum())
    assert entry["test"]["slides"] == int((splits["fold"] == TEST_FOLD).sum())  # averaged over fold models
    assert entry["cv"]["fold_mean"]["roc_auc"]["folds"] == 3
    auc = entry["cv"]["metrics"]["roc_auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"] and auc["n"] == entry["cv"]["slides"]
    assert set(predictions.columns) >= {"slide_id", "patient_id", "split", "fold", "prediction",
                                        "predicted_class", "target", "target_label"}
    assert predictions.groupby("split")["slide_id"].apply(lambda s: s.is_unique).all()
    assert entry["seconds"] < 60
    assert _probe_line(entry, "roc_auc").startswith("linear probe (logistic on the mask-weighted mean")


def test_survival_probe_reports_the_log_rank_of_its_risk_groups(cohort, tmp_path):
    """The probe's survival entry carries the log-rank p of its predicted-risk groups (the CNN's
    Kaplan-Meier test), computed from its own pooled predictions: the strong hazard signal of the
    cohort separates the median-split groups, shuffled predictions do not."""
    from nic.downstream.plots import logrank_p, risk_groups
    from nic.train.downstream_stage import _probe_line, risk_group_logrank, run_probe

    config = _stage_config(cohort, tmp_path, kind="survival", target=None)
    labels = _labels(cohort, "survival", None)
    entry, predictions = run_probe(config, labels, make_splits(labels, 3, 0.2, seed=0))
    cv = predictions[predictions["split"] == "cv"]
    expected = logrank_p(cv["time"].to_numpy(), cv["event"].to_numpy(), risk_groups(cv["prediction"].to_numpy(), 2))
    assert entry["cv"]["logrank_p"] == pytest.approx(expected) and entry["cv"]["logrank_p"] < 0.01
    assert "log-rank p" in _probe_line(entry, "c_index")
    shuffled = cv.assign(prediction=np.random.default_rng(0).permutation(cv["prediction"].to_numpy()))
    assert risk_group_logrank(shuffled, 2) > entry["cv"]["logrank_p"]


def test_stage_probe_failure_is_recorded_not_raised(cohort, tmp_path, monkeypatch):
    from nic.train.downstream_stage import _probe_line, run_probe

    def degenerate(*args, **kwargs):
        raise ValueError("This solver needs samples of at least 2 classes in the data")

    monkeypatch.setattr(probe, "cross_validate_probe", degenerate)
    labels = _labels(cohort, "binary", "label")
    entry, predictions = run_probe(_stage_config(cohort, tmp_path), labels, make_splits(labels, 3, 0.2, seed=0))
    assert entry["error"].startswith("ValueError: This solver needs") and "cv" not in entry
    assert predictions.empty and entry["model"] == "logistic"
    assert "failed" in _probe_line(entry, "roc_auc")


def test_probe_only_run_trains_nothing_and_writes_the_probe(cohort, tmp_path):
    """train_model: false = the linear probe alone (nic tune's cheap trial metric): metrics.json holds
    `probe` and no `cv`, no fold is trained, and a run with nothing to do is refused at load time."""
    import json

    from nic.config.base import ConfigError, load_config
    from nic.config.downstream import TrainDownstreamConfig
    from nic.train.downstream_stage import run_train_downstream

    grids, labels_csv = cohort
    values = dict(grids=str(grids), labels=str(labels_csv), out=str(tmp_path / "m"), kind="regression",
                  target="score", folds=3, bootstrap=50, train_model=False)
    assert run_train_downstream(load_config(TrainDownstreamConfig, values=values)) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert "cv" not in metrics and metrics["folds"] == [] and metrics["trained_model"] is False
    assert metrics["probe"]["cv"]["metrics"]["spearman"]["value"] > 0.8
    assert (tmp_path / "m" / "probe_predictions.parquet").exists() and not (tmp_path / "m" / "folds").exists()
    with pytest.raises(ConfigError, match="nothing would be trained"):
        load_config(TrainDownstreamConfig, values={**values, "probe": False})


def test_tune_trials_judged_by_the_probe_train_no_downstream_model(tmp_path):
    from nic.config.base import ConfigError, load_config
    from nic.config.tune import TuneConfig
    from nic.tune.trial import _final_metric, trial_configs

    base = dict(tasks="t.yaml", slides=["s"], labels="l.csv", kind="regression", target="y", out=str(tmp_path))
    with pytest.raises(ConfigError, match="set asha: false"):
        load_config(TuneConfig, values={**base, "trial_metric": "probe"})
    static = {"tasks": "t.yaml", "slides": ["s"], "labels": "l.csv", "kind": "regression", "target": "y",
              "out": str(tmp_path), "encoder": {}, "compress": {}, "downstream": {"folds": 3}, "ray": {},
              "trial_metric": "probe"}
    _, _, downstream = trial_configs({"tasks": ["a"]}, static, tmp_path / "trial")
    assert downstream.train_model is False and downstream.probe is True
    metrics = {"primary_metric": "spearman", "probe": {"cv": {"metrics": {"spearman": {"value": 0.61}}}}}
    (tmp_path / "metrics.json").write_text(__import__("json").dumps(metrics))
    assert _final_metric(tmp_path / "metrics.json", "probe") == 0.61
    assert _final_metric(tmp_path / "metrics.json", "cnn") is None
