"""A linear probe on feature grids: does a grid store carry the target's signal at all?

A CNN on grids takes minutes to hours and can fail for reasons of its own (too few slides, an
unlucky learning rate), so a poor CNN result alone does not say whether the encoder's features are
at fault. The probe answers that in seconds: each slide is summarised by the mean and standard
deviation of every grid channel over its tissue cells (2C numbers), and a regularised linear model
from a well-kept library is fitted on them: ridge regression (regression), logistic regression
(binary, multiclass) or a ridge-penalised Cox model from lifelines (survival), each after
standardisation.

No held-out slide informs a probe fold: the folds are the CNN's own patient-grouped folds, and the
penalty is chosen by an inner patient-grouped cross-validation on the fold's training slides only
(standardisation, too, is fitted inside every inner and outer training part). The fixed test set
is predicted by every fold model and averaged, as the CNN's is. Predictions come out in the
columns of the CNN's fold predictions, so the stage pools and scores both the same way.

`slide_features` is public because it is the expensive part (one read per grid) and callers that
fit many probes on one store (e.g. `nic tune`) compute it once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from lifelines.exceptions import ConvergenceError
from lifelines.fitters.coxph_fitter import SemiParametricPHFitter
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from nic.downstream.labels import Labels
from nic.downstream.metrics import c_index
from nic.downstream.splits import TEST_FOLD, group_kfold
from nic.grids.reader import load_grid

FEATURES = "mask-weighted mean and sd of each channel"
MODEL_OF_KIND = {"regression": "ridge", "binary": "logistic", "multiclass": "logistic", "survival": "cox"}
# Penalty grids on standardised features, strongest last. Ridge: alpha of sum-of-squares loss;
# logistic: 1 / C; Cox: lifelines' penalizer (times n, so per slide), with fewer values and inner
# folds because a lifelines fit costs ~0.1-0.3 s where the others cost milliseconds.
PENALTIES: dict[str, np.ndarray] = {
    "ridge": np.logspace(-2, 4, 13),
    "logistic": np.logspace(-2, 4, 13),
    "cox": np.logspace(-2, 2, 5),
}
INNER_FOLDS = {"ridge": 5, "logistic": 5, "cox": 3}
# What an inner fit may raise on a degenerate part (one class, no events, a singular Hessian);
# such a fit scores nothing rather than stopping the search. lifelines' ConvergenceError is a
# ValueError.
_FIT_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError)


# ---------------------------------------------------------------------------------------------
# Features


def grid_statistics(grid: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(2C,) mean then population SD of each channel over the tissue cells of a (C, H, W) grid.

    Background cells are zeros in a grid, not data: including them would make every statistic
    depend on how much of the slide is glass. A slide without tissue gets zeros."""
    cells = grid[:, mask]
    if cells.shape[1] == 0:
        return np.zeros(2 * grid.shape[0])
    return np.concatenate([cells.mean(axis=1, dtype=np.float64), cells.std(axis=1, dtype=np.float64)])


def feature_names(channels: int) -> list[str]:
    return [f"mean_{i}" for i in range(channels)] + [f"sd_{i}" for i in range(channels)]


def slide_features(grids_dir: str | Path, slide_ids: Iterable[str]) -> pd.DataFrame:
    """Per-slide probe features, indexed by slide_id: mean_<c> and sd_<c> for every channel c.

    Each grid is read once (the cost of the probe); the models then work on this small table."""
    ids = list(slide_ids)
    rows = []
    for slide_id in ids:
        grid, mask = load_grid(grids_dir, slide_id)
        rows.append(grid_statistics(grid, mask))
    channels = len(rows[0]) // 2 if rows else 0
    if any(len(r) != 2 * channels for r in rows):
        raise ValueError(f"{grids_dir}: grids with different channel counts cannot share one probe")
    frame = pd.DataFrame(np.array(rows).reshape(len(ids), 2 * channels), columns=feature_names(channels))
    frame.index = pd.Index(ids, name="slide_id")
    return frame


# ---------------------------------------------------------------------------------------------
# Targets and models


