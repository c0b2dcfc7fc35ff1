"""Config of `nic compress`: slides -> Parquet feature grids on a Ray Data actor pool."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from nic.config.base import LOCAL_PATH_FIELD, StageConfig
from nic.config.slides import SlideOptions


class CompressConfig(StageConfig):
    # batch_size, preserve_order and mixed_precision can move an embedding value by a rounding step
    # (docs/compress.md); grids made either way are accepted, so they are not in the resume key.
    identity_fields = frozenset({
        "slides", "encoder", "encoder_weights", "encoder_tile_px", "encoder_mpp", "encoder_mean", "encoder_std",
        "encoder_embedding_dim", "slide", "dihedral", "heads",
    })
    execution_fields = frozenset({
        "out", "batch_size", "pool_size", "cpus_per_actor", "read_parallelism", "plan_concurrency",
        "preserve_order", "use_gpu", "mixed_precision", "strict", "overwrite",
    })

    slides: list[str] = Field(
        ..., min_length=1,
        description="Slide files, folders, glob patterns, or CSV files with a 'path' column (and optional 'slide_id'); "
                    "a folder of DICOM .dcm instances is one slide.",
        json_schema_extra=LOCAL_PATH_FIELD,
    )
    encoder: str = Field(
        ..., min_length=1,
        description="Patch encoder: a built-in name ('mean-rgb', 'random'), a folder written by nic train-encoder, "
        "or your own (docs/encoders.md): an encoder.yaml or a folder holding one, a TorchScript file, "
        "'package.module:factory', or 'timm:<architecture>' with --encoder-weights.",
        json_schema_extra=LOCAL_PATH_FIELD,
    )
    encoder_weights: str | None = Field(
        None, description="Your own encoder: its weights file (a state dict, .pt/.bin/.safetensors), for a timm "
        "architecture or an entry point; overrides the spec's `weights`.", json_schema_extra=LOCAL_PATH_FIELD,
    )
    encoder_tile_px: int | None = Field(
        None, ge=8, description="Your own encoder: the tile size it takes (px); overrides the spec's `tile_px` "
        "(slide.tile_px must match it).",
    )
    encoder_mpp: float | None = Field(
        None, gt=0, description="Your own encoder: the resolution it was trained at (um/px); overrides the spec's "
        "`mpp` (slide.target_mpp must match it).",
    )
    encoder_mean: list[float] | None = Field(
        None, min_length=3, max_length=3, description="Your own encoder: input normalisation, RGB in [0, 1] then "
        "(x - mean) / std; overrides the spec's `mean` (default: timm's for the architecture, else ImageNet's).",
    )
    encoder_std: list[float] | None = Field(
        None, min_length=3, max_length=3, description="Your own encoder: see encoder_mean; overrides the spec's `std`.",
    )
    encoder_embedding_dim: int | None = Field(
        None, ge=1, description="Your own encoder: C, checked against a forward pass; overrides the spec's "
        "`embedding_dim`.",
    )
    out: Path = Field(
        ..., description="Grid store: tiles/slide_id=<id>/part-0.parquet per slide and the slides.parquet manifest."
    )
    slide: SlideOptions = Field(default_factory=SlideOptions, description="Resolution, tile size and tissue detection.")
    batch_size: int = Field(
        256, ge=1, description="Tiles per encoder batch (bigger batches use a GPU better; 128-512 suit CPUs).",
    )
    pool_size: int | None = Field(
        None, ge=1,
        description="Encoder actors. Default: one per GPU when encoding on GPUs, else as many as the cluster's "
        "CPUs allow at cpus_per_actor each.",
    )
    cpus_per_actor: float | None = Field(
        None, gt=0,
        description="CPUs reserved by each encoder actor; its torch threads are set to this. Default: 1 with a "
        "GPU, else the CPUs of one node minus what slide planning needs (up to 8).",
    )
    read_parallelism: int | None = Field(
        None, ge=1,
        description="Batches each encoder actor works on at once: while one batch is encoded, the others read "
        "and decode their pixels. Default: on GPUs one per CPU of the actor (a GPU encodes faster than one core "
        "decodes); on CPUs 2: with bfloat16 encoding, reading is a third of an actor's work and overlapping it "
        "gave 1.33x the steady throughput on 2 CPUs (benchmarks/results/compress.md).",
    )
    plan_concurrency: int | None = Field(
        None, ge=1,
        description="Slides planned (tissue detection) at once, each in its own Ray task. Default: 1 per 8 "
        "cluster CPUs, at least 1.",
    )
    preserve_order: bool = Field(
        True,
        description="Hand the encoder actors the planned tiles in slide order, so every batch holds the same "
        "tiles in every run of the job: CPU kernels can round differently for different batch sizes (the float32 "
        "reference encoder: a few embedding values one float16 step apart in batches under 13 tiles), so without "
        "it two runs of one job can write grids that differ in the last bit. false: tiles go to the actors as "
        "planning tasks finish (a little faster when several slides are planned at once on a large cluster).",
    )
    use_gpu: bool | None = Field(
        None, description="Encode on GPUs (one per actor). Default: when the cluster has GPUs.",
    )
    mixed_precision: bool = Field(
        True, description="Encode in reduced precision where the hardware has it: float16 on GPUs, bfloat16 on "
        "CPUs with native bfloat16 units (AMX, AVX512-BF16), float32 elsewhere; each actor decides for its own "
        "device. "
        "false: float32 everywhere.")
    dihedral: bool = Field(
        False,
        description="Also write each slide's grid under all 8 rotations/flips of the tile pixels "
        "(NIC's training-time augmentation); costs 8x the encoding.",
    )
    heads: bool = Field(
        False,
        description="Also write what a multitask encoder's task heads say about each tile, beside the "
        "embedding: patch-task probabilities or values, segmentation class fractions, nucleus counts by type "
        "(float32 columns named head:<task>[=<class>]; docs/compress.md). Only for mtl encoders.",
    )
    strict: bool = Field(False, description="Exit non-zero when any slide failed (default: only when none succeeded).")
    overwrite: bool = Field(False, description="Re-encode slides that are already complete instead of skipping them.")


    def encoder_overrides(self) -> dict[str, object]:
        """The encoder_* fields that are set, by the encoder spec's field names (nic.encoders.external)."""
        values = {"weights": self.encoder_weights, "tile_px": self.encoder_tile_px, "mpp": self.encoder_mpp,
                  "mean": self.encoder_mean, "std": self.encoder_std, "embedding_dim": self.encoder_embedding_dim}
        return {k: v for k, v in values.items() if v is not None}
