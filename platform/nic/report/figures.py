"""Report figures (matplotlib, Agg backend: reports are made on headless cluster nodes too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nic.artifacts import atomic_path


def plot_comparison(results: dict[str, dict[str, dict]], metric_names: dict[str, str], out: Path) -> Path:
    """One panel per target: each encoder's metric as a bar with its 95 % CI as an error bar.

    `results[target][encoder]` is a metrics entry {value, ci_low, ci_high}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(results)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        entries = results[target]
        names = list(entries)
        values = np.array([entries[n]["value"] for n in names], dtype=float)
        low = np.array([entries[n].get("ci_low", v) if entries[n].get("ci_low") is not None else v
                        for n, v in zip(names, values, strict=True)], dtype=float)
        high = np.array([entries[n].get("ci_high", v) if entries[n].get("ci_high") is not None else v
                         for n, v in zip(names, values, strict=True)], dtype=float)
        colours = plt.cm.tab10(np.arange(len(names)) % 10)
        ax.bar(names, values, color=colours, yerr=[values - low, high - values], capsize=4)
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
