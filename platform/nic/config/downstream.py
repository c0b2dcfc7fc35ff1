"""Config of `nic train-downstream`: slide-level models on feature grids, trained on Ray Train.

Defaults follow NIC (DESIGN.md): Adam, lr 1e-2 reduced x10 on plateau down to 1e-5, batch 16,
L2 1e-5, 20 % feature-wise dropout, T = 10 test-time crops x 8 rotations/flips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from nic.config.base import StageConfig

#: What `pool: null` means, per model and target kind: the one place to change these defaults.
#: Provisional (issue 13), to be replaced by measured choices: a rate, density or count (regression)
#: and a risk built from the whole tumour (survival) need the tissue *mean*; a pattern present
#: anywhere (classification) is what NIC's global max detects. Attention-MIL keeps its gated
#: attention, which is itself a learned mean.
DEFAULT_POOL: dict[str, dict[str, str]] = {
    "nic-cnn": {"binary": "max", "multiclass": "max", "regression": "mean", "survival": "mean"},
    "attention-mil": {"binary": "attention", "multiclass": "attention", "regression": "attention",
                      "survival": "attention"},
}


class TrainDownstreamConfig(StageConfig):
    """Train and evaluate a slide-level model (classification, regression or survival) on grids."""

    # bootstrap, risk_groups, probe, train_model: the pooled metrics, plots and probe are remade on
    # every run, so they are no part of a fold's identity; num_workers as in every run hash so far.
    identity_fields = frozenset({
        "grids", "labels", "kind", "target", "time_column", "event_column", "patient_column", "slide_column",
        "missing_grids", "model", "pool", "strided_layers", "folds", "test_fraction", "val_fraction", "epochs",
        "crops_per_slide", "batch_size", "lr", "min_lr", "lr_patience", "patience", "l2", "dropout", "crop_size",
        "tta_crops", "dihedral", "balanced", "ties", "seed",
    })
    execution_fields = frozenset({
        "out", "risk_groups", "num_workers", "cpus_per_worker", "use_gpu", "max_parallel_folds", "shared_workers",
        "max_failures", "loader_workers", "cache_grids", "bootstrap", "probe", "train_model", "storage_path",
        "run_name", "overwrite",
    })

    grids: Path = Field(..., description="Grid store written by `nic compress` (folder with slides.parquet and tiles/).")
    labels: Path = Field(..., description="Labels table, CSV or Parquet: slide_id, optional patient_id, targets, time/event.")
    kind: Literal["binary", "multiclass", "regression", "survival"] = Field(
        ..., description="Target kind: binary or multiclass classification, regression, or survival (Cox).")
    target: str | None = Field(
        None, description="Target column (binary, multiclass, regression); for survival only a name in the outputs.")
    time_column: str = Field("time", description="Survival time column (> 0).")
    event_column: str = Field("event", description="Survival event column: 1 = event observed, 0 = censored.")
    patient_column: str | None = Field(
        "patient_id", description="Patient column: folds never split a patient's slides (ignored when absent).")
    slide_column: str = Field("slide_id", description="Slide id column; ids must match the grid store's.")
    missing_grids: Literal["error", "drop"] = Field(
        "error", description="Labelled slides without a grid: 'error' lists them and stops; 'drop' trains "
        "without them and records them in metrics.json.")
    out: Path = Field(..., description="Output folder: metrics.json, predictions.parquet, PNG plots, fold models.")

    model: Literal["nic-cnn", "attention-mil"] = Field(
        "nic-cnn", description="'nic-cnn' (the NIC grid CNN) or 'attention-mil' (gated attention pooling over cells).")
    pool: Literal["max", "mean", "attention"] | None = Field(
        None, description="How the model pools over the tissue cells of a crop (never background): 'max' "
        "(a pattern present anywhere; NIC's choice), 'mean' (how much of the tissue shows it: rates, "
        "densities, counts), 'attention' (gated attention, a learned weighted mean). null = the default "
        "for the model and target kind (DEFAULT_POOL in nic.config.downstream); the resolved value is "
        "what config.yaml records.")
    strided_layers: int | None = Field(
        None, ge=0, le=8, description="nic-cnn: how many of its first layers have stride 2. null = the paper's "
        "rule scaled to the crop: 6 at R = 400 (a 7 x 7 last map), fewer on smaller crops so the last map keeps "
        ">= 6 cells a side for pooling (a 46-cell crop: 2 layers, 12 x 12).")
    folds: int = Field(5, ge=2, description="Cross-validation folds (grouped by patient, stratified by class/event).")
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of patients held out as a fixed test set (0: cross-validation only).")
    val_fraction: float = Field(
        0.2, ge=0, lt=1, description="Fraction of each fold's training patients used for early stopping and the "
        "learning-rate schedule (0: use the training loss).")
    epochs: int = Field(
        100, ge=1, description="Maximum epochs per fold (an epoch draws crops_per_slide random crops of every "
        "training slide).")
    crops_per_slide: int = Field(
        8, ge=1, description="Random crops of each training slide per epoch: an epoch is crops_per_slide x "
        "slides samples (in shuffled rounds of one crop per slide), so a small cohort still gets hundreds of "
        "optimiser steps per fold (21 slides, batch 16, 20 epochs: ~210 steps at 8, 40 at 1). Patience and "
        "the learning-rate schedule count epochs.")
    batch_size: int = Field(16, ge=2, description="Crops per batch (per worker).")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate.")
    min_lr: float = Field(1e-5, gt=0, description="Floor of the x10 reductions on plateau.")
    lr_patience: int = Field(5, ge=0, description="Epochs without validation improvement before lr is reduced x10.")
    patience: int = Field(15, ge=1, description="Early stopping: epochs without validation improvement before a fold stops.")
    l2: float = Field(1e-5, ge=0, description="L2 weight penalty (Adam weight decay).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Feature-wise (channel) dropout rate.")
    crop_size: int | None = Field(
        None, ge=1, description="Crop side R in grid cells (default: the largest grid side, at most 400; "
        "smaller grids are zero-padded).")
    tta_crops: int = Field(10, ge=1, description="Test-time crops T per rotation/flip (T x 8 views per slide).")
    dihedral: bool = Field(
        True, description="Augment with the 8 rotations/flips and average over them at test time (the pixel-level "
        "variants when compression wrote them, else cell positions only).")
    balanced: bool = Field(False, description="Class-balanced sampling of training slides (classification).")
    ties: Literal["efron", "breslow"] = Field("efron", description="Tied survival times in the Cox loss.")
    risk_groups: int = Field(2, ge=2, le=5, description="Kaplan-Meier risk groups: 2 = median split, 3 = tertiles.")

    num_workers: int = Field(1, ge=1, description="Ray Train (DDP) workers per fold.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker reserves.")
    use_gpu: bool = Field(False, description="Train on GPUs (one per worker).")
    max_parallel_folds: int | None = Field(
        None, ge=1, description="Folds trained at once (default: as many as the cluster's CPUs/GPUs hold).")
    shared_workers: bool = Field(
        True, description="Single-worker folds (num_workers 1) train on long-lived Ray actors, one per fold trained "
        "at once, each fold after fold, instead of a Ray Train run per fold: the ~10 s start-up (controller, "
        "worker, imports) is paid once per actor, not per fold. Same loop, seeds and results; checkpoints in "
        "<storage_path>/<run>-fold<k>/nic_checkpoint. false: a Ray Train run per fold, as DDP folds always are.")
    max_failures: int = Field(2, ge=0, description="Worker failures a fold survives (resuming from its last checkpoint).")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per training worker.")
    cache_grids: int = Field(
        64, ge=0, description="Grids kept in memory per worker (LRU, and at most 1 GiB); the rest are read on "
        "demand. An epoch visits every training slide crops_per_slide times, so a cache smaller than the "
        "training set re-reads each grid every round (measured: half of a demo epoch at the old default 8).")
    seed: int = Field(0, description="Seed of splits, sampling, crops and initialisation.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the 95-percent confidence intervals (0: none).")
    probe: bool = Field(
        True, description="Also fit a linear probe on the same folds (takes seconds, no Ray): ridge, logistic or "
        "penalised Cox regression on each slide's mean and SD of every grid channel over tissue, penalty chosen "
        "by inner cross-validation on each fold's training slides. Its metrics are metrics.json's 'probe' and "
        "its predictions probe_predictions.parquet: a baseline saying whether the grids carry the signal at all.")
    train_model: bool = Field(
        True, description="Train the slide-level model (Ray Train folds). false = the linear probe only: seconds, "
        "no Ray; metrics.json then holds 'probe' and no 'cv'/'test' (nic tune's cheap trial metric).")
    storage_path: Path | None = Field(
        None, description="Ray Train storage for checkpoints (default: <out>/ray). Re-running with the same "
        "storage and out resumes unfinished folds.")
    run_name: str | None = Field(None, description="Prefix of the Ray Train run names (default: the out folder's name).")
    overwrite: bool = Field(False, description="Discard an earlier run in `out` made with different settings.")

    @model_validator(mode="before")
    @classmethod
    def _default_pool(cls, data: Any) -> Any:
        """`pool: null` -> DEFAULT_POOL[model][kind], resolved before validation so that the run's
        settings hash and config.yaml name the pooling actually trained (a changed default table
        then cannot resume folds trained with another one). Invalid model or kind values are left
        for their own fields' errors."""
        if not isinstance(data, dict) or data.get("pool") is not None:
            return data
        model = data.get("model", cls.model_fields["model"].default)
        pool = DEFAULT_POOL.get(model, {}).get(data.get("kind"))  # type: ignore[arg-type]
        return {**data, "pool": pool} if pool is not None else data

    @model_validator(mode="after")
    def _something_to_do(self) -> TrainDownstreamConfig:
        if not self.train_model and not self.probe:
            raise ValueError("train_model and probe are both false: nothing would be trained")
        return self

    @model_validator(mode="after")
    def _target_needed(self) -> TrainDownstreamConfig:
        if self.kind != "survival" and not self.target:
            raise ValueError(f"kind '{self.kind}' needs 'target': the labels column to predict")
        return self
