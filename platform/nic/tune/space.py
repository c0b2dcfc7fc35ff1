"""The search space: which task subsets, and the hyperparameters drawn for each trial."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from nic.config.tune import Range, TuneConfig


def all_subsets(tasks: list[str], min_size: int = 1) -> list[list[str]]:
    """Every subset with at least `min_size` tasks, smallest first, in tasks.yaml order."""
    return [list(c) for k in range(min_size, len(tasks) + 1) for c in itertools.combinations(tasks, k)]


def sample_subsets(tasks: list[str], count: int, min_size: int, seed: int) -> list[list[str]]:
    """`count` distinct subsets spread evenly over the subset sizes, so that a plot of the metric
    against the number of tasks has points at every size (the paper's question)."""
    rng = np.random.default_rng(seed)
    by_size = {k: [list(c) for c in itertools.combinations(tasks, k)] for k in range(min_size, len(tasks) + 1)}
    for options in by_size.values():
        rng.shuffle(options)
    chosen: list[list[str]] = []
    while len(chosen) < count and any(by_size.values()):
        for k in sorted(by_size):
            if by_size[k] and len(chosen) < count:
                chosen.append(by_size[k].pop())
    return chosen


def _distribution(value: list | Range | None) -> Any:
    from ray import tune

    if value is None:
        return None
    if isinstance(value, Range):
        return tune.loguniform(value.low, value.high) if value.log else tune.uniform(value.low, value.high)
    return tune.choice(list(value))


def param_space(cfg: TuneConfig, task_names: list[str]) -> dict[str, Any]:
    """Ray Tune param_space: a grid over the chosen subsets, the other hyperparameters sampled."""
    from ray import tune

    if cfg.subsets == "all":
        subsets = all_subsets(task_names, cfg.min_tasks)
    else:
        subsets = sample_subsets(task_names, cfg.num_trials, cfg.min_tasks, cfg.seed)
    space: dict[str, Any] = {"tasks": tune.grid_search(subsets)}
    for key in ("encoder_lr", "embedding_dim", "downstream_lr"):
        dist = _distribution(getattr(cfg.space, key))
        if dist is not None:
            space[key] = dist
    if cfg.space.task_weight is not None:
        for name in task_names:
            space[f"weight_{name}"] = _distribution(cfg.space.task_weight)
    return space