@dataclass(frozen=True)
class ProbeTargets:
    """What a probe learns, aligned with the rows of a feature matrix: a class index or value
    (`target`), or survival `time` and `event`."""

    kind: str
    target: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    n_classes: int = 0

    @classmethod
    def from_labels(cls, labels: Labels, slide_ids: list[str]) -> ProbeTargets:
        frame = labels.frame.set_index("slide_id").loc[slide_ids]
        if labels.kind == "survival":
            return cls("survival", time=frame["time"].to_numpy(float), event=frame["event"].to_numpy(int))
        dtype = float if labels.kind == "regression" else int
        return cls(labels.kind, target=frame["target"].to_numpy(dtype), n_classes=len(labels.classes))

    def take(self, rows: np.ndarray) -> ProbeTargets:
        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[rows]

        return replace(self, target=pick(self.target), time=pick(self.time), event=pick(self.event))

    def strata(self) -> np.ndarray | None:
        """What inner folds stratify on, as the outer folds do: class, or event for survival."""
        if self.kind in ("binary", "multiclass"):
            assert self.target is not None  # every kind but survival has a target
            return self.target.astype(int)
        return self.event if self.kind == "survival" else None


class ProbeModel(Protocol):
    def fit(self, x: np.ndarray, y: ProbeTargets) -> ProbeModel: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def _prep() -> list:
    """Constant columns (e.g. a channel that is 0 on every slide) carry nothing and make lifelines'
    own scaling divide by zero; the rest is standardised so one penalty treats all channels alike."""
    return [VarianceThreshold(), StandardScaler()]


class RidgeProbe:
    def __init__(self, penalty: float):
        self.pipe: Pipeline = make_pipeline(*_prep(), Ridge(alpha=penalty))

    def fit(self, x: np.ndarray, y: ProbeTargets) -> RidgeProbe:
        self.pipe.fit(x, y.target)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.pipe.predict(x)


class LogisticProbe:
    """P(class 1) for binary, (N, K) probabilities for multiclass. A class missing from a training
    part gets probability 0 rather than shifting the other classes' columns."""

    def __init__(self, penalty: float, kind: str, n_classes: int):
        self.kind, self.n_classes = kind, n_classes
        self.pipe: Pipeline = make_pipeline(*_prep(), LogisticRegression(C=1.0 / penalty, max_iter=2000))

    def fit(self, x: np.ndarray, y: ProbeTargets) -> LogisticProbe:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.pipe.fit(x, y.target)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        proba = np.zeros((len(x), max(self.n_classes, 2)))
        proba[:, self.pipe.classes_.astype(int)] = self.pipe.predict_proba(x)
        return proba[:, 1] if self.kind == "binary" else proba


class CoxProbe:
    """lifelines' Cox model (the semi-parametric fitter CoxPHFitter runs by default: Efron ties)
    with a ridge penalizer; predicts the log-risk (higher = earlier event), up to a constant, as
    the CNN's survival head does.

    A lifelines fit on 2C = 256 columns takes seconds (a Newton step costs n x d^2 in Python
    loops), which a penalty search repeats dozens of times. The fit is therefore made on the
    training slides' principal coordinates W = U S (Z = U S V^T, at most n - 1 columns) with a
    per-column penalizer p n / S_j^2: since the partial likelihood depends on the coefficients only
    through Z b, the ridge solution lies in Z's row space (b = V a), and lifelines' penalty on its
    own standardised coefficients of W then equals its penalty p on the standardised coefficients
    of Z. The model is the same (coefficients agree to 1e-6), the fit several times faster."""

    def __init__(self, penalty: float):
        self.penalty = penalty
        self.prep: Pipeline = make_pipeline(*_prep())
        self.beta: np.ndarray = np.zeros(0)

    def fit(self, x: np.ndarray, y: ProbeTargets) -> CoxProbe:
        z = self.prep.fit_transform(x)
        u, s, vt = np.linalg.svd(z, full_matrices=False)
        keep = s > 1e-8 * s[0] if len(s) and s[0] > 0 else np.zeros(len(s), dtype=bool)
        if not keep.any():
            raise ValueError("no feature varies across the training slides")
        w, s, vt = u[:, keep] * s[keep], s[keep], vt[keep]
        frame = pd.DataFrame(w, columns=[f"w{i}" for i in range(w.shape[1])])
        frame["time"], frame["event"] = y.time, y.event
        fitted = _fit_cox(frame, self.penalty * len(z) / s**2)
        self.beta = vt.T @ fitted.params_.to_numpy()
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.prep.transform(x) @ self.beta


