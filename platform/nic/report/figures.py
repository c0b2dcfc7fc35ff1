"""Report figures (matplotlib, Agg backend: reports are made on headless cluster nodes too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nic.artifacts import atomic_path


def _interval(entry: dict) -> tuple[float, float, float]:
    """(value, low, high) of a metrics entry; a missing CI collapses to the value."""
    value = float(entry["value"])
    low = entry.get("ci_low")
    high = entry.get("ci_high")
    return value, value if low is None else float(low), value if high is None else float(high)


def plot_comparison(results: dict[str, dict[str, dict]], metric_names: dict[str, str], out: Path,
                    probe: dict[str, dict[str, dict]] | None = None) -> Path:
    """One panel per target: each encoder's metric as a bar with its 95 % CI as an error bar, and
    (when `probe` has it) the linear probe's metric as a black diamond with its CI beside the bar,
    so a trained model below what a linear model gets from the same grids stands out.

    `results[target][encoder]` and `probe[target][encoder]` are metrics entries {value, ci_low, ci_high}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = probe or {}
    targets = list(results)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        entries = results[target]
        names = list(entries) + [n for n in probe.get(target, {}) if n not in entries]
        x = np.arange(len(names), dtype=float)
        bars = [(i, *_interval(entries[n])) for i, n in enumerate(names) if n in entries]
        if bars:
            i, v, lo, hi = (np.array(c) for c in zip(*bars, strict=True))
            colours = plt.cm.tab10(i.astype(int) % 10)
            ax.bar(x[i.astype(int)] - 0.12, v, width=0.55, color=colours, yerr=[v - lo, hi - v], capsize=4,
                   label="trained model")
        marks = [(i, *_interval(probe[target][n])) for i, n in enumerate(names) if n in probe.get(target, {})]
        if marks:
            i, v, lo, hi = (np.array(c) for c in zip(*marks, strict=True))
            ax.errorbar(x[i.astype(int)] + 0.3, v, yerr=[v - lo, hi - v], fmt="D", color="black", ms=5,
                        capsize=3, label="linear probe")
            ax.legend(fontsize=7, loc="best")
        ax.set_xticks(x, names)
        ax.set_title(target)
        ax.set_ylabel(metric_names.get(target, "metric"))
        ax.axhline(0.5 if metric_names.get(target) in ("ROC AUC", "C-index") else 0.0, color="grey", lw=0.8, ls="--")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("Downstream performance by encoder (95 % CI)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
