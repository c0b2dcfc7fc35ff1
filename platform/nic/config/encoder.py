"""Config of `nic train-encoder`: which encoder to train, on which patch tasks, and how.

Every field has a description because `nic train-encoder --help` is generated from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from nic.config.base import NicModel, StageConfig

EncoderKind = Literal["mtl", "vae", "bigan", "contrastive", "mean-rgb", "random"]
Architecture = Literal["reference", "resnet"]
TRAINED_KINDS = ("mtl", "vae", "bigan", "contrastive")
BUILTIN_KINDS = ("mean-rgb", "random")


class AugmentOptions(NicModel):
    """Augmentation of training batches (uint8 tiles turned into float tensors, on the worker)."""

    identity_fields = frozenset({
        "enabled", "dihedral", "hed_sigma", "hed_bias", "brightness", "contrast", "blur_prob", "blur_sigma",
        "noise_std", "crop_scale",
    })

    enabled: bool = Field(True, description="Augment training batches at all.")
    dihedral: bool = Field(True, description="Random one of the 8 rotations/flips per tile.")
    hed_sigma: float = Field(
        0.05, ge=0, le=1, description="Stain augmentation: each HED channel is scaled by U(1-s, 1+s) (0 = off)."
    )
    hed_bias: float = Field(
        0.05, ge=0, le=1, description="Stain augmentation: each HED channel is shifted by U(-b, b) optical-density units, as "
        "Tellez et al. (0.05 = their HED-light; 0 = off)."
    )
    brightness: float = Field(0.1, ge=0, le=1, description="Brightness shift U(-b, b) on [0, 1] pixels (0 = off).")
    contrast: float = Field(0.1, ge=0, le=1, description="Contrast factor U(1-c, 1+c) around the tile mean (0 = off).")
    blur_prob: float = Field(0.1, ge=0, le=1, description="Probability that a tile is Gaussian-blurred.")
    blur_sigma: float = Field(1.0, ge=0, description="Maximum blur sigma in pixels (uniform in [0.1, max]).")
    noise_std: float = Field(0.02, ge=0, le=1, description="Maximum std of additive Gaussian noise (0 = off).")
    crop_scale: float = Field(
        1.0, gt=0, le=1, description="Random resized crop: minimum kept area fraction (1 = off). The "
        "contrastive kind uses min(this, 0.5) so its two views differ enough.",
    )


class ObjectiveOptions(NicModel):
    """Hyperparameters of the individual objectives."""

    identity_fields = frozenset({
        "head_hidden", "vae_beta", "contrastive_temperature", "projection_dim", "gan_lr_factor",
    })

    head_hidden: int = Field(
        0, ge=0, description="MTL: hidden units of each task head (0 = a linear head, which keeps the task "
        "information linearly readable from the embedding, as the downstream CNN sees it).",
    )
    vae_beta: float = Field(1.0, ge=0, description="VAE: weight of the KL term.")
    contrastive_temperature: float = Field(0.5, gt=0, description="Contrastive: NT-Xent temperature.")
    projection_dim: int = Field(64, ge=2, description="Contrastive: output size of the projection head.")
    gan_lr_factor: float = Field(
        1.0, gt=0, description="BiGAN: discriminator learning rate = lr x this factor."
    )


class TrainEncoderConfig(StageConfig):
    """`nic train-encoder`: train a patch encoder and write `encoder/` (weights + encoder.json)."""

    # num_workers is identity: every DDP worker takes its own batch_size, so it changes the batches.
    identity_fields = frozenset({
        "tasks", "kind", "architecture", "trunk_pool", "embedding_dim", "tile_px", "mpp", "epochs", "batch_size",
        "lr", "weight_decay", "lr_factor", "lr_patience", "num_workers", "patience", "task_weights",
        "tasks_subset", "val_fraction", "max_samples_per_task", "max_val_samples_per_task", "samples_per_task",
        "max_steps_per_epoch", "max_minutes_per_epoch", "augment", "objective", "seed",
    })
    execution_fields = frozenset({
        "out", "name", "cpus_per_worker", "use_gpu", "max_failures", "storage_path", "run_name", "overwrite",
    })

    tasks: Path | None = Field(
        None, description="tasks.yaml describing the patch datasets (required for trained kinds; "
        "unsupervised kinds use the images of every task and ignore the labels).",
    )
    kind: EncoderKind = Field(
        "mtl", description="mtl (supervised multitask), vae, bigan, contrastive (unsupervised baselines), "
        "mean-rgb (C=3, no training) or random (untrained reference trunk).",
    )
    out: Path = Field(Path("encoder"), description="Output folder: encoder.pt, encoder.json (written last).")
    name: str | None = Field(None, description="Encoder name in encoder.json (default: the output folder's name).")
    architecture: Architecture = Field(
        "reference", description="reference (NIC CNN, ~0.6 M parameters) or resnet (a small ResNet, for GPUs)."
    )
    trunk_pool: Literal["flatten", "avg", "avgmax"] | None = Field(
        None, description="How the trunk pools its last feature map before the dense layer: flatten (the "
        "reference trunk's own, as in the paper), avg (the resnet's own) or avgmax (channel means and maxima; "
        "needed for small rare objects such as mitotic figures). Default: the architecture's own.",
    )
    embedding_dim: int = Field(128, ge=1, description="C, the length of each tile's embedding vector.")
    tile_px: int = Field(128, ge=16, description="Tile size in pixels; every patch must have this size.")
    mpp: float = Field(0.5, gt=0, description="Resolution of the patches in um/px (recorded in encoder.json).")
    epochs: int = Field(10, ge=1, description="Maximum number of epochs.")
    batch_size: int = Field(64, ge=2, description="Batch size per worker.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    lr_factor: float = Field(
        0.3, gt=0, le=1, description="Multiply the learning rate by this when val_loss has not improved for "
        "lr_patience epochs (1 = constant learning rate; the BiGAN always uses a constant one).",
    )
    lr_patience: int = Field(1, ge=0, description="Epochs without a better val_loss before the learning rate drops.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes).")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker (its torch thread count).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    max_failures: int = Field(1, ge=-1, description="Worker failures to recover from (-1 = unlimited).")
    storage_path: Path | None = Field(
        None, description="Where Ray Train keeps checkpoints (default: <out>/checkpoints). Must be shared "
        "storage on a multi-node cluster.",
    )
    run_name: str | None = Field(
        None, description="Ray Train run name (default: derived from the config hash, so re-running the "
        "same command resumes from its last checkpoint and a changed config starts afresh).",
    )
    patience: int = Field(3, ge=1, description="Early stopping: epochs without a better validation loss.")
    task_weights: dict[str, float] = Field(
        default_factory=dict, description="Per-task loss weights, overriding the weights in tasks.yaml."
    )
    tasks_subset: list[str] | None = Field(None, description="Train on these tasks only (names from tasks.yaml).")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Stratified hold-out fraction for tasks without a val_path."
    )
    max_samples_per_task: int | None = Field(
        None, ge=2, description="Read at most this many training patches per task (a seeded random subset)."
    )
    max_val_samples_per_task: int | None = Field(
        1000, ge=2, description="Validate on at most this many patches per task (a seeded random subset)."
    )
    samples_per_task: int | None = Field(
        None, ge=1, description="Samples drawn per task per epoch (default: the largest task's size; smaller "
        "tasks are resampled so every task is seen evenly).",
    )
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap on optimiser steps per epoch (per worker); the same in every run, unlike "
        "max_minutes_per_epoch.")
    max_minutes_per_epoch: float | None = Field(
        None, gt=0, description="Cap on training minutes per epoch. How many steps fit depends on the machine's "
        "speed and load, so two runs of the same config can train on different batches and end with different "
        "encoders (and every number downstream of them): use max_steps_per_epoch when results must repeat.")
    augment: AugmentOptions = Field(default_factory=AugmentOptions, description="Batch augmentation.")
    objective: ObjectiveOptions = Field(default_factory=ObjectiveOptions, description="Objective hyperparameters.")
    seed: int = Field(0, description="Seed for sampling, augmentation and initialisation.")
    overwrite: bool = Field(False, description="Retrain even if out/encoder.json matches this config.")

    @model_validator(mode="after")
    def _check(self) -> TrainEncoderConfig:
        if self.kind in TRAINED_KINDS and self.tasks is None:
            raise ValueError(f"kind '{self.kind}' needs 'tasks' (a tasks.yaml describing the patch datasets)")
        if self.kind != "mean-rgb" and (self.architecture, self.trunk_pool) in (("reference", "avg"), ("resnet", "flatten")):
            own = "flatten" if self.architecture == "reference" else "avg"  # architectures.resolve_pool's rule,
            raise ValueError(f"trunk_pool '{self.trunk_pool}' does not apply to the '{self.architecture}' trunk; "  # without torch
                             f"use {own} (its own) or avgmax")
        if self.kind == "mean-rgb" and self.embedding_dim != 3 and "embedding_dim" in self.model_fields_set:
            raise ValueError("kind 'mean-rgb' always has embedding_dim 3")
        return self
