"""Splits: grouped by patient (no patient in two folds, nor in training and test), stratified by
class and by event."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nic.downstream.labels import load_labels
from nic.downstream.splits import TEST_FOLD, SplitError, group_kfold, make_splits, train_val_split


def _labels(tmp_path, kind="binary", n=60, seed=0):
    rng = np.random.default_rng(seed)
    patients = [f"p{i // 3}" for i in range(n)]  # 3 slides per patient
    frame = pd.DataFrame({
        "slide_id": [f"s{i}" for i in range(n)], "patient_id": patients,
        "label": [int(p[1:]) % 2 for p in patients],
        "score": rng.normal(size=n), "time": rng.uniform(1, 10, n).round(2),
        "event": [int(int(p[1:]) % 3 == 0) for p in patients],
    })
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False)
    target = {"binary": "label", "regression": "score", "survival": None}[kind]
    return load_labels(path, kind, target=target)


@pytest.mark.parametrize("kind", ["binary", "regression", "survival"])
def test_no_patient_in_two_folds(tmp_path, kind):
    labels = _labels(tmp_path, kind)
    splits = make_splits(labels, folds=4, seed=1)
    assert set(splits["fold"]) == {0, 1, 2, 3}
    assert (splits.groupby("patient_id")["fold"].nunique() == 1).all()


def test_folds_are_stratified_by_class_and_by_event(tmp_path):
    labels = _labels(tmp_path, "binary")
    splits = make_splits(labels, folds=4, seed=0).merge(labels.frame, on="slide_id")
    share = splits.groupby("fold")["target"].mean()
    assert share.min() > 0.3 and share.max() < 0.7  # 50 % positives overall
    slabels = _labels(tmp_path, "survival")
    ssplits = make_splits(slabels, folds=4, seed=0).merge(slabels.frame, on="slide_id")
    assert (ssplits.groupby("fold")["event"].sum() > 0).all()  # every fold has events


def test_test_split_is_grouped_and_sized(tmp_path):
    labels = _labels(tmp_path, "binary")
    splits = make_splits(labels, folds=3, test_fraction=0.25, seed=2)
    test = splits[splits["fold"] == TEST_FOLD]
    assert 0.15 < len(test) / len(splits) < 0.35
    assert not set(test["patient_id"]) & set(splits.loc[splits["fold"] != TEST_FOLD, "patient_id"])
    assert set(splits["fold"]) == {TEST_FOLD, 0, 1, 2}
    # Same seed, same split.
    assert make_splits(labels, folds=3, test_fraction=0.25, seed=2).equals(splits)


def test_group_kfold_refuses_more_folds_than_patients():
    with pytest.raises(ValueError, match="cannot make 5 folds from 3 patient"):
        group_kfold(np.array(["a", "a", "b", "c"]), None, 5, 0)


def test_train_val_split_is_grouped():
    groups = np.repeat(np.arange(10), 2)
    strata = np.repeat(np.arange(10) % 2, 2)
    val = train_val_split(groups, strata, 0.2, seed=0)
    assert 0 < val.sum() < len(groups)
    assert not set(groups[val]) & set(groups[~val])
    assert not train_val_split(groups, strata, 0.0, seed=0).any()
    assert not train_val_split(np.zeros(4), None, 0.2, seed=0).any()  # one patient: nothing to hold out


def test_too_few_patients_is_a_split_error(tmp_path):
    """Bad input gets its own error, which train-downstream turns into exit 2; a plain ValueError,
    which a bug raises, is no longer caught as bad input."""
    from nic.train import downstream_stage

    labels = _labels(tmp_path, n=6)  # 2 patients
    with pytest.raises(SplitError, match="cannot make 3 folds from 2 patient"):
        make_splits(labels, folds=3)
    assert issubclass(SplitError, ValueError)  # callers catching ValueError still catch it
    assert downstream_stage.SplitError is SplitError