# lifelines' Newton steps start at 0.95 and can oscillate for hundreds of steps on weakly
# penalised fits of this size; a smaller first step converges in ~10 (as lifelines' convergence
# notes advise). A fit that still does not converge is an error, not a model.
_COX_STEP_SIZES = (0.5, 0.1)
_COX_MAX_STEPS = 100


def _fit_cox(frame: pd.DataFrame, penalizer: np.ndarray) -> SemiParametricPHFitter:
    """Fit (time, event ~ the other columns); lifelines' warnings are caught, only non-convergence
    counts."""
    for step_size in _COX_STEP_SIZES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitted = _CoxFitter(penalizer=penalizer).fit(
                frame, "time", "event", fit_options={"step_size": step_size, "max_steps": _COX_MAX_STEPS})
        if not any("failed to converge" in str(w.message) for w in caught):
            return fitted
    raise ConvergenceError(f"the penalised Cox fit did not converge in {_COX_MAX_STEPS} Newton steps")


class _CoxFitter(SemiParametricPHFitter):
    """The fitter CoxPHFitter runs for its default (Breslow baseline) model, minus a cost the probe
    does not need: the 'baseline' covariate values (used only to plot partial effects) come from
    one vectorised median instead of DataFrame.describe() of every column, which is most of a
    fit's time on 100+ columns. Same values for numeric covariates."""

    def _compute_central_values_of_raw_training_data(self, df, strata=None, name="baseline"):
        if strata is not None:
            return super()._compute_central_values_of_raw_training_data(df, strata, name)
        return df.median().to_frame(name).T.astype(df.dtypes)


def make_probe(kind: str, penalty: float, n_classes: int = 0) -> ProbeModel:
    model = MODEL_OF_KIND[kind]
    if model == "ridge":
        return RidgeProbe(penalty)
    if model == "logistic":
        return LogisticProbe(penalty, kind, n_classes)
    return CoxProbe(penalty)


# ---------------------------------------------------------------------------------------------
# Penalty choice by inner cross-validation


def inner_score(y: ProbeTargets, prediction: np.ndarray) -> float:
    """Higher is better: -MSE, -log loss (a proper score, stable on small parts, unlike AUC), or
    the C-index (NaN without an admissible pair, so such a part does not count)."""
    if y.kind == "regression":
        return -float(np.mean((y.target - prediction) ** 2))
    if y.kind == "survival":
        assert y.time is not None and y.event is not None  # survival targets are (time, event)
        return c_index(y.time, y.event, prediction)
    proba = np.column_stack([1 - prediction, prediction]) if y.kind == "binary" else prediction
    proba = np.clip(proba, 1e-9, 1.0)
    return -float(log_loss(y.target, proba / proba.sum(axis=1, keepdims=True), labels=np.arange(proba.shape[1])))


def inner_folds(y: ProbeTargets, groups: np.ndarray, seed: int) -> np.ndarray | None:
    """Inner fold index per training slide, grouped by patient and stratified like the outer
    folds when every stratum can fill each fold; None when there are fewer than 2 patients."""
    n_groups = len(np.unique(groups))
    n_splits = min(INNER_FOLDS[MODEL_OF_KIND[y.kind]], n_groups)
    if n_splits < 2:
        return None
    strata = y.strata()
    if strata is not None:
        counts = np.bincount(strata)
        if counts[counts > 0].min() < n_splits:
            strata = None
    return group_kfold(groups, strata, n_splits, seed)


