"""`nic train-downstream`: cross-validated slide-level models on feature grids, on Ray Train.

Flow: validate the labels against the grid store -> grouped, stratified folds (plus an optional
fixed test set) -> each fold trained (folds run side by side when the cluster holds more than one
fold's workers) -> each fold's best model predicts its held-out slides (and the test set) with
test-time averaging -> pooled out-of-fold metrics with bootstrap CIs, plots, and
predictions.parquet.

A fold with one worker (the default) trains on a FoldRunner, a Ray actor of a WorkerPool that
trains fold after fold, so the ~10 s start-up of a Ray Train run is paid once per runner, not per
fold (`shared_workers`); DDP folds (num_workers > 1), or all with shared_workers false, are one
TorchTrainer run each. Both run the same loop (nic.train.downstream_loop) and give the same
results for the same seed.

Folds are launched from driver threads (TorchTrainer.fit() only waits on its controller actor, and
a shared fold only on its runner, so a thread per fold costs neither a process nor a CPU; Ray Tune
launches trainers the same way from its trials), at most as many at a time as the cluster has
resources for, because a trainer waits for its workers' resources and launching more would only
queue them. On a 2-CPU machine with 1 worker
per fold that is 2 folds at once. A fold's rank-0 worker evaluates the best model when training ends (inside the fold's own
resource reservation, with torch already loaded) and reports predictions and weights as the final
checkpoint; the driver writes out/folds/fold_<k>/ (model.pt, predictions.parquet, then fold.json).
A re-run skips complete folds and resumes the others from their checkpoints (Ray Train's, or a
runner's CheckpointStore; a fold that finished training but not its evaluation only evaluates).

Pooled out-of-fold metrics are the headline (every slide predicted by a model that never saw its
patient); per-fold values of the primary metric are in each fold's record too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from nic.artifacts import (
    STATUS_FAILED,
    STATUS_OK,
    read_json,
    stable_hash,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from nic.config.base import dump_config
from nic.config.downstream import TrainDownstreamConfig
from nic.config.identity import config_identity
from nic.downstream.labels import LabelError, Labels, load_labels
from nic.downstream.metrics import PRIMARY_METRIC, compute_metrics
from nic.downstream.models import strided_layers_for
from nic.downstream.record import SPLITS, ProbeEntry, RunMarker, RunParts, RunRecord, Split, SplitEntry
from nic.downstream.splits import TEST_FOLD, SplitError, make_splits, train_val_split
from nic.grids.reader import list_slides, verify_store
from nic.grids.schema import GridError
from nic.logs import stage_logger
from nic.stage_io import stage_storage
from nic.storage import child_names, display, ray_storage, remove
from nic.train.common import ProgressRelay, Stopwatch
from nic.train.downstream_loop import FoldSpec

STAGE = "train-downstream"
MAX_AUTO_CROP = 400
PROBE_PREDICTIONS = "probe_predictions.parquet"


log = stage_logger(STAGE)


def _grid_info(grids: Path, slide_ids: list[str]) -> dict:
    """C, encoder and the largest grid side of the slides used; a mix of encoders is an error."""
    dims: dict[int, list[str]] = {}
    encoders: dict[str, list[str]] = {}
    side = 1
    for s, meta in verify_store(grids, slide_ids).items():  # complete files that agree with the manifest
        dims.setdefault(meta.embedding_dim, []).append(s)
        encoders.setdefault(meta.encoder_hash, []).append(s)
        side = max(side, meta.rows, meta.cols)
    if len(dims) > 1 or len(encoders) > 1:
        detail = "; ".join(f"C={d}: {v[:3]}" for d, v in dims.items()) if len(dims) > 1 else \
            "; ".join(f"encoder {h[:12]}: {v[:3]}" for h, v in encoders.items())
        raise GridError(f"{grids}: the grids come from different encoders ({detail}); compress all slides "
                        "with one encoder")
    return {"in_channels": next(iter(dims)), "encoder_hash": next(iter(encoders)), "max_side": side}


def _run_hash(config: TrainDownstreamConfig, encoder_hash: str, labels: Labels) -> str:
    """Identity of what the folds learn: the config's identity fields (TrainDownstreamConfig),
    the encoder, and the labels themselves (in place of the labels file's path)."""
    data = config_identity(config)
    data["encoder_hash"] = encoder_hash
    data["labels"] = labels.frame.drop(columns=["row"]).sort_values("slide_id").to_dict(orient="list")
    return stable_hash(data)


def _run_parts(config: TrainDownstreamConfig, encoder_hash: str, labels: Labels) -> RunParts:
    """What the run hash covers, each part hashed on its own, so a refusal can say what changed."""
    frame = labels.frame.drop(columns=["row"]).sort_values("slide_id").to_dict(orient="list")
    return {"settings": stable_hash(config_identity(config)), "encoder_hash": encoder_hash,
            "labels": stable_hash(frame), "labels_file": display(config.labels)}


def _targets_of(labels: Labels, ids: pd.Series) -> dict[str, list]:
    frame = labels.frame.set_index("slide_id").loc[ids]
    if labels.kind == "survival":
        return {"time": frame["time"].astype(float).tolist(), "event": frame["event"].astype(int).tolist()}
    return {"target": frame["target"].tolist()}


def build_fold_specs(config: TrainDownstreamConfig, labels: Labels, splits: pd.DataFrame, info: dict,
                     crop_size: int) -> list[FoldSpec]:
    """The spec of every fold: train = the other CV folds minus a grouped, stratified validation
    part; evaluated = the held-out fold and the fixed test set. A survival validation part without
    events cannot rank anything, so such a fold monitors its training loss instead."""
    frame = labels.frame.merge(splits[["slide_id", "fold"]], on="slide_id")
    strata_col = {"binary": "target", "multiclass": "target", "survival": "event"}.get(labels.kind)
    out = []
    for k in range(config.folds):
        train = frame[(frame["fold"] != k) & (frame["fold"] != TEST_FOLD)]
        held = frame[frame["fold"] == k]["slide_id"].tolist()
        test = frame[frame["fold"] == TEST_FOLD]["slide_id"].tolist()
        strata = None if strata_col is None else train[strata_col].to_numpy().astype(int)
        val_mask = train_val_split(train["patient_id"].to_numpy(), strata, config.val_fraction, config.seed + k)
        fit, val = train[~val_mask], train[val_mask]
        if labels.kind == "survival" and len(val) and val["event"].sum() == 0:
            fit, val = train, train.iloc[:0]
        mean, std = 0.0, 1.0
        if labels.kind == "regression":
            mean = float(fit["target"].mean())
            std = float(fit["target"].std(ddof=0)) or 1.0
        spec = FoldSpec(
            fold=k, grids=str(Path(config.grids).resolve()), kind=labels.kind, model=config.model,
            in_channels=info["in_channels"], outputs=labels.num_outputs, crop_size=crop_size,
            train_ids=fit["slide_id"].tolist(), train_targets=_targets_of(labels, fit["slide_id"]),
            val_ids=val["slide_id"].tolist(), val_targets=_targets_of(labels, val["slide_id"]),
            pool=config.pool, crops_per_slide=config.crops_per_slide,
            strided=(config.strided_layers if config.strided_layers is not None
                     else strided_layers_for(crop_size)) if config.model == "nic-cnn" else None,
            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, min_lr=config.min_lr,
            lr_patience=config.lr_patience, patience=config.patience, l2=config.l2, dropout=config.dropout,
            dihedral=config.dihedral, balanced=config.balanced, ties=config.ties, target_mean=mean,
            target_std=std, seed=config.seed + 101 * k, cache_grids=config.cache_grids,
            loader_workers=config.loader_workers, eval_ids=held + test,
            eval_splits=["cv"] * len(held) + ["test"] * len(test), tta_crops=config.tta_crops,
            classes=labels.classes,
        )
        out.append(spec)
    return out


def run_fold(spec_dict: dict, run: dict, pool: Any = None) -> dict:
    """Train or resume one fold (a TorchTrainer run, or on a FoldRunner of `pool` when given); its
    (rank-0) worker evaluates the best model at the end. Returns the fold's record, predictions and
    model bytes (the driver writes them); errors are recorded in the record, not raised, so the
    other folds finish."""
    spec = FoldSpec(**spec_dict)
    started = time.monotonic()
    record: dict[str, Any] = {"fold": spec.fold, "run_hash": run["run_hash"], "train_slides": len(spec.train_ids),
                              "val_slides": len(spec.val_ids), "held_out_slides": spec.eval_splits.count("cv")}
    predictions, model = None, None
    try:
        fold = _fit_shared(spec, run, pool) if pool is not None else _fit_trainer(spec, run)
        state, predictions, model = fold["state"], fold["predictions"], fold["model"]
        stopping = state["early_stopping"]
        record.update(status=STATUS_OK, best_epoch=stopping["best_epoch"], epochs_run=state["epoch"],
                      best_loss=stopping["best"], stopped_early=state["epoch"] < spec.epochs,
                      history=state["history"], reason="")
    except Exception as exc:  # a failed fold is recorded; the other folds still finish
        from nic.train.trainer import resource_failure

        lack = resource_failure(exc, f"fold {spec.fold}")
        if lack is not None:  # not this fold's fault: the whole stage cannot run here (exit 3)
            raise lack from exc
        record.update(status=STATUS_FAILED, reason=f"{type(exc).__name__}: {exc}")
    record["seconds"] = round(time.monotonic() - started, 2)
    return {"record": record, "predictions": predictions, "model": model}


def _fit_trainer(spec: FoldSpec, run: dict) -> dict:
    """One fold as a Ray Train run of its own; its result as `read_fold_result` gives it."""
    from nic.train.downstream_loop import read_fold_result

    result = _fit_with_retries(spec, run)
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    return read_fold_result(result.checkpoint)


def _fit_shared(spec: FoldSpec, run: dict, pool: Any) -> dict:
    """One fold on a FoldRunner lent by `pool` (nic.train.trainer.WorkerPool), with Ray Train's
    failure semantics: a failed attempt (an error in the loop, the runner's process lost) starts
    again from the fold's last checkpoint, up to max_failures times; a runner whose process died
    is replaced."""
    import ray
    import ray.exceptions as rex

    from nic.train.common import CheckpointStore
    from nic.train.downstream_loop import STATE_FILE

    storage = ray_storage(run["storage_path"])  # resolved here: a runner on another node has its own mirror
    CheckpointStore(storage, run["name"], STATE_FILE).create()
    lost = (rex.RayActorError, rex.ActorUnavailableError, rex.WorkerCrashedError, rex.NodeDiedError,
            rex.RaySystemError, rex.ObjectLostError, rex.OutOfMemoryError)
    for attempt in range(run["max_failures"] + 1):
        runner = pool.acquire(f"train-downstream fold {spec.fold} ({run['name']})")
        try:
            outcome = ray.get(runner.run.remote(spec.to_dict(), storage, run["name"], run.get("progress")))
        except Exception as exc:
            if pool.closed:  # stopped: the stage is failing or interrupted, nothing to retry
                raise
            (pool.discard if isinstance(exc, lost) else pool.release)(runner)
            cause = exc.cause if isinstance(exc, rex.RayTaskError) and exc.cause is not None else exc
            if attempt == run["max_failures"]:
                if cause is exc:
                    raise
                raise cause from exc
            log.warning(f"[{STAGE}] fold {spec.fold}: {type(cause).__name__}: {str(cause)[:200]}; resuming from its last "
                        f"checkpoint (attempt {attempt + 2} of {run['max_failures'] + 1})")
            continue
        pool.release(runner)
        return outcome
    raise AssertionError("unreachable")


def _fold_pool(config: TrainDownstreamConfig, run: dict) -> Any:
    """FoldRunners for single-worker folds (`shared_workers`), else None: a Ray Train run per fold."""
    if not (config.shared_workers and config.num_workers == 1):
        return None
    from nic.train.downstream_loop import FoldRunner
    from nic.train.trainer import WorkerPool

    resources = {"CPU": config.cpus_per_worker, "GPU": 1.0 if config.use_gpu else 0.0}
    return WorkerPool(FoldRunner, resources, run["resource_timeout_s"], config.use_gpu)


def _fit_with_retries(spec: FoldSpec, run: dict):
    """fit_fold, started again (resuming from the fold's latest checkpoint) when Ray itself lost the
    trainer's controller or workers, e.g. an RPC timeout on an overloaded node. Worker errors are
    already retried by FailureConfig(max_failures) and are not retried again here."""
    import ray.exceptions as rex

    from nic.train.downstream_loop import fit_fold

    transient = (rex.ActorUnavailableError, rex.ActorDiedError, rex.RaySystemError, rex.NodeDiedError)
    for attempt in range(run["max_failures"] + 1):
        try:
            return fit_fold(spec, run["storage_path"], run["name"], run["num_workers"], run["use_gpu"],
                            run["cpus_per_worker"], run["max_failures"], progress=run.get("progress"),
                            resource_timeout_s=run["resource_timeout_s"])
        except transient as exc:
            if attempt == run["max_failures"]:
                raise
            log.warning(f"[{STAGE}] fold {spec.fold}: Ray lost the trainer ({type(exc).__name__}); resuming from its last "
                        f"checkpoint (attempt {attempt + 2} of {run['max_failures'] + 1})")
            time.sleep(5)
    raise AssertionError("unreachable")


def _write_fold(fold_dir: Path, outcome: dict) -> dict:
    """model.pt and predictions.parquet first, fold.json last: a fold folder with fold.json is complete."""
    record = outcome["record"]
    if record["status"] == STATUS_OK:
        write_bytes_atomic(fold_dir / "model.pt", outcome["model"])
        write_parquet_atomic(fold_dir / "predictions.parquet",
                             pa.Table.from_pandas(outcome["predictions"], preserve_index=False))
    write_json_atomic(fold_dir / "fold.json", record)
    return record


def _load_done_fold(fold_dir: Path, run_hash: str) -> dict | None:
    marker = fold_dir / "fold.json"
    if not (marker.exists() and (fold_dir / "predictions.parquet").exists() and (fold_dir / "model.pt").exists()):
        return None
    try:
        record = read_json(marker)
    except (OSError, ValueError):
        return None
    return record if record.get("status") == STATUS_OK and record.get("run_hash") == run_hash else None


def _parallel_folds(config: TrainDownstreamConfig) -> int:
    if config.max_parallel_folds:
        return config.max_parallel_folds
    import ray

    res = ray.cluster_resources()
    per_fold_cpu = config.num_workers * config.cpus_per_worker
    n = int(res.get("CPU", 1) // per_fold_cpu)
    if config.use_gpu:
        n = min(n, int(res.get("GPU", 0) // config.num_workers))
    return max(1, min(n, config.folds))


def _run_all_folds(config: TrainDownstreamConfig, specs: list[FoldSpec], run: dict, run_hash: str,
                   on_fold: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the unfinished folds, `_parallel_folds` at a time, from driver threads: fit() only waits
    on its trainer's controller actor, so a thread per fold costs no process and no CPU."""
    from concurrent.futures import ThreadPoolExecutor

    from nic.runtime import Progress

    records: dict[int, dict] = {}
    queue = []
    for spec in specs:
        fold_dir = Path(config.out) / "folds" / f"fold_{spec.fold}"
        done = _load_done_fold(fold_dir, run_hash)
        if done is not None:
            records[spec.fold] = done
        else:
            queue.append((spec, fold_dir))
    if records:
        log.info(f"[{STAGE}] {len(records)} fold(s) already complete, skipping: {sorted(records)}")
    if not queue:
        return [records[k] for k in sorted(records)]
    progress = Progress(STAGE, total=len(specs), unit="folds")
    progress.update(len(records), force=True)
    limit = _parallel_folds(config)
    runners = _fold_pool(config, run)
    try:
        with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="nic-fold") as pool:
            pending = {}
            for spec, fold_dir in queue:
                fold_run = dict(run, name=f"{run['name_prefix']}-fold{spec.fold}")
                pending[pool.submit(run_fold, spec.to_dict(), fold_run, runners)] = (spec.fold, fold_dir)
            try:
                _collect_folds(pending, records, progress, on_fold)
            except BaseException:
                # A fold that cannot run (no resources), Ctrl-C, or a caller's callback raising (a Tune
                # trial stopped mid-search): stop the sibling folds' trainers (and fold runners) now
                # instead of letting the pool wait for them to train to the end while holding the
                # cluster's CPUs.
                from nic.train.trainer import abort_running_trainers

                stopped = abort_running_trainers()
                if stopped:
                    log.info(f"[{STAGE}] stopped {stopped} running fold trainer(s)")
                raise
    finally:
        if runners is not None:
            runners.close()
    return [records[k] for k in sorted(records)]


def _collect_folds(pending: dict, records: dict[int, dict], progress: Any,
                   on_fold: Callable[[dict], None] | None) -> None:
    """Write each fold as it finishes (fold.json last) and report it."""
    from concurrent.futures import FIRST_COMPLETED, wait

    while pending:
        finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in finished:
            fold, fold_dir = pending.pop(future)
            records[fold] = _write_fold(fold_dir, future.result())  # run_fold records its own errors
            rec = records[fold]
            extra = f"fold {fold} {rec['status']}"
            if rec["status"] == STATUS_OK:
                extra += f" (best epoch {rec['best_epoch']}/{rec['epochs_run']})"
            else:
                extra += f": {rec['reason'][:300]}"
            progress.update(len(records), extra=extra, force=True)
            if on_fold is not None:
                on_fold(rec)


def aggregate_predictions(config: TrainDownstreamConfig, labels: Labels, records: list[dict]) -> pd.DataFrame:
    """Out-of-fold predictions (split 'cv') and the test set averaged over the fold models ('test')."""
    parts = [pd.read_parquet(Path(config.out) / "folds" / f"fold_{r['fold']}" / "predictions.parquet")
             for r in records if r["status"] == STATUS_OK]
    if not parts:
        return pd.DataFrame()
    return pool_predictions(pd.concat(parts, ignore_index=True), labels)


def pool_predictions(frame: pd.DataFrame, labels: Labels) -> pd.DataFrame:
    """Fold predictions (slide_id, split, fold, prediction columns; a test slide once per fold
    model) -> one row per slide with its labels: out-of-fold rows as they are, test rows averaged
    over the fold models. The CNN and the linear probe both go through here, so they are pooled
    and then scored the same way."""
    if not len(frame):
        return pd.DataFrame()
    cv = frame[frame["split"] == "cv"]
    test = frame[frame["split"] == "test"]
    if len(test):
        value_cols = [c for c in test.columns if c.startswith("prob_")] or ["prediction"]
        test = test.groupby("slide_id", sort=False)[value_cols].mean().reset_index()
        test["split"], test["fold"] = "test", TEST_FOLD
        if labels.kind == "multiclass":
            test["prediction"] = test[value_cols].to_numpy().argmax(axis=1).astype(float)
        if labels.kind == "binary":
            test["predicted_class"] = (test["prediction"] >= 0.5).astype(int)
    frame = pd.concat([cv, test], ignore_index=True)
    truth = labels.frame.drop(columns=["row"])
    if "target" in truth and labels.classes:
        truth["target_label"] = [labels.classes[i] for i in truth["target"]]
    frame = frame.merge(truth, on="slide_id", how="left")
    lead = ["slide_id", "patient_id", "split", "fold"]
    return frame[lead + [c for c in frame.columns if c not in lead]]


def split_metrics(kind: str, part: pd.DataFrame, labels: Labels, bootstrap: int, seed: int) -> dict:
    if kind == "survival":
        return compute_metrics(kind, time=part["time"].to_numpy(), event=part["event"].to_numpy(),
                               prediction=part["prediction"].to_numpy(), n_bootstrap=bootstrap, seed=seed)
    pred: np.ndarray
    if kind == "multiclass":
        pred = part[[f"prob_{c}" for c in labels.classes]].to_numpy()
    else:
        pred = part["prediction"].to_numpy()
    return compute_metrics(kind, target=part["target"].to_numpy(), prediction=pred, n_bootstrap=bootstrap, seed=seed)


def evaluate_predictions(labels: Labels, predictions: pd.DataFrame, bootstrap: int,
                         seed: int) -> tuple[dict[Split, SplitEntry], dict[int, float | None]]:
    """metrics.json's `cv` and `test` entries ({metrics, slides}; `cv` also `fold_mean`) of pooled
    predictions, and the primary metric of each fold's held-out slides."""
    primary = PRIMARY_METRIC[labels.kind]
    cv = predictions[predictions["split"] == "cv"]
    per_fold = {int(cast(int, k)): split_metrics(labels.kind, part, labels, 0, seed)[primary]["value"]
                for k, part in cv.groupby("fold", sort=True)}  # k: a fold number (pandas types group keys loosely)
    entries: dict[Split, SplitEntry] = {}
    for split in SPLITS:
        part = predictions[predictions["split"] == split]
        if len(part):
            entries[split] = {"metrics": split_metrics(labels.kind, part, labels, bootstrap, seed),
                              "slides": int(len(part))}
    values = [v for v in per_fold.values() if v is not None]
    if "cv" in entries and values:
        # Pooled out-of-fold ranks mix fold models whose scales differ; the mean of the
        # per-fold values is the usual other summary of a cross-validation.
        entries["cv"]["fold_mean"] = {primary: {"mean": float(np.mean(values)),
                                                "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                                "folds": len(values)}}
    return entries, per_fold


def run_probe(config: TrainDownstreamConfig, labels: Labels, splits: pd.DataFrame) -> tuple[ProbeEntry, pd.DataFrame]:
    """The linear-probe baseline on the CNN's own folds (nic.downstream.probe): metrics.json's
    `probe` entry (model, features, cv/test like the CNN's, per-fold penalties, seconds) and its
    pooled predictions. It takes seconds and needs no Ray. It never raises: a probe that cannot be
    fitted (e.g. a degenerate fold) is recorded in `error` and the CNN's results stand."""
    from nic.downstream.probe import FEATURES, MODEL_OF_KIND, cross_validate_probe, slide_features

    started = time.monotonic()
    entry: ProbeEntry = {"model": MODEL_OF_KIND[labels.kind], "features": FEATURES}
    predictions = pd.DataFrame()
    try:
        features = slide_features(config.grids, labels.slide_ids)
        run = cross_validate_probe(features, labels, splits, config.seed)
        predictions = pool_predictions(run.predictions, labels)
        entries, _ = evaluate_predictions(labels, predictions, config.bootstrap, config.seed)
        if labels.kind == "survival":
            for split, part_entry in entries.items():
                part_entry["logrank_p"] = risk_group_logrank(predictions[predictions["split"] == split],
                                                             config.risk_groups)
        for split, part_entry in entries.items():
            entry[split] = part_entry
        entry["folds"] = run.folds
    except Exception as exc:  # the probe is a baseline: its failure must not fail the stage
        entry["error"] = f"{type(exc).__name__}: {exc}"
    entry["seconds"] = round(time.monotonic() - started, 2)
    return entry, predictions


def risk_group_logrank(part: pd.DataFrame, groups: int) -> float | None:
    """Log-rank p between the predicted-risk groups of pooled survival predictions (the same
    quantile groups as the CNN's Kaplan-Meier plot), or None when it cannot be computed."""
    from nic.downstream.plots import logrank_p, risk_groups

    p = logrank_p(part["time"].to_numpy(float), part["event"].to_numpy().astype(int),
                  risk_groups(part["prediction"].to_numpy(float), groups))
    return float(p) if np.isfinite(p) else None


def _metric_text(entry: dict) -> str:
    """'0.812, 95 % CI [0.700, 0.900]' of a metrics entry."""
    value = "n/a" if entry["value"] is None else f"{entry['value']:.3f}"
    ci = "" if entry["ci_low"] is None else f", 95 % CI [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"
    return value + ci


def _probe_line(probe: ProbeEntry, primary: str, cnn: RunRecord | None = None, cnn_name: str = "CNN") -> str:
    """One line on the probe: its primary metric (and the trained model's beside it when given)."""
    head = f"linear probe ({probe['model']} on the {probe['features']})"
    if "error" in probe:
        return f"{head} failed: {probe['error'][:300]}"
    parts = []
    for split in SPLITS:
        if split not in probe:
            continue
        name = "cross-validation" if split == "cv" else "test set"
        text = f"{name} {primary} = {_metric_text(probe[split]['metrics'][primary])}"
        logrank = probe[split].get("logrank_p")
        if logrank is not None:
            text += f", log-rank p = {logrank:.3g}"
        if cnn is not None and split in cnn:
            text += f" ({cnn_name} {_metric_text(cnn[split]['metrics'][primary])})"
        parts.append(text)
    return f"{head}: " + "; ".join(parts) + f" [{probe['seconds']:.1f} s]"


def write_plots(config: TrainDownstreamConfig, labels: Labels, part: pd.DataFrame, split: str, metrics: dict) -> dict:
    from nic.downstream.plots import plot_kaplan_meier, plot_roc, plot_scatter

    out = Path(config.out)
    name = config.target or labels.kind
    title_tail = f"{name}, {'out-of-fold' if split == 'cv' else 'test set'}"
    written: dict[str, Any] = {}
    if labels.kind in ("binary", "multiclass"):
        scores = part[[f"prob_{c}" for c in labels.classes]].to_numpy() if labels.kind == "multiclass" \
            else part["prediction"].to_numpy()
        written["roc"] = plot_roc(part["target"].to_numpy(), scores, out / f"{split}_roc.png",
                                  classes=labels.classes, title=f"ROC ({title_tail})").name
    if labels.kind == "regression":
        sp = metrics.get("spearman", {}).get("value")
        note = f"Spearman {sp:.3f}" if sp is not None else ""
        written["scatter"] = plot_scatter(part["target"].to_numpy(), part["prediction"].to_numpy(),
                                          out / f"{split}_scatter.png", title=f"predicted vs true ({title_tail})",
                                          annotation=note).name
    if labels.kind == "multiclass":
        written["scatter"] = plot_scatter(part["target"].to_numpy(), part["prediction"].to_numpy(),
                                          out / f"{split}_scatter.png", title=f"predicted vs true class ({title_tail})").name
    if labels.kind == "survival":
        path, p = plot_kaplan_meier(part["time"].to_numpy(), part["event"].to_numpy(), part["prediction"].to_numpy(),
                                    out / f"{split}_kaplan_meier.png", groups=config.risk_groups,
                                    title=f"Kaplan-Meier by predicted risk ({title_tail})",
                                    time_label=config.time_column)
        written["kaplan_meier"] = path.name
        written["logrank_p"] = None if not np.isfinite(p) else p
    return written


class RunMismatchError(ValueError):
    """`out` holds a run of other settings, grids or labels (its run.json says so) and overwrite is
    not set: the user's choice of folder, so the stage exits 2 with this message."""


def _prepare_out(config: TrainDownstreamConfig, run_hash: str, storage: Path, name_prefix: str,
                 parts: RunParts | None = None) -> None:
    """Refuse to mix runs with different settings, grids or labels in one folder (its folds and
    checkpoints would be reused for another problem) unless overwrite is set."""
    out = Path(config.out)
    marker = out / "run.json"
    if marker.exists():
        try:
            recorded = read_json(marker)
        except ValueError as exc:  # not JSON (a damaged file): said as before, exit 2
            raise RunMismatchError(str(exc)) from exc
        previous = recorded.get("run_hash")
        if previous != run_hash:
            if not config.overwrite:
                raise RunMismatchError(
                    f"{out} holds a run made with {_what_changed(recorded.get('parts'), parts)} (run hash "
                    f"{previous}, now {run_hash}); its folds were trained on that and are not reused: choose "
                    "another out folder or set overwrite: true to discard them")
            remove(out / "folds")
            for old in child_names(storage):
                if old.startswith(f"{name_prefix}-fold"):
                    remove(storage / old)
    out.mkdir(parents=True, exist_ok=True)
    record: RunMarker = {"run_hash": run_hash, "stage": STAGE}
    if parts:
        record["parts"] = parts
    write_json_atomic(marker, record)


def _what_changed(before: dict | None, now: RunParts | None) -> str:
    """'other labels (labels.csv changed since)' and the like, from run.json's parts."""
    if not before or not now:
        return "different settings, grids or labels"
    changed = []
    if before.get("labels") != now.get("labels"):
        changed.append(f"other labels ({now.get('labels_file')} differs from the labels of that run, "
                       f"{before.get('labels_file')})")
    if before.get("encoder_hash") != now.get("encoder_hash"):
        changed.append("grids of another encoder")
    if before.get("settings") != now.get("settings"):
        changed.append("different settings")
    return " and ".join(changed) or "different settings"


def fold_metric(config: TrainDownstreamConfig, labels: Labels, record: dict) -> float | None:
    """The primary metric on one finished fold's held-out slides (None for a failed fold)."""
    if record["status"] != STATUS_OK:
        return None
    part = aggregate_predictions(config, labels, [record])
    part = part[part["split"] == "cv"]
    if not len(part):
        return None
    return split_metrics(labels.kind, part, labels, 0, config.seed)[PRIMARY_METRIC[labels.kind]]["value"]


def _train_folds(config: TrainDownstreamConfig, labels: Labels, splits: pd.DataFrame, info: dict, crop_size: int,
                 run_hash: str, storage: Path, name_prefix: str,
                 on_fold: Callable[[int, float | None], None] | None) -> list[dict]:
    """Every fold's TorchTrainer run (complete folds skipped), with rank 0's progress relayed here."""
    from nic.runtime import connect

    connect(config.ray, config.verbose)
    specs = build_fold_specs(config, labels, splits, info, crop_size)
    test_ids = splits.loc[splits["fold"] == TEST_FOLD, "slide_id"].tolist()
    log.info(f"[{STAGE}] {labels.kind} '{config.target or 'survival'}': {len(labels.frame)} slides, {config.folds} folds"
             f"{f', {len(test_ids)} test slides' if test_ids else ''}, model {config.model} (pool {config.pool}), "
             f"crop {crop_size}")
    run = {"run_hash": run_hash, "storage_path": str(storage), "name_prefix": name_prefix,
           "num_workers": config.num_workers, "use_gpu": config.use_gpu, "cpus_per_worker": config.cpus_per_worker,
           "max_failures": config.max_failures, "resource_timeout_s": config.ray.resource_timeout_s}
    with ProgressRelay() as relay:
        run["progress"] = relay.queue
        fold_hook = None if on_fold is None else (
            lambda rec: on_fold(rec["fold"], fold_metric(config, labels, rec)))
        return _run_all_folds(config, specs, run, run_hash, fold_hook)


@dataclass
class _RunInputs:
    """What every later step of a run reads: the validated labels matched to the grids, the grids'
    facts, the crop size, the splits, and the run's identity (its hash, where its checkpoints go
    and the name prefix of its Train runs)."""

    labels: Labels
    info: dict
    crop_size: int
    splits: pd.DataFrame
    run_hash: str
    storage: Path
    name_prefix: str


@stage_storage
def run_train_downstream(config: TrainDownstreamConfig,
                         on_fold: Callable[[int, float | None], None] | None = None) -> int:
    """Train and evaluate; 0 when every fold succeeded, 1 when some failed, 2 on bad input.

    `on_fold(fold, metric)` is called as each newly trained fold finishes, with the primary metric
    on its held-out slides: `nic tune` reports it to Ray Tune so ASHA can stop weak trials early."""
    clock = Stopwatch()
    out = Path(config.out)
    try:
        inputs = _read_inputs(config)
    except (LabelError, GridError, SplitError, RunMismatchError) as exc:  # bad input only: a bug raising
        log.error(f"nic {STAGE}: {exc}")  # a plain ValueError keeps its traceback
        return 2
    labels = inputs.labels
    _log_unused_slides(labels)
    write_bytes_atomic(out / "config.yaml", dump_config(config).encode())
    write_parquet_atomic(out / "splits.parquet", pa.Table.from_pandas(inputs.splits, preserve_index=False))

    probe = _probe(config, labels, inputs.splits) if config.probe else None
    records: list[dict] = []
    if config.train_model:
        records = _train_folds(config, labels, inputs.splits, inputs.info, inputs.crop_size, inputs.run_hash,
                               inputs.storage, inputs.name_prefix, on_fold)
    result = _run_record(config, inputs, records)
    if probe is not None:
        result["probe"] = probe
    result["seconds"] = round(clock.seconds(), 2)
    write_json_atomic(out / "metrics.json", result)
    return _log_summary(config, result, records)


def _read_inputs(config: TrainDownstreamConfig) -> _RunInputs:
    """Read and check the grids and labels, split them and claim `out` for this run; raises the
    bad-input errors (exit 2) before anything is written, so a wrong labels file or another run's
    folder costs nothing."""
    out = Path(config.out)
    grids = Path(config.grids)
    available = list_slides(grids)
    if not available:
        raise GridError(f"{grids}: the grid store holds no complete grid; run `nic compress` first")
    labels = load_labels(
        config.labels, config.kind, target=config.target, time_column=config.time_column,
        event_column=config.event_column, patient_column=config.patient_column,
        slide_column=config.slide_column, available_slides=available, missing_grids=config.missing_grids,
        min_per_class=config.folds,
    )
    info = _grid_info(grids, labels.slide_ids)
    crop_size = config.crop_size or min(MAX_AUTO_CROP, info["max_side"])
    splits = make_splits(labels, config.folds, config.test_fraction, config.seed)
    run_hash = _run_hash(config, info["encoder_hash"], labels)
    storage = Path(config.storage_path or out / "ray").absolute()
    name_prefix = config.run_name or out.resolve().name
    _prepare_out(config, run_hash, storage, name_prefix, _run_parts(config, info["encoder_hash"], labels))
    return _RunInputs(labels, info, crop_size, splits, run_hash, storage, name_prefix)


def _log_unused_slides(labels: Labels) -> None:
    """Say which grids have no label and which labelled slides have no grid (dropped): neither is
    an error, but either can mean ids that do not match."""
    if labels.unlabelled_grids:
        shown = ", ".join(labels.unlabelled_grids[:10]) + (" ..." if len(labels.unlabelled_grids) > 10 else "")
        log.info(f"[{STAGE}] {len(labels.unlabelled_grids)} grid(s) have no label and are not used: {shown}")
    if labels.dropped_without_grid:
        log.info(f"[{STAGE}] dropped {len(labels.dropped_without_grid)} labelled slide(s) without a grid: "
                 f"{', '.join(labels.dropped_without_grid[:10])}")


def _probe(config: TrainDownstreamConfig, labels: Labels, splits: pd.DataFrame) -> ProbeEntry:
    """The linear probe on the same splits, its line shown first (it takes seconds, the folds
    minutes) and its predictions written; an empty result removes an earlier run's file."""
    out = Path(config.out)
    probe, probe_predictions = run_probe(config, labels, splits)
    log.info(f"[{STAGE}] {_probe_line(probe, PRIMARY_METRIC[labels.kind])}")
    if len(probe_predictions):
        write_parquet_atomic(out / PROBE_PREDICTIONS, pa.Table.from_pandas(probe_predictions, preserve_index=False))
    else:
        remove(out / PROBE_PREDICTIONS)  # not a stale file from an earlier run beside this run's error
    return probe


def _run_record(config: TrainDownstreamConfig, inputs: _RunInputs, records: list[dict]) -> RunRecord:
    """metrics.json without the probe and the time: the run's facts, each fold's record, and per
    split the pooled metrics and plots of the folds' predictions (written to predictions.parquet)."""
    labels = inputs.labels
    predictions = aggregate_predictions(config, labels, records)
    result: RunRecord = {
        "stage": STAGE, "kind": labels.kind, "target": config.target, "model": config.model,
        "encoder_hash": inputs.info["encoder_hash"], "crop_size": inputs.crop_size,
        "tta_views": config.tta_crops * (8 if config.dihedral else 1),
        "primary_metric": PRIMARY_METRIC[labels.kind], "labels": labels.summary(),
        "unlabelled_grids": labels.unlabelled_grids, "run_hash": inputs.run_hash,
        "trained_model": config.train_model,
        "folds": [{k: v for k, v in r.items() if k != "history"} for r in records],
    }
    if len(predictions):
        primary_name = PRIMARY_METRIC[labels.kind]
        entries, per_fold = evaluate_predictions(labels, predictions, config.bootstrap, config.seed)
        for rec in result["folds"]:
            if rec["status"] == STATUS_OK and rec["fold"] in per_fold:
                rec[f"cv_{primary_name}"] = per_fold[rec["fold"]]
        for split, entry in entries.items():
            part = predictions[predictions["split"] == split]
            entry["plots"] = write_plots(config, labels, part, split, entry["metrics"])
            result[split] = entry
        write_parquet_atomic(Path(config.out) / "predictions.parquet",
                             pa.Table.from_pandas(predictions, preserve_index=False))
    return result


def _log_summary(config: TrainDownstreamConfig, result: RunRecord, records: list[dict]) -> int:
    """The run's closing lines (each split's primary metric with its interval, the probe beside
    the model, failed folds) and its exit code: 1 when any fold failed, else 0."""
    out = Path(config.out)
    primary = result["primary_metric"]
    for split in SPLITS:
        if split in result:
            m = result[split]["metrics"][primary]
            ci = "" if m["ci_low"] is None else f", 95 % CI [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
            value = "n/a" if m["value"] is None else f"{m['value']:.3f}"
            folds = ""
            if split == "cv" and "fold_mean" in result["cv"]:
                fm = result["cv"]["fold_mean"][primary]
                folds = f"; mean of {fm['folds']} folds {fm['mean']:.3f}"
            log.info(f"[{STAGE}] {'cross-validation' if split == 'cv' else 'test set'} {primary} = {value}{ci}, n={m['n']}{folds}")
    if "probe" in result:
        log.info(f"[{STAGE}] {_probe_line(result['probe'], primary, cnn=result, cnn_name=config.model)}")
    failed = [r for r in records if r["status"] != STATUS_OK]
    if failed:
        log.warning(f"[{STAGE}] {len(failed)} of {len(records)} fold(s) failed: " + "; ".join(f"fold {r['fold']}: {r['reason'][:200]}" for r in failed))
        return 1
    written = [out / "metrics.json", out / ("predictions.parquet" if config.train_model else PROBE_PREDICTIONS)]
    log.info(f"[{STAGE}] done in {result['seconds']:.0f} s: " + ", ".join(display(p) for p in written))
    return 0
