"""The search's outputs: a trial table, and the downstream metric against the number of MTL tasks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from nic.artifacts import atomic_path, write_bytes_atomic, write_parquet_atomic
from nic.tune.trial import METRIC


def trial_table(grid: Any, task_names: list[str]) -> pd.DataFrame:
    """One row per trial: its tasks, sampled hyperparameters, last reported metric and status."""
    rows = []
    for result in grid:
        config = dict(result.config or {})
        tasks = list(config.pop("tasks", []))
        metrics = result.metrics or {}
        value = metrics.get(METRIC)
        row = {
            "trial_id": metrics.get("trial_id") or (Path(result.path).name if result.path else ""),
            "status": "ERROR" if result.error else "TERMINATED",
            "error": str(result.error)[:500] if result.error else "",
            "tasks": ",".join(tasks),
            "n_tasks": len(tasks),
            METRIC: float(value) if value is not None else float("nan"),
            "folds_done": int(metrics.get("folds_done") or 0),
            "complete": bool(metrics.get("complete", False)),
            "reports": int(metrics.get("training_iteration") or 0),
            "params": {k: v for k, v in config.items()},
        }
        for name in task_names:
            row[f"task_{name}"] = name in tasks
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["stopped_early"] = ~frame["complete"] & (frame["status"] != "ERROR")
    return frame


def tasks_metric_correlation(frame: pd.DataFrame, complete_only: bool = True) -> tuple[float, float, int]:
    """Spearman's rho (and p) between the number of tasks and the metric, over complete trials, or
    over every trial that reported (one stopped by ASHA counts at the mean of its finished folds:
    noisier, but with ASHA on it is often most of the search)."""
    from scipy.stats import spearmanr

    reported = np.isfinite(frame[METRIC])
    done = frame[(frame["complete"] & reported) if complete_only else reported]
    if len(done) < 3 or done["n_tasks"].nunique() < 2:
        return float("nan"), float("nan"), len(done)
    rho, p = spearmanr(done["n_tasks"], done[METRIC])
    return float(rho), float(p), len(done)


def plot_tasks_vs_metric(frame: pd.DataFrame, metric_label: str, out: Path,
                         correlations: tuple[tuple[float, float, int], tuple[float, float, int]] | None = None) -> Path:
    """`correlations`: (complete trials, every reported trial), as tasks_metric_correlation gives them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (rho, p, n), (rho_all, p_all, n_all) = correlations or (
        tasks_metric_correlation(frame), tasks_metric_correlation(frame, complete_only=False))
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    done = frame[frame["complete"] & np.isfinite(frame[METRIC])]
    stopped = frame[frame["stopped_early"] & np.isfinite(frame[METRIC])] if "stopped_early" in frame else frame.iloc[:0]
    rng = np.random.default_rng(0)
    if len(stopped):
        ax.scatter(stopped["n_tasks"] + rng.uniform(-0.08, 0.08, len(stopped)), stopped[METRIC],
                   marker="x", color="grey", label="stopped early by ASHA (partial folds)")
    if len(done):
        ax.scatter(done["n_tasks"] + rng.uniform(-0.08, 0.08, len(done)), done[METRIC], color="tab:blue",
                   label="complete trials")
        means = done.groupby("n_tasks")[METRIC].mean()
        ax.plot(means.index, means.values, color="tab:blue", lw=1.5, alpha=0.7, label="mean per subset size")
    ax.set_xlabel("number of MTL tasks the encoder learned")
    ax.set_ylabel(metric_label)
    title = "downstream metric vs number of tasks"
    if math.isfinite(rho):
        title += f"\nSpearman rho = {rho:.2f} (p = {p:.2g}), {n} complete trials"
    elif math.isfinite(rho_all):
        title += f"\nSpearman rho = {rho_all:.2f} (p = {p_all:.2g}), {n_all} trials incl. stopped"
    ax.set_title(title, fontsize=10)
    ticks = sorted(frame["n_tasks"].unique()) if len(frame) else []
    ax.set_xticks(ticks)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def write_results(frame: pd.DataFrame, out: Path, cfg: Any, mode: str) -> dict[str, Path]:
    table = frame.copy()
    table["params"] = table["params"].map(lambda d: ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                             for k, v in sorted(d.items())))
    table = table.sort_values(METRIC, ascending=(mode == "min"), na_position="last")
    parquet, csv = out / "trials.parquet", out / "trials.csv"
    write_parquet_atomic(parquet, pa.Table.from_pandas(table, preserve_index=False))
    write_bytes_atomic(csv, table.to_csv(index=False).encode())
    label = {"regression": "Spearman", "binary": "ROC AUC", "multiclass": "ROC AUC", "survival": "C-index"}[cfg.kind]
    (rho, p, n), (rho_all, p_all, n_all) = correlations = (
        tasks_metric_correlation(frame), tasks_metric_correlation(frame, complete_only=False))
    judge = "linear probe" if getattr(cfg, "trial_metric", "cnn") == "probe" else "downstream model"
    plot = plot_tasks_vs_metric(frame, f"{judge}: {label} ({cfg.target or 'survival'})", out / "tasks_vs_metric.png",
                                correlations)
    summary = {"trial_metric": f"{judge}, out-of-fold {label}",
               "spearman_tasks_vs_metric": rho, "p_value": p, "complete_trials": n, "trials": len(frame),
               "spearman_all_trials": rho_all, "p_value_all_trials": p_all, "reported_trials": n_all}
    write_bytes_atomic(out / "summary.yaml", yaml.safe_dump(summary).encode())
    return {"parquet": parquet, "csv": csv, "plot": plot}
