"""Config of `nic tune`: which MTL task subsets and hyperparameters to try, and how to judge them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from nic.config.base import LOCAL_PATH_FIELD, NicModel, StageConfig


class Range(NicModel):
    """A continuous range: log-uniform by default (learning rates), uniform with log: false."""

    identity_fields = frozenset({"low", "high", "log"})

    low: float = Field(..., gt=0, description="Lower bound.")
    high: float = Field(..., gt=0, description="Upper bound.")
    log: bool = Field(True, description="Sample log-uniformly.")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class SearchSpace(NicModel):
    """Hyperparameters searched besides the task subset; a list means 'one of these', a range samples."""

    identity_fields = frozenset({"encoder_lr", "embedding_dim", "task_weight", "downstream_lr"})

    encoder_lr: list[float] | Range | None = Field(
        default_factory=lambda: Range(low=3e-4, high=3e-3), description="Encoder learning rate (null: not searched)."
    )
    embedding_dim: list[int] | None = Field(None, description="C, the embedding length (null: not searched).")
    task_weight: Range | None = Field(
        None, description="Each selected task's loss weight, drawn from this range (null: weights from tasks.yaml)."
    )
    downstream_lr: list[float] | Range | None = Field(
        None, description="Downstream learning rate (null: not searched)."
    )


class TuneConfig(StageConfig):
    """`nic tune`: every trial trains an MTL encoder on a task subset (Ray Train), compresses the
    validation slides with it, trains the downstream model and reports its cross-validated metric."""

    identity_fields = frozenset({
        "tasks", "slides", "labels", "kind", "target", "subsets", "num_trials", "min_tasks", "space", "encoder",
        "compress", "downstream", "trial_metric", "asha", "grace_folds", "reduction_factor", "seed",
    })
    execution_fields = frozenset({"out", "max_concurrent_trials", "trial_cpus"})

    tasks: Path = Field(..., description="tasks.yaml of the patch datasets; subsets of its tasks are searched.")
    slides: list[str] = Field(..., min_length=1, description="Slides compressed and used downstream in each trial.",
                             json_schema_extra=LOCAL_PATH_FIELD)
    labels: Path = Field(..., description="Labels table of those slides.")
    kind: Literal["binary", "multiclass", "regression", "survival"] = Field(..., description="Downstream target kind.")
    target: str | None = Field(None, description="Labels column (not needed for survival).")
    out: Path = Field(Path("tune-out"), description="Output folder: trials.parquet/csv, best_config.yaml, PNGs, trials/.")
    subsets: Literal["all", "sample"] = Field(
        "sample", description="'all': one trial per non-empty task subset; 'sample': num_trials subsets spread "
        "evenly over subset sizes.")
    num_trials: int = Field(8, ge=1, description="Trials when subsets = sample.")
    min_tasks: int = Field(1, ge=1, description="Smallest subset size tried.")
    space: SearchSpace = Field(default_factory=SearchSpace, description="Hyperparameters searched.")
    encoder: dict[str, Any] = Field(default_factory=dict, description="nic train-encoder keys for every trial.")
    compress: dict[str, Any] = Field(default_factory=dict, description="nic compress keys for every trial.")
    downstream: dict[str, Any] = Field(default_factory=dict, description="nic train-downstream keys for every trial.")
    trial_metric: Literal["cnn", "probe"] = Field(
        "cnn", description="What a trial reports: 'cnn' = the downstream model's pooled out-of-fold metric "
        "(Ray Train folds, reported per fold so ASHA can stop weak trials); 'probe' = the linear probe's on the "
        "same folds (seconds instead of minutes per trial, no ASHA: one report per trial).")
    asha: bool = Field(True, description="Stop weak trials early with ASHA (rungs are downstream folds finished).")
    grace_folds: int = Field(1, ge=1, description="ASHA: folds every trial finishes before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep the best 1/reduction_factor at each rung.")
    max_concurrent_trials: int = Field(
        1, ge=1, description="Trials running at once; each needs its encoder's and folds' workers, so more only "
        "queue on a small machine.")
    trial_cpus: float = Field(
        0.0, ge=0, description="CPUs reserved by each trial's own process. Its stages reserve their workers' "
        "resources themselves, so by default it holds none (only a token of memory): any CPU it held would be "
        "missing from an encoder that asks for all of a machine's CPUs, and that trial would wait forever.")
    seed: int = Field(0, description="Seed of the subset sample and the hyperparameter sampler.")

    @model_validator(mode="after")
    def _target(self) -> TuneConfig:
        if self.kind != "survival" and not self.target:
            raise ValueError(f"kind '{self.kind}' needs 'target': the labels column to predict")
        for section, wired in (("encoder", {"tasks", "kind", "out", "tasks_subset"}),
                               ("compress", {"slides", "encoder", "out"}),
                               ("downstream", {"grids", "labels", "out", "kind", "target"})):
            clash = sorted(wired & set(getattr(self, section)))
            if clash:
                raise ValueError(f"{section}: {', '.join(clash)} are set by nic tune; remove them")
        if self.trial_metric == "probe" and self.asha:
            raise ValueError("trial_metric: probe reports once per trial, so ASHA has nothing to stop early; "
                             "set asha: false")
        return self
