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
    log = (out / "tune.log").read_text()  # the driver's lines are kept with the search's outputs
    assert log.count("started: tasks") == 2 and "2/2 trials done" in log and "--- resolved config ---" in log

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


def test_labelled_slides_outside_the_search_are_refused_before_any_trial(tmp_path, capfd):
    """A search over a subset of a labelled cohort (a glob of 2 of 3 slides) would have every trial
    train an encoder and then stop at the downstream stage; it is refused up front, naming the
    labels file, the slide and the setting, and runs once `missing_grids: drop` is set."""
    from nic.config.base import ConfigError, load_config
    from nic.config.tune import TuneConfig
    from nic.tune.stage import check_labels_cover_slides

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("S0000", "S0001", "S0100"):
        (slides / f"{name}.tiff").write_bytes(b"not read here")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["S0000", "S0001", "S0100"], "patient_id": ["a", "b", "c"],
                  "score": [0.1, 0.2, 0.3]}).to_csv(labels, index=False)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks: []\n")
    values = {"tasks": str(tasks), "slides": [str(slides / "S000?.tiff")], "labels": str(labels),
              "kind": "regression", "target": "score", "out": str(tmp_path / "tune"), "subsets": "all",
              "trial_metric": "probe", "asha": False, "downstream": {"train_model": False}}
    with pytest.raises(ConfigError, match=r"labels.csv: 1 labelled slide\(s\).*S0100.*missing_grids: drop"):
        check_labels_cover_slides(load_config(TuneConfig, values=values))
    check_labels_cover_slides(load_config(TuneConfig, values={**values, "downstream": {
        "train_model": False, "missing_grids": "drop"}}))
    check_labels_cover_slides(load_config(TuneConfig, values={**values, "slides": [str(slides)]}))
