"""One trial of `nic tune`: encoder on a task subset -> grids -> downstream folds, reported per fold.

A trial is a Ray Tune function trainable that runs the stages themselves: the encoder trains on
Ray Train workers, compression runs on Ray Data, and each downstream fold is its own TorchTrainer.
The running mean of the finished folds' metric is reported after every fold, so ASHA can stop a
weak trial after its first folds instead of paying for all of them. Every stage skips work it
finds complete, so a trial restarted by `Tuner.restore` picks up where it stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nic.config.base import build_config
from nic.config.compress import CompressConfig
from nic.config.downstream import TrainDownstreamConfig
from nic.config.encoder import TrainEncoderConfig

METRIC = "metric"


def trial_configs(params: dict[str, Any], static: dict[str, Any], trial_dir: Path) -> tuple:
    """The three stage configs of a trial from its sampled parameters."""
    quiet = {"ray": static["ray"], "verbose": False}
    encoder = {**static["encoder"], **quiet, "kind": "mtl", "tasks": static["tasks"],
               "tasks_subset": list(params["tasks"]), "out": str(trial_dir / "encoder"), "name": trial_dir.name}
    if "encoder_lr" in params:
        encoder["lr"] = params["encoder_lr"]
    if "embedding_dim" in params:
        encoder["embedding_dim"] = params["embedding_dim"]
    weights = {k[len("weight_"):]: v for k, v in params.items() if k.startswith("weight_")}
    if weights:
        encoder["task_weights"] = {t: weights[t] for t in params["tasks"] if t in weights}
    compress = {**static["compress"], **quiet, "slides": static["slides"], "encoder": str(trial_dir / "encoder"),
                "out": str(trial_dir / "grids")}
    downstream = {**static["downstream"], **quiet, "grids": str(trial_dir / "grids"), "labels": static["labels"],
                  "kind": static["kind"], "out": str(trial_dir / "model")}
    if static.get("target"):
        downstream["target"] = static["target"]
    if static.get("trial_metric") == "probe":
        downstream.update(train_model=False, probe=True)
    if "downstream_lr" in params:
        downstream["lr"] = params["downstream_lr"]
    return (build_config(TrainEncoderConfig, encoder, "nic tune: encoder"),
            build_config(CompressConfig, compress, "nic tune: compress"),
            build_config(TrainDownstreamConfig, downstream, "nic tune: downstream"))


def run_trial(params: dict[str, Any], static: dict[str, Any]) -> None:
    from ray import tune

    from nic.compress.stage import run_compress
    from nic.train.downstream_stage import run_train_downstream
    from nic.train.encoder_stage import run_train_encoder

    context = tune.get_context()
    trial_dir = Path(static["out"]) / "trials" / context.get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    encoder_cfg, compress_cfg, downstream_cfg = trial_configs(params, static, trial_dir)
    n_tasks = len(params["tasks"])
    base = {"n_tasks": n_tasks, "tasks": ",".join(params["tasks"])}

    if run_train_encoder(encoder_cfg) != 0:
        raise RuntimeError(f"encoder training failed for tasks {base['tasks']}")
    if run_compress(compress_cfg) != 0:
        raise RuntimeError(f"compression failed (no slide compressed) in {trial_dir / 'grids'}")

    values: list[float] = []

    def on_fold(fold: int, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            values.append(value)
        mean = sum(values) / len(values) if values else float("nan")
        tune.report({**base, METRIC: mean, "folds_done": len(values), "last_fold": fold})

    code = run_train_downstream(downstream_cfg, on_fold=on_fold)
    if code == 2:
        raise RuntimeError(f"downstream training could not start (see the trial's log); out: {trial_dir / 'model'}")
    final = _final_metric(trial_dir / "model" / "metrics.json", static.get("trial_metric", "cnn"))
    tune.report({**base, METRIC: final if final is not None else float("nan"), "folds_done": len(values),
                 "complete": True})


def _final_metric(path: Path, which: str = "cnn") -> float | None:
    """The pooled out-of-fold metric the downstream stage wrote (better than a mean of per-fold
    values): the trained model's, or the linear probe's (`which` = "probe"). None when metrics.json
    is missing or not JSON, or holds no such value (a probe that failed, the model's metric of a
    probe-only run)."""
    import json

    try:  # only reading and parsing: a missing or damaged file has no metric, an error after it is a bug
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    entry = data.get("probe") if which == "probe" else data
    return _lookup(entry, "cv", "metrics", data.get("primary_metric"), "value")


def _lookup(node: Any, *keys: Any) -> Any:
    """node[key][key]... of parsed JSON; None where a key is missing or a level is not an object."""
    for key in keys:
        if not isinstance(node, dict) or not isinstance(key, str) or key not in node:
            return None
        node = node[key]
    return node