def choose_penalty(x: np.ndarray, y: ProbeTargets, groups: np.ndarray, seed: int) -> tuple[float, dict[float, float | None]]:
    """The grid penalty with the best inner cross-validated score on (x, y) alone; a tie (to
    1e-9) goes to the stronger penalty (the simpler model). Without inner folds, or when no
    penalty could be scored, the strongest penalty: a probe should err towards saying 'no signal'."""
    grid = PENALTIES[MODEL_OF_KIND[y.kind]]
    folds = inner_folds(y, groups, seed)
    if folds is None:
        return float(grid[-1]), {}
    scores: dict[float, float | None] = {}
    for penalty in grid:
        values, weights = [], []
        for k in np.unique(folds):
            fit, val = folds != k, folds == k
            try:
                model = make_probe(y.kind, float(penalty), y.n_classes).fit(x[fit], y.take(fit))
                score = inner_score(y.take(val), model.predict(x[val]))
            except _FIT_ERRORS:
                continue
            if math.isfinite(score):
                values.append(score)
                weights.append(int(val.sum()))
        scores[float(penalty)] = float(np.average(values, weights=weights)) if values else None
    scored = [(s, p) for p, s in scores.items() if s is not None]
    if not scored:
        return float(grid[-1]), scores
    best = max(s for s, _ in scored)
    tolerance = 1e-9 * max(1.0, abs(best))
    return max(p for s, p in scored if s >= best - tolerance), scores


# ---------------------------------------------------------------------------------------------
# Cross-validated probe


@dataclass
class ProbeRun:
    """Per-fold predictions in the CNN's fold-prediction columns (slide_id, split, fold,
    prediction [, predicted_class | prob_<class>]): each fold's held-out slides ('cv') and the
    test set ('test', one row per fold model), and a record per fold."""

    model: str
    predictions: pd.DataFrame
    folds: list[dict[str, Any]] = field(default_factory=list)


def fit_probe(x: np.ndarray, y: ProbeTargets, groups: np.ndarray, seed: int) -> tuple[ProbeModel, float, dict]:
    """Choose the penalty on (x, y) by inner CV, then fit on all of (x, y)."""
    penalty, scores = choose_penalty(x, y, groups, seed)
    return make_probe(y.kind, penalty, y.n_classes).fit(x, y), penalty, scores


def cross_validate_probe(features: pd.DataFrame, labels: Labels, splits: pd.DataFrame, seed: int = 0) -> ProbeRun:
    """Fit a probe per outer fold of `splits` (slide_id, fold; TEST_FOLD = fixed test set) on the
    other folds' slides and predict the fold's slides and the test set."""
    from nic.downstream.evaluate import prediction_columns  # torch-backed module: load when used

    frame = splits[["slide_id", "fold"]].merge(labels.frame[["slide_id", "patient_id"]], on="slide_id")
    x_all = features.loc[frame["slide_id"]].to_numpy(float)
    y_all = ProbeTargets.from_labels(labels, frame["slide_id"].tolist())
    fold = frame["fold"].to_numpy()
    groups = frame["patient_id"].to_numpy()
    test = fold == TEST_FOLD
    parts, records = [], []
    for k in sorted(int(f) for f in np.unique(fold[fold != TEST_FOLD])):
        train, held = (fold != k) & ~test, fold == k
        model, penalty, scores = fit_probe(x_all[train], y_all.take(train), groups[train], seed + k)
        evaluated = held | test
        pred = model.predict(x_all[evaluated])
        parts.append(pd.DataFrame({"slide_id": frame["slide_id"].to_numpy()[evaluated],
                                   "split": np.where(test[evaluated], "test", "cv"), "fold": k,
                                   **prediction_columns(labels.kind, pred, labels.classes)}))
        records.append({"fold": k, "train_slides": int(train.sum()), "held_out_slides": int(held.sum()),
                        "penalty": penalty, "inner_scores": {f"{p:g}": s for p, s in scores.items()}})
    predictions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return ProbeRun(MODEL_OF_KIND[labels.kind], predictions, records)
