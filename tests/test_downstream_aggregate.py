"""Pooling fold predictions into predictions.parquet, metrics.json values and plots, for every target
kind (no Ray: the fold prediction files are written as a fold's workers write them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from nic.artifacts import write_parquet_atomic
from nic.config.base import load_config
from nic.config.downstream import TrainDownstreamConfig
from nic.downstream.evaluate import prediction_columns
from nic.downstream.labels import load_labels
from nic.train.downstream_stage import aggregate_predictions, split_metrics, write_plots

N = 12


def _setup(tmp_path, kind, target):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "slide_id": [f"s{i}" for i in range(N)], "patient_id": [f"p{i // 2}" for i in range(N)],
        "grade": ["a", "b", "c"] * (N // 3), "label": [0, 1] * (N // 2), "score": rng.normal(size=N),
        "time": rng.uniform(1, 5, N).round(2), "event": [1, 0, 1] * (N // 3),
    })
    frame.to_csv(tmp_path / "labels.csv", index=False)
    labels = load_labels(tmp_path / "labels.csv", kind, target=target)
    config = load_config(TrainDownstreamConfig, values=dict(
        grids=str(tmp_path), labels=str(tmp_path / "labels.csv"), out=str(tmp_path / "out"), kind=kind,
        target=target, folds=2))
    # Fold k predicts cv slides 0-3 (fold 0) or 4-7 (fold 1); both predict the test slides 8-11.
    records = []
    for k in (0, 1):
        ids = [f"s{i}" for i in range(4 * k, 4 * k + 4)] + [f"s{i}" for i in range(8, 12)]
        if kind == "multiclass":
            pred = np.full((8, 3), 0.1)
            pred[np.arange(8), (np.arange(8) + k) % 3] = 0.8
        else:
            pred = np.linspace(0.1, 0.9, 8) + 0.05 * k
        part = pd.DataFrame({"slide_id": ids, "split": ["cv"] * 4 + ["test"] * 4, "fold": k,
                             **prediction_columns(kind, pred, labels.classes)})
        write_parquet_atomic(tmp_path / "out" / "folds" / f"fold_{k}" / "predictions.parquet",
                             pa.Table.from_pandas(part, preserve_index=False))
        records.append({"fold": k, "status": "ok"})
    return config, labels, records


@pytest.mark.parametrize("kind,target", [("binary", "label"), ("multiclass", "grade"),
                                         ("regression", "score"), ("survival", None)])
def test_aggregate_metrics_and_plots(tmp_path, kind, target):
    config, labels, records = _setup(tmp_path, kind, target)
    pred = aggregate_predictions(config, labels, records)
    assert list(pred.columns[:4]) == ["slide_id", "patient_id", "split", "fold"]
    cv, test = pred[pred["split"] == "cv"], pred[pred["split"] == "test"]
    assert len(cv) == 8 and len(test) == 4 and (test["fold"] == -1).all()
    assert sorted(test["slide_id"]) == ["s10", "s11", "s8", "s9"]
    if kind == "multiclass":
        # Test probabilities are the mean of the two fold models' probabilities.
        s8 = test[test["slide_id"] == "s8"][[f"prob_{c}" for c in labels.classes]].to_numpy()[0]
        assert s8 == pytest.approx([0.1, 0.45, 0.45])  # fold 0 puts 0.8 on class 1, fold 1 on class 2
        assert set(pred["target_label"]) == {"a", "b", "c"}
    else:
        s8 = test[test["slide_id"] == "s8"]["prediction"].iloc[0]
        assert s8 == pytest.approx((np.linspace(0.1, 0.9, 8)[4] * 2 + 0.05) / 2)
    if kind == "binary":
        assert (pred["predicted_class"] == (pred["prediction"] >= 0.5)).all()
    metrics = split_metrics(kind, cv, labels, bootstrap=20, seed=0)
    expected = {"binary": "roc_auc", "multiclass": "kappa_quadratic", "regression": "spearman", "survival": "c_index"}
    assert expected[kind] in metrics and metrics[expected[kind]]["n"] == 8
    plots = write_plots(config, labels, cv, "cv", metrics)
    names = [v for k, v in plots.items() if k != "logrank_p"]
    assert names and all((tmp_path / "out" / name).stat().st_size > 1000 for name in names)
    if kind == "survival":
        assert 0 <= plots["logrank_p"] <= 1
