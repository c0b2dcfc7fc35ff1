"""`nic tune`: subsets, a real (tiny) Ray Tune search with ASHA, its outputs, and resume."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import yaml

from nic.cli.main import main
from nic.tune.space import all_subsets, sample_subsets
from study_configs import tiny_search, write_config


def test_all_subsets_and_an_even_sample():
    tasks = ["a", "b", "c", "d"]
    subsets = all_subsets(tasks)
    assert len(subsets) == 15 and subsets[0] == ["a"] and subsets[-1] == tasks
    assert len(all_subsets(tasks, min_size=3)) == 5
    sample = sample_subsets(tasks, 6, 1, seed=0)
    assert len(sample) == 6 and len({tuple(s) for s in sample}) == 6
    sizes = sorted(len(s) for s in sample)
    assert set(sizes) == {1, 2, 3, 4}  # every subset size is represented
    assert sample == sample_subsets(tasks, 6, 1, seed=0)  # deterministic
    assert len(sample_subsets(tasks, 99, 1, seed=0)) == 15  # never more than exist


def test_sample_is_spread_over_sizes_first():
    for count in range(1, 5):  # one subset per size, smallest first
        assert [len(s) for s in sample_subsets(list("abcd"), count, 1, seed=1)] == list(range(1, count + 1))
    sizes = [len(s) for s in sample_subsets(list("abcd"), 8, 1, seed=1)]
    assert sizes == [1, 2, 3, 4, 1, 2, 3, 1]  # round robin over sizes; size 4 has only one subset


@pytest.mark.integration
@pytest.mark.usefixtures("ray_session")
def test_tiny_search_writes_table_plot_and_resumes(tiny_cohort, tmp_path, capfd):
    out = tmp_path / "tune"
    # slides relative, as users write them: trials run in other working directories
    config = tiny_search(str(tiny_cohort / "tasks.yaml"), os.path.relpath(tiny_cohort / "slides"),
                         str(tiny_cohort / "labels.csv"), str(out),
                         space={"encoder_lr": {"low": 1e-3, "high": 3e-3}, "downstream_lr": [1e-3]})
    path = write_config(config, tmp_path / "tune.yaml")
    assert main(["tune", "--config", str(path)]) == 0
    progress = capfd.readouterr().err
    # a line per trial start, per fold report and per end, on the driver's stderr
    assert progress.count("started: tasks") == 2, progress[-3000:]
    assert "after 1 fold(s)" in progress and "2/2 trials done" in progress, progress[-3000:]

    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 2  # one subset of each size
    assert sorted(table["n_tasks"]) == [1, 2]
    assert "tissue_type,tumour" in set(table["tasks"])
    assert (table["status"] == "TERMINATED").all(), table[["tasks", "error"]]
    assert table["complete"].any()
    assert {"task_tissue_type", "task_tumour", "metric", "params"} <= set(table.columns)
    assert (out / "trials.csv").exists() and (out / "tasks_vs_metric.png").exists()
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["tasks_subset"] and "encoder_lr" in best
    # each complete trial trained an MTL encoder on exactly its subset
    done = table[table["complete"]].iloc[0]
    enc = yaml.safe_load((out / "trials" / done["trial_id"] / "encoder" / "encoder.json").read_text())
    assert sorted(t["name"] for t in enc["tasks"]) == sorted(done["tasks"].split(","))

    # running the same command again restores the finished search instead of starting afresh
    assert main(["tune", "--config", str(path)]) == 0
    again = pd.read_parquet(out / "trials.parquet")
    assert sorted(again["trial_id"]) == sorted(table["trial_id"])


def test_tasks_metric_correlation_over_complete_or_all_trials():
    from nic.tune.results import tasks_metric_correlation

    frame = pd.DataFrame({
        "n_tasks": [1, 2, 3, 4, 1, 4],
        "metric": [0.6, 0.7, 0.8, 0.9, 0.5, float("nan")],
        "complete": [True, True, False, False, False, False],
    })
    rho, _, n = tasks_metric_correlation(frame)
    assert n == 2 and np.isnan(rho)  # two complete trials cannot rank anything
    rho_all, _, n_all = tasks_metric_correlation(frame, complete_only=False)
    assert n_all == 5  # the trial that never reported is left out
    assert rho_all > 0.8
