"""`nic train-encoder`: tasks.yaml + patch datasets -> `encoder/` (encoder.pt, encoder.json).

The driver reads and validates every patch dataset once (bad data is reported here, with the
file's name, before any worker starts), puts the arrays in Ray's object store, runs the Ray
Train loop, and writes the artifact with encoder.json last. The run name is derived from a hash
of the config and the data's fingerprint, so re-running an interrupted command resumes it and a
changed config trains afresh; a complete artifact for the same hash is skipped.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from nic.artifacts import stable_hash
from nic.config.base import ConfigError
from nic.config.encoder import BUILTIN_KINDS, TrainEncoderConfig
from nic.config.identity import config_identity
from nic.encoders.architectures import count_parameters
from nic.encoders.artifact import ENCODER_JSON, EncoderInfo, clear_marker, load_patch_encoder, save_encoder
from nic.encoders.encoder import build_encoder
from nic.encoders.objectives import ObjectiveSpec, TaskHeadSpec, finite_or_none
from nic.logs import stage_logger
from nic.patches.readers import PatchDataError, load_task
from nic.patches.sampling import MixedPatches
from nic.patches.tasks import TaskSpec, load_tasks, select_tasks
from nic.stage_io import stage_storage
from nic.storage import display, exists, remove
from nic.train.common import path_fingerprint
from nic.train.encoder_loop import STAGE, EpochHook, FitResult, LoopSettings, fit_encoder

log = stage_logger(STAGE)


def selected_tasks(config: TrainEncoderConfig) -> list[TaskSpec]:
    if config.tasks is None:
        return []
    return select_tasks(load_tasks(config.tasks), config.tasks_subset, config.task_weights)


def training_config_hash(config: TrainEncoderConfig, tasks: list[TaskSpec]) -> str:
    """Identity of what a run learns: the config's identity fields (TrainEncoderConfig; not where
    or on what it runs), the tasks and a fingerprint of their data files. The whole sha256 (64
    digits), as encoder.json has always recorded it."""
    return stable_hash({
        "config": config_identity(config),
        "tasks": [t.identity() for t in tasks],
        "data": [[path_fingerprint(t.path), path_fingerprint(t.val_path)] for t in tasks],
    }, digits=64)


def _describe_labels(task: TaskSpec) -> str:
    if task.kind == "nuclei":
        return f"{len(task.classes)} nucleus types" if task.classes else "untyped"
    return f"{len(task.classes)} classes" if task.classes else "regression"


def load_patch_data(config: TrainEncoderConfig, tasks: list[TaskSpec]) -> tuple[dict[str, np.ndarray], list[TaskHeadSpec]]:
    """Read every task's train/val patches and describe each task's head."""
    train_sets, val_sets, heads = [], [], []
    for k, task in enumerate(tasks):
        train, val = load_task(task, config.tile_px, config.val_fraction, config.max_samples_per_task,
                               config.max_val_samples_per_task, config.seed + 1000 * k)
        mean, std = 0.0, 1.0
        if task.kind == "regression":
            mean, std = float(train.labels.mean()), float(max(train.labels.std(), 1e-6))
        heads.append(TaskHeadSpec(name=task.name, kind=task.kind, num_outputs=task.num_outputs, weight=task.weight,
                                  classes=task.classes, target_mean=mean, target_std=std,
                                  background=task.background if task.kind == "segmentation" else None))
        what = _describe_labels(task)
        log.info(f"[{STAGE}] task {task.name} ({task.kind}, {what}, weight {task.weight:g}): {len(train)} train, "
                 f"{len(val)} val patches ({task.format} {display(task.path)})")
        train_sets.append(train)
        val_sets.append(val)
    tr, va = MixedPatches.concat(train_sets), MixedPatches.concat(val_sets)
    data = {**tr.arrays("train_"), **va.arrays("val_")}
    return data, heads


def loop_settings(config: TrainEncoderConfig, heads: list[TaskHeadSpec]) -> LoopSettings:
    o = config.objective
    spec = ObjectiveSpec(kind=config.kind, tasks=heads if config.kind == "mtl" else [], head_hidden=o.head_hidden,
                         vae_beta=o.vae_beta, projection_dim=o.projection_dim, temperature=o.contrastive_temperature)
    return LoopSettings(
        kind=config.kind, architecture=config.architecture, pool=config.trunk_pool, embedding_dim=config.embedding_dim,
        tile_px=config.tile_px, objective=asdict(spec), epochs=config.epochs, batch_size=config.batch_size,
        lr=config.lr, weight_decay=config.weight_decay, patience=config.patience, seed=config.seed,
        augment=config.augment.model_dump(), samples_per_task=config.samples_per_task,
        max_steps_per_epoch=config.max_steps_per_epoch, max_minutes_per_epoch=config.max_minutes_per_epoch,
        gan_lr_factor=o.gan_lr_factor, lr_factor=config.lr_factor, lr_patience=config.lr_patience,
    )


def _existing(config: TrainEncoderConfig, config_hash: str) -> EncoderInfo | None:
    """The complete artifact already in `out` for this config hash, if any (weights verified)."""
    if not (config.out / ENCODER_JSON).is_file():
        return None
    try:
        _, info = load_patch_encoder(config.out)
    except (OSError, ValueError):
        return None
    return info if info.config_hash == config_hash else None


def _write_builtin(config: TrainEncoderConfig, config_hash: str, tasks: list[TaskSpec]) -> EncoderInfo:
    if config.kind == "mean-rgb":
        encoder = build_encoder("mean-rgb", 3, config.tile_px)
    else:
        encoder = build_encoder(config.architecture, config.embedding_dim, config.tile_px, seed=config.seed,
                                pool=config.trunk_pool)
    from nic.encoders.artifact import builtin_hash

    info = EncoderInfo(
        name=config.name or config.out.name, kind=config.kind, architecture=encoder.architecture,
        embedding_dim=encoder.embedding_dim, tile_px=config.tile_px, mpp=config.mpp,
        tasks=[], content_hash=builtin_hash(config.kind, encoder.architecture, encoder.embedding_dim,
                                            config.tile_px, None if config.kind == "mean-rgb" else config.seed),
        seed=None if config.kind == "mean-rgb" else config.seed, config_hash=config_hash, epochs_trained=0,
    )
    return save_encoder(encoder, config.out, info, extra_files={"train_config.json": config.model_dump(mode="json")})


def _write_trained(config: TrainEncoderConfig, config_hash: str, heads: list[TaskHeadSpec],
                   tasks: list[TaskSpec], fit: FitResult) -> EncoderInfo:
    encoder = build_encoder(config.architecture, config.embedding_dim, config.tile_px, pool=config.trunk_pool)
    encoder.load_state_dict(fit.best_encoder)
    if config.kind == "mtl":
        described = [h.to_dict() for h in heads]
    else:  # unsupervised: the tasks only lent their images
        described = [dict(t.describe(), labels_used=False) for t in tasks]
    metrics = {k: finite_or_none(float(v)) for k, v in fit.best_metrics.items() if isinstance(v, (int, float))}
    info = EncoderInfo(
        name=config.name or config.out.name, kind=config.kind, architecture=config.architecture,
        embedding_dim=config.embedding_dim, tile_px=config.tile_px, mpp=config.mpp, tasks=described,
        metrics=metrics, content_hash="pending", parameters=count_parameters(encoder), seed=config.seed,
        config_hash=config_hash, epochs_trained=fit.epochs_run,
    )
    history = [{k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()} for row in fit.history]
    extra_files = {"history.json": history, "train_config.json": config.model_dump(mode="json")}
    return save_encoder(encoder, config.out, info, extra_state=fit.extra_state or None, extra_files=extra_files)


def train_encoder(config: TrainEncoderConfig, epoch_hook: EpochHook | None = None) -> EncoderInfo:
    """Train (or skip, or write a built-in) and return the info of the artifact in `config.out`."""
    tasks = selected_tasks(config)
    config_hash = training_config_hash(config, tasks)
    if not config.overwrite:
        existing = _existing(config, config_hash)
        if existing is not None:
            log.info(f"[{STAGE}] {display(config.out / ENCODER_JSON)} is complete for this config (hash {config_hash[:12]}); skipping "
                     "(--set overwrite=true retrains)")
            return existing
    clear_marker(config.out)
    if config.kind in BUILTIN_KINDS:
        info = _write_builtin(config, config_hash, tasks)
        log.info(f"[{STAGE}] wrote built-in encoder '{config.kind}' (C={info.embedding_dim}) to {display(config.out)}")
        return info

    data, heads = load_patch_data(config, tasks)
    from nic.runtime import connect

    connect(config.ray, config.verbose)
    storage = Path(config.storage_path or config.out / "checkpoints").absolute()
    run_name = config.run_name or f"{config.kind}-{config_hash[:12]}"
    if config.overwrite and exists(storage / run_name):
        remove(storage / run_name)
    log.info(f"[{STAGE}] training a '{config.kind}' encoder ({config.architecture}, C={config.embedding_dim}) on "
             f"{len(data['train_tasks'])} patches with {config.num_workers} worker(s); run {display(storage / run_name)}")
    if config.max_minutes_per_epoch is not None:
        log.info(f"[{STAGE}] note: max_minutes_per_epoch={config.max_minutes_per_epoch:g} lets the machine's speed and load decide "
                 "how many steps an epoch trains, so another run of this config may give another encoder; "
                 "max_steps_per_epoch caps epochs reproducibly (history.json records the steps of each epoch)")
    fit = fit_encoder(loop_settings(config, heads), data, storage, run_name, config.num_workers,
                      config.cpus_per_worker, config.use_gpu, config.max_failures, epoch_hook=epoch_hook,
                      resource_timeout_s=config.ray.resource_timeout_s)
    info = _write_trained(config, config_hash, heads, tasks, fit)
    best = info.metrics.get("epoch")
    summary = ", ".join(f"{k} {v:.4g}" for k, v in info.metrics.items() if v is not None and k != "epoch")
    log.info(f"[{STAGE}] wrote {display(config.out)} (best epoch {int(best) if best else '?'} of {fit.epochs_run}"
             f"{', early stop' if fit.stopped_early else ''}): {summary}")
    return info


@stage_storage
def run_train_encoder(config: TrainEncoderConfig) -> int:
    """CLI entry: 0 on success or skip, 2 on bad tasks/data, 1 if training itself failed."""
    try:
        train_encoder(config)
    except PatchDataError as exc:
        log.error(f"nic train-encoder: bad patch data: {exc}")
        return 2
    except ConfigError:
        raise
    except Exception as exc:
        from ray.train import TrainingFailedError

        if isinstance(exc, TrainingFailedError):
            log.error(f"nic train-encoder: training failed: {exc}")
            return 1
        raise
    return 0

