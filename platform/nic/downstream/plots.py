"""Evaluation plots as PNG files: ROC curves, predicted vs true, Kaplan-Meier curves of risk groups.

matplotlib's Agg backend (no display needed, safe in Ray workers); Kaplan-Meier estimates and the
log-rank test come from lifelines.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.statistics import logrank_test, multivariate_logrank_test  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402

from nic.artifacts import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_roc(y_true: np.ndarray, scores: np.ndarray, path: str | Path, classes: list[str] | None = None,
             title: str = "ROC") -> Path:
    """ROC curve(s): one for a binary score (N,), one per class (one-vs-rest) for (N, K) probabilities."""
    y_true = np.asarray(y_true).astype(int)
    scores = np.asarray(scores, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    curves = [(None, y_true, scores)] if scores.ndim == 1 else [
        (k, (y_true == k).astype(int), scores[:, k]) for k in range(scores.shape[1])
    ]
    for k, y, s in curves:
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        name = "" if k is None else f"{classes[k] if classes else k} vs rest, "
        ax.plot(fpr, tpr, lw=2, label=f"{name}AUC {auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_scatter(y_true: np.ndarray, prediction: np.ndarray, path: str | Path, title: str = "predicted vs true",
                 annotation: str = "") -> Path:
    """Predicted vs true value with the identity line."""
    y_true = np.asarray(y_true, dtype=float)
    prediction = np.asarray(prediction, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y_true, prediction, s=18, alpha=0.75, edgecolor="none")
    lo = float(min(y_true.min(), prediction.min()))
    hi = float(max(y_true.max(), prediction.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    ax.set(xlabel="true", ylabel="predicted", title=title)
    if annotation:
        ax.text(0.03, 0.97, annotation, transform=ax.transAxes, va="top", fontsize=9)
    return _save(fig, path)


def risk_groups(risk: np.ndarray, groups: int = 2) -> np.ndarray:
    """Group index per slide by predicted risk quantiles: 0 = lowest risk. groups=2 is a median
    split, 3 tertiles."""
    risk = np.asarray(risk, dtype=float)
    edges = np.quantile(risk, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(edges, risk, side="right")


def logrank_p(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """Log-rank p-value between the risk groups (multivariate test for more than two)."""
    present = np.unique(group)
    if len(present) < 2:
        return float("nan")
    if len(present) == 2:
        a, b = group == present[0], group == present[1]
        return float(logrank_test(time[a], time[b], event[a], event[b]).p_value)
    return float(multivariate_logrank_test(time, group, event).p_value)


def plot_kaplan_meier(time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: str | Path,
                      groups: int = 2, title: str = "Kaplan-Meier by predicted risk",
                      time_label: str = "time") -> tuple[Path, float]:
    """Kaplan-Meier curves of the predicted-risk groups with the log-rank p-value; returns (path, p)."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event).astype(int)
    group = risk_groups(risk, groups)
    names = {2: ["low risk", "high risk"], 3: ["low risk", "intermediate risk", "high risk"]}.get(
        groups, [f"risk group {i + 1}" for i in range(groups)])
    p = logrank_p(time, event, group)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for g in np.unique(group):
        sel = group == g
        KaplanMeierFitter().fit(time[sel], event[sel], label=f"{names[g]} (n={int(sel.sum())})").plot_survival_function(
            ax=ax, ci_show=False)
    ax.set(xlabel=time_label, ylabel="survival probability", title=title, ylim=(0, 1.02))
    ax.text(0.97, 0.97, f"log-rank p = {p:.3g}", transform=ax.transAxes, ha="right", va="top", fontsize=9)
    return _save(fig, path), p
