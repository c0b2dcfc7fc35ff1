"""Cross-validation splits of slides, by patient when patients are known.

Two slides of one patient in different folds leak the patient into the test fold and inflate every
metric, so splitting is always grouped (by patient, or by slide when there is no patient column).
Splits are stratified by class, or by event for survival, using scikit-learn's
StratifiedGroupKFold; regression uses GroupKFold. Inside each training part a validation subset
(for early stopping and the learning-rate schedule) is split off the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from nic.downstream.labels import Labels

TEST_FOLD = -1


class SplitError(ValueError):
    """The labelled slides cannot be split as asked (fewer patients than folds): the user's input,
    so train-downstream exits 2 with this message, as for a LabelError."""


def _splitter(n_splits: int, stratified: bool, seed: int):
    if stratified:
        return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def group_kfold(
    groups: np.ndarray, strata: np.ndarray | None, n_splits: int, seed: int
) -> np.ndarray:
    """Fold index (0..n_splits-1) per sample; samples of one group always share a fold."""
    n_groups = len(np.unique(groups))
    if n_splits < 2:
        raise SplitError(f"need at least 2 folds, got {n_splits}")
    if n_groups < n_splits:
        raise SplitError(f"cannot make {n_splits} folds from {n_groups} patient(s); lower 'folds'")
    fold = np.full(len(groups), -1, dtype=int)
    x = np.zeros((len(groups), 1))
    y = strata if strata is not None else np.zeros(len(groups), dtype=int)
    for k, (_, held) in enumerate(_splitter(n_splits, strata is not None, seed).split(x, y, groups)):
        fold[held] = k
    return fold


def make_splits(labels: Labels, folds: int, test_fraction: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Assign every slide a fold: 0..folds-1 for cross-validation, -1 for the fixed test set.

    The test set (when test_fraction > 0) is one fold of a grouped, stratified
    round(1/test_fraction)-fold split, so it too never shares a patient with training.
    Returns a frame: slide_id, patient_id, fold.
    """
    frame = labels.frame[["slide_id", "patient_id"]].copy()
    groups = frame["patient_id"].to_numpy()
    strata = labels.strata()
    assignment = np.zeros(len(frame), dtype=int)
    dev = np.ones(len(frame), dtype=bool)
    if test_fraction > 0:
        n_test_splits = max(2, int(round(1.0 / test_fraction)))
        test = group_kfold(groups, strata, n_test_splits, seed + 7919) == 0
        assignment[test] = TEST_FOLD
        dev = ~test
    dev_strata = strata[dev] if strata is not None else None
    assignment[dev] = group_kfold(groups[dev], dev_strata, folds, seed)
    frame["fold"] = assignment
    return frame


def train_val_split(
    groups: np.ndarray, strata: np.ndarray | None, val_fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of the validation part of a training set (grouped, stratified when possible).

    Falls back to an unstratified grouped split when a class is too rare to stratify, and to no
    validation part at all (all False) with fewer than two groups.
    """
    n_groups = len(np.unique(groups))
    n_splits = max(2, int(round(1.0 / val_fraction))) if val_fraction > 0 else 0
    if n_splits == 0 or n_groups < 2:
        return np.zeros(len(groups), dtype=bool)
    n_splits = min(n_splits, n_groups)
    if strata is not None:
        counts = np.bincount(strata)
        if counts[counts > 0].min() < n_splits:
            strata = None
    return group_kfold(groups, strata, n_splits, seed + 104729) == 0
