"""Oracle ceilings of a synthetic cohort: how well a perfect reader of the slides could do.

A synthetic cohort's `truth.json` holds the hidden parameters every label was made from, so the
best any model can reach is computable: a slide-level metric is bounded by how well the *truth*
predicts the *label* (label noise, censoring). A result is only meaningful next to its ceiling, so
the study report shows both:

- proliferation (regression): Spearman of the label with the patient's true standardised log mitotic
  rate (the quantity the label is a noisy copy of), and with the slide's realised mitoses per mm2
  of tumour (what a perfect mitosis counter on this slide would measure: also bounded by how many
  figures one section happens to hold);
- growth pattern (binary): the label *is* the hidden pattern, so its ceiling is ROC AUC 1;
- survival: C-index of the true hazard's linear predictor against the observed (time, event).

Each with the same bootstrap 95 % CI as the models' metrics. Reads only truth.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nic.downstream.metrics import compute_metrics


def oracle_ceilings(truth_path: str | Path, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
    """{target name: {"metric", "truth", metric entry (value, ci_low, ci_high, n)}}; {} without truth."""
    try:
        truth = json.loads(Path(truth_path).read_text())
        slides = truth["slides"]
    except (OSError, ValueError, KeyError):
        return {}
    label = np.array([s["targets"]["proliferation"] for s in slides], float)
    rate = np.array([s["covariates"]["proliferation"] for s in slides], float)
    out: dict[str, dict] = {
        "proliferation": {
            "metric": "spearman", "truth": "true log mitotic rate (patient)",
            **compute_metrics("regression", target=label, prediction=rate, n_bootstrap=n_bootstrap,
                              seed=seed)["spearman"],
        },
    }
    realised = [(s.get("realised") or {}).get("mitoses_per_mm2_tumour") for s in slides]
    if all(v is not None for v in realised):
        out["proliferation (mitosis count)"] = {
            "metric": "spearman", "truth": "realised mitoses per mm2 of tumour on the slide",
            **compute_metrics("regression", target=label, prediction=np.asarray(realised, float),
                              n_bootstrap=n_bootstrap, seed=seed)["spearman"],
        }
    growth = np.array([s["targets"]["growth_pattern"] for s in slides], int)
    if len(np.unique(growth)) == 2:
        out["growth_pattern"] = {"metric": "roc_auc", "truth": "the hidden growth pattern (the label itself)",
                                 "value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": len(growth)}
    time = np.array([s["targets"]["time"] for s in slides], float)
    event = np.array([s["targets"]["event"] for s in slides], float)
    lp = np.array([s["targets"]["linear_predictor"] for s in slides], float)
    if event.sum() > 0:
        entry = compute_metrics("survival", time=time, event=event, prediction=lp, n_bootstrap=n_bootstrap,
                                seed=seed)["c_index"]
        out["survival"] = {"metric": "c_index", "truth": "the true hazard's linear predictor", **entry}
    return out
