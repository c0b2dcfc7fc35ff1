"""Slide-level metrics with bootstrap 95 % confidence intervals.

Small cohorts make point estimates misleading, so every metric comes with a percentile bootstrap
interval over slides. The metrics themselves come from scikit-learn, SciPy and lifelines; this
module only decides which metric belongs to which target kind and gets the conventions right (the
concordance index of lifelines expects predicted *survival times*, so a risk score is negated).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from lifelines.utils import concordance_index
from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

MetricFn = Callable[..., float]


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC: binary with a (N,) score for class 1, multiclass with (N, K) probabilities (macro one-vs-rest)."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=float)
    if len(np.unique(y_true)) < 2:
        return math.nan
    if scores.ndim == 1:
        return float(roc_auc_score(y_true, scores))
    labels = np.arange(scores.shape[1])
    if len(np.unique(y_true)) < scores.shape[1]:
        return math.nan  # one-vs-rest AUC needs every class present
    return float(roc_auc_score(y_true, scores, multi_class="ovr", average="macro", labels=labels))


def accuracy(y_true: np.ndarray, predicted_class: np.ndarray) -> float:
    return float(accuracy_score(y_true, predicted_class))


def quadratic_kappa(y_true: np.ndarray, predicted_class: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights (ordinal agreement); NaN when it is undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = cohen_kappa_score(y_true, predicted_class, weights="quadratic")
    return float(value)


def spearman(y_true: np.ndarray, prediction: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(y_true, prediction).statistic)


def pearson(y_true: np.ndarray, prediction: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(pearsonr(y_true, prediction).statistic)


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index of a risk score (higher risk = earlier event); NaN without events."""
    event = np.asarray(event)
    if event.sum() == 0:
        return math.nan
    try:
        return float(concordance_index(np.asarray(time), -np.asarray(risk, dtype=float), event))
    except ZeroDivisionError:  # no admissible pairs (e.g. every event at the same time)
        return math.nan


def bootstrap_ci(
    fn: Callable[..., float],
    arrays: tuple[np.ndarray, ...],
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of fn(*arrays) resampling rows (slides) with replacement.

    Resamples on which the metric is undefined (NaN, e.g. one class only) are dropped; with fewer
    than 10 % valid resamples the interval is (nan, nan) rather than a misleading number.
    """
    n = len(arrays[0])
    if n_bootstrap <= 0 or n < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, size=n)
        value = fn(*(a[idx] for a in arrays))
        if value is not None and np.isfinite(value):
            values.append(value)
    if len(values) < max(1, n_bootstrap // 10):
        return (math.nan, math.nan)
    alpha = (1.0 - level) / 2.0
    return (float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha)))


def _entry(fn: Callable[..., float], arrays: tuple[np.ndarray, ...], n_bootstrap: int, seed: int) -> dict:
    value = fn(*arrays)
    lo, hi = bootstrap_ci(fn, arrays, n_bootstrap=n_bootstrap, seed=seed)
    return {"value": _clean(value), "ci_low": _clean(lo), "ci_high": _clean(hi), "n": int(len(arrays[0]))}


def _clean(x: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return None if x is None or not np.isfinite(x) else float(x)


def compute_metrics(
    kind: str,
    *,
    target: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    time: np.ndarray | None = None,
    event: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of a target kind, each as {value, ci_low, ci_high, n}.

    prediction is: binary -> P(class 1) (N,); multiclass -> class probabilities (N, K);
    regression -> predicted value (N,); survival -> predicted log-risk (N,).
    """
    prediction = np.asarray(prediction, dtype=float)
    if kind == "binary":
        y = np.asarray(target).astype(int)
        cls = (prediction >= 0.5).astype(int)
        return {
            "roc_auc": _entry(roc_auc, (y, prediction), n_bootstrap, seed),
            "accuracy": _entry(accuracy, (y, cls), n_bootstrap, seed),
            "kappa_quadratic": _entry(quadratic_kappa, (y, cls), n_bootstrap, seed),
        }
    if kind == "multiclass":
        y = np.asarray(target).astype(int)
        cls = prediction.argmax(axis=1)
        return {
            "roc_auc": _entry(roc_auc, (y, prediction), n_bootstrap, seed),
            "accuracy": _entry(accuracy, (y, cls), n_bootstrap, seed),
            "kappa_quadratic": _entry(quadratic_kappa, (y, cls), n_bootstrap, seed),
        }
    if kind == "regression":
        y = np.asarray(target, dtype=float)
        return {
            "spearman": _entry(spearman, (y, prediction), n_bootstrap, seed),
            "pearson": _entry(pearson, (y, prediction), n_bootstrap, seed),
            "mse": _entry(lambda a, b: float(np.mean((a - b) ** 2)), (y, prediction), n_bootstrap, seed),
        }
    if kind == "survival":
        t = np.asarray(time, dtype=float)
        e = np.asarray(event).astype(int)
        return {"c_index": _entry(c_index, (t, e, prediction), n_bootstrap, seed)}
    raise ValueError(f"unknown target kind {kind!r}")


PRIMARY_METRIC = {"binary": "roc_auc", "multiclass": "kappa_quadratic", "regression": "spearman", "survival": "c_index"}
