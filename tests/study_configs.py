"""The smallest whole-study configs that still exercise every stage: shared by the pipeline, Tune
and object-store tests, so they run the same study wherever it is stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

GROWTH = {"name": "growth", "kind": "binary", "target": "growth_pattern"}
SURVIVAL = {"name": "survival", "kind": "survival"}


def tiny_study(out: str, targets: list[dict] | None = None) -> dict[str, Any]:
    """`nic pipeline`: 8 synthetic slides, an MTL encoder of 1 epoch beside mean-RGB, 2-fold models."""
    return {
        "out": out,
        "synth": {"slides": 8, "size": 1600, "min_size": 1200, "seed": 3,
                  "patches": {"train": 160, "val": 40, "tasks": ["tissue_type", "tumour"]}},
        "encoders": [{"name": "mtl", "kind": "mtl"}, {"name": "mean-rgb", "kind": "mean-rgb"}],
        "encoder": {"epochs": 1, "embedding_dim": 16, "batch_size": 32, "num_workers": 1,
                    "max_val_samples_per_task": 40},
        "downstream": {"folds": 2, "epochs": 2, "batch_size": 4, "val_fraction": 0.0, "tta_crops": 1,
                       "bootstrap": 20, "patient_column": "patient_id"},
        "targets": targets or [GROWTH, SURVIVAL],
        "report_slides": 1,
    }


def tiny_search(tasks: str, slides: str, labels: str, out: str, space: dict) -> dict[str, Any]:
    """`nic tune`: 2 trials over task subsets of the tiny cohort, 1 encoder epoch, 2 folds."""
    return {
        "tasks": tasks, "slides": [slides], "labels": labels,
        "kind": "binary", "target": "growth_pattern", "out": out,
        "subsets": "sample", "num_trials": 2, "space": space,
        # two encoder workers take all of the 2 CPUs here: the trial itself must hold none of them
        "encoder": {"epochs": 1, "embedding_dim": 8, "batch_size": 32, "max_val_samples_per_task": 40,
                    "num_workers": 2},
        "downstream": {"folds": 2, "epochs": 1, "batch_size": 4, "val_fraction": 0.0, "tta_crops": 1,
                       "bootstrap": 0},
        "grace_folds": 1,
    }


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path
