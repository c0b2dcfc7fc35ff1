"""Ray Train: a fold trains with 2 DDP workers, checkpoints each epoch, resumes where it stopped
and evaluates its best model; `nic train-downstream` runs a survival cohort end to end, skips
finished folds on a re-run and refuses to mix settings in one output folder."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from downstream_helpers import assert_same_weights, make_cohort
from nic.cli.main import main as nic_main
from nic.config.base import load_config
from nic.config.downstream import TrainDownstreamConfig
from nic.train.downstream_loop import FoldSpec, fit_fold, read_fold_result
from nic.train.downstream_stage import run_train_downstream

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return make_cohort(root, n=24, channels=8, size=(8, 12), seed=1)


def test_fold_trains_with_ddp_stops_early_resumes_and_evaluates(ray_session, cohort, tmp_path):
    grids, labels_csv = cohort
    labels = pd.read_csv(labels_csv)
    ids = labels["slide_id"].tolist()
    # lr 0 on a model without BatchNorm: the validation loss never improves after epoch 1, so
    # patience 1 must stop the fold after epoch 2 of 5.
    spec = FoldSpec(
        fold=0, grids=str(grids), kind="binary", model="attention-mil", in_channels=8, outputs=1, crop_size=12,
        train_ids=ids[:16], train_targets={"target": labels["label"].tolist()[:16]},
        val_ids=ids[16:20], val_targets={"target": labels["label"].tolist()[16:20]},
        epochs=5, patience=1, lr=0.0, batch_size=4, eval_ids=ids[20:], eval_splits=["cv"] * 4, tta_crops=1,
        classes=["0", "1"],
    )
    storage = tmp_path / "ray"
    first = fit_fold(spec, storage, "resume-test", num_workers=2)  # DDP: 2 workers, 1 CPU each
    done = read_fold_result(first.checkpoint)
    history = done["state"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["stopped"] for h in history] == [False, True] and history[-1]["best_epoch"] == 1
    assert history[0]["val_loss"] == history[1]["val_loss"]  # ranks agreed on one gathered validation
    assert done["predictions"]["slide_id"].tolist() == ids[20:]
    assert ((done["predictions"]["prediction"] > 0) & (done["predictions"]["prediction"] < 1)).all()

    # Same storage and run name, more patience: Ray Train V2 restores the latest checkpoint and the
    # loop continues at epoch 3 (not 1), here with one worker, then evaluates again.
    spec.patience, spec.epochs = 5, 4
    second = fit_fold(spec, storage, "resume-test", num_workers=1)
    resumed = read_fold_result(second.checkpoint)["state"]["history"]
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4]
    # The first two epochs were not re-run: their records (losses, timings) are the saved ones.
    assert [(h["train_loss"], h["seconds"]) for h in resumed[:2]] == [(h["train_loss"], h["seconds"]) for h in history]
    assert second.metrics["evaluated"] is True


def _config(grids, labels_csv, out, **extra):
    values = dict(grids=str(grids), labels=str(labels_csv), out=str(out), kind="survival", model="attention-mil",
                  pool="mean", folds=2, test_fraction=0.25, epochs=3, batch_size=8, tta_crops=1, bootstrap=50, seed=0)
    values.update(extra)
    return load_config(TrainDownstreamConfig, values=values)


def test_survival_end_to_end_rerun_and_settings_guard(ray_session, cohort, tmp_path, capsys):
    grids, labels_csv = cohort
    out = tmp_path / "model"
    config = _config(grids, labels_csv, out)
    assert run_train_downstream(config) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "survival" and metrics["primary_metric"] == "c_index"
    cv = metrics["cv"]["metrics"]["c_index"]
    assert 0 <= cv["value"] <= 1 and cv["ci_low"] <= cv["value"] <= cv["ci_high"]
    assert metrics["test"]["slides"] > 0 and "logrank_p" in metrics["cv"]["plots"]
    assert [f["status"] for f in metrics["folds"]] == ["ok", "ok"]

    pred = pd.read_parquet(out / "predictions.parquet")
    splits = pd.read_parquet(out / "splits.parquet")
    assert set(pred.columns) >= {"slide_id", "patient_id", "split", "fold", "prediction", "time", "event"}
    cv_rows, test_rows = pred[pred["split"] == "cv"], pred[pred["split"] == "test"]
    assert sorted(cv_rows["slide_id"]) == sorted(splits.loc[splits["fold"] >= 0, "slide_id"])  # each once
    assert sorted(test_rows["slide_id"]) == sorted(splits.loc[splits["fold"] == -1, "slide_id"])
    assert (cv_rows.merge(splits, on="slide_id")["fold_x"] == cv_rows.merge(splits, on="slide_id")["fold_y"]).all()
    assert (pred.groupby("patient_id")["fold"].nunique() == 1).all()  # no patient in two folds
    assert np.isfinite(pred["prediction"]).all() and pred["prediction"].std() > 0
    # The linear probe (on by default): the CNN's metric keys and layout, its predictions beside the CNN's.
    probe = metrics["probe"]
    assert probe["model"] == "cox" and "error" not in probe, probe.get("error")
    assert set(probe["cv"]["metrics"]) == set(metrics["cv"]["metrics"])
    assert probe["cv"]["slides"] == metrics["cv"]["slides"] and probe["test"]["slides"] == metrics["test"]["slides"]
    probe_pred = pd.read_parquet(out / "probe_predictions.parquet")
    assert set(probe_pred.columns) == set(pred.columns) and len(probe_pred) == len(pred)
    for png in ("cv_kaplan_meier.png", "test_kaplan_meier.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG"
    for k in (0, 1):
        assert (out / "folds" / f"fold_{k}" / "model.pt").exists()
    from nic.downstream.models import load_model

    model, meta = load_model(out / "folds" / "fold_0" / "model.pt")
    assert meta["kind"] == "survival" and meta["crop_size"] == 12
    assert meta["pool"] == "mean" == model.pool  # the config's pooling reached the fold's model

    # A re-run with the same settings skips both folds (no training), and rewrites the same metrics.
    stamp = (out / "folds" / "fold_0" / "fold.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run_train_downstream(config) == 0
    err = capsys.readouterr().err
    assert "2 fold(s) already complete" in err and "linear probe (cox" in err
    assert (out / "folds" / "fold_0" / "fold.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "metrics.json").read_text())
    assert again["cv"]["metrics"] == metrics["cv"]["metrics"]
    assert again["probe"]["cv"] == metrics["probe"]["cv"]  # the probe is written on a re-run too

    # Different settings in the same folder: refused with a clear message (exit 2), nothing trained.
    assert run_train_downstream(_config(grids, labels_csv, out, epochs=4)) == 2
    assert "holds a run made with different settings" in capsys.readouterr().err


def _fold_runners_started() -> int:
    """FoldRunner actors this Ray instance has ever started (alive or not)."""
    import ray._private.state as ray_state

    return sum(a["ActorClassName"] == "FoldRunner" for a in ray_state.actors().values())


def _untimed(record: dict) -> dict:
    return {k: ([_untimed(h) for h in v] if k == "history" else v) for k, v in record.items()
            if k not in ("seconds", "eval_seconds")}


def test_shared_workers_match_a_trainer_per_fold_and_resume(ray_session, cohort, tmp_path, capsys):
    """Single-worker folds on one long-lived FoldRunner (the default) learn and predict exactly what
    a Ray Train run per fold does for the same seed, write the same per-fold outputs, and a re-run
    skips finished folds and takes the others' results from their checkpoints without training."""
    grids, labels_csv = cohort
    settings = dict(folds=2, epochs=2, crops_per_slide=2, probe=False, bootstrap=20, max_parallel_folds=1)
    outs, seconds = {}, {}
    for shared in (False, True):
        outs[shared] = tmp_path / ("shared" if shared else "trainers")
        before = _fold_runners_started()
        started = time.monotonic()
        assert run_train_downstream(_config(grids, labels_csv, outs[shared], shared_workers=shared, **settings)) == 0
        seconds[shared] = time.monotonic() - started
        # One runner for both folds (one fold at a time), none for Ray Train runs.
        assert _fold_runners_started() - before == (1 if shared else 0)
    trainers, shared = outs[False], outs[True]

    pd.testing.assert_frame_equal(pd.read_parquet(shared / "predictions.parquet"),
                                  pd.read_parquet(trainers / "predictions.parquet"))
    metrics = {k: json.loads((out / "metrics.json").read_text()) for k, out in outs.items()}
    assert metrics[True]["cv"] == metrics[False]["cv"] and metrics[True]["test"] == metrics[False]["test"]
    for k in range(2):
        a, b = trainers / "folds" / f"fold_{k}", shared / "folds" / f"fold_{k}"
        assert sorted(p.name for p in b.iterdir()) == ["fold.json", "model.pt", "predictions.parquet"]
        assert _untimed(json.loads(b.joinpath("fold.json").read_text())) == \
            _untimed(json.loads(a.joinpath("fold.json").read_text()))
        pd.testing.assert_frame_equal(pd.read_parquet(b / "predictions.parquet"), pd.read_parquet(a / "predictions.parquet"))
        assert_same_weights(a.joinpath("model.pt").read_bytes(), b.joinpath("model.pt").read_bytes())
        # Checkpoints beside where Ray Train keeps a fold's run; no Train run was made.
        assert (shared / "ray" / f"shared-fold{k}" / "nic_checkpoint" / "state.pt").exists()
        assert not list((shared / "ray" / f"shared-fold{k}").glob("checkpoint_*"))
    records = {mode: [json.loads((out / "folds" / f"fold_{k}" / "fold.json").read_text()) for k in range(2)]
               for mode, out in outs.items()}
    overhead = {mode: [r["seconds"] - sum(h["seconds"] for h in r["history"]) for r in records[mode]] for mode in outs}
    with capsys.disabled():
        print(f"\n2 folds one at a time: a Train run per fold {seconds[False]:.1f} s, shared runner "
              f"{seconds[True]:.1f} s; per fold beyond its epochs (start-up, evaluation, checkpoints): "
              f"{[round(v, 1) for v in overhead[False]]} s vs {[round(v, 1) for v in overhead[True]]} s")

    # Re-run after losing fold 1's outputs: fold 0 is skipped untouched, fold 1 is read back from its
    # evaluated checkpoint (no epoch trained), its outputs as before.
    kept = {p.name: p.read_bytes() for p in (shared / "folds" / "fold_1").iterdir()}
    stamp = (shared / "folds" / "fold_0" / "fold.json").stat().st_mtime_ns
    shutil.rmtree(shared / "folds" / "fold_1")
    capsys.readouterr()
    assert run_train_downstream(_config(grids, labels_csv, shared, shared_workers=True, **settings)) == 0
    err = capsys.readouterr().err
    assert "1 fold(s) already complete, skipping: [0]" in err
    assert "fold 1: resuming after epoch 2" in err and "] epoch 1/2" not in err
    assert (shared / "folds" / "fold_0" / "fold.json").stat().st_mtime_ns == stamp
    assert kept["predictions.parquet"] == (shared / "folds" / "fold_1" / "predictions.parquet").read_bytes()
    assert kept["model.pt"] == (shared / "folds" / "fold_1" / "model.pt").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(shared / "predictions.parquet"),
                                  pd.read_parquet(trainers / "predictions.parquet"))


def test_cli_reports_label_problems_before_training(cohort, tmp_path, capsys):
    grids, labels_csv = cohort
    bad = pd.read_csv(labels_csv)
    bad.loc[3, "time"] = -1.0
    bad.loc[5, "event"] = 2
    bad_csv = tmp_path / "bad.csv"
    bad.to_csv(bad_csv, index=False)
    code = nic_main(["train-downstream", "--grids", str(grids), "--labels", str(bad_csv), "--kind", "survival",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "negative or zero 'time'" in err and "row 4 (slide_id 's003')" in err
    assert "'event' must be 0 (censored) or 1 (event): row 6 (slide_id 's005')" in err
    assert not (tmp_path / "out" / "metrics.json").exists()
    # A kind that needs a target column without one: a config error naming the key.
    code = nic_main(["train-downstream", "--grids", str(grids), "--labels", str(labels_csv), "--kind", "binary",
                     "--out", str(tmp_path / "out")])
    assert code == 2 and "needs 'target'" in capsys.readouterr().err
