"""Config of `nic synth`: the synthetic cohort generator (slides, labels, patch task datasets)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from nic.config.base import NicModel, StageConfig

PATCH_TASKS = ("tissue_type", "tumour", "mitosis", "lymphocyte_density")
DENSE_TASKS = ("nuclei", "tissue_regions")
"""Per-pixel datasets (nic.synth.dense); opt-in, so existing cohorts and encoder runs are unchanged."""
HELDOUT_TASKS = ("apoptosis",)
"""Patch tasks held out of encoder training (the transfer benchmark); opt-in, listed in
heldout_tasks.yaml instead of tasks.yaml."""


class RenderOptions(NicModel):
    """How slides are drawn and written."""

    identity_fields = frozenset({"tile_size", "quality", "stain_variation", "max_tissue_pieces", "min_aspect"})

    tile_size: int = Field(256, ge=16, multiple_of=16, description="TIFF tile size in px (JPEG tiles).")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of the slide tiles.")
    stain_variation: float = Field(
        1.0, ge=0, le=3, description="Scale of the per-slide H&E colour variation (0 = every slide stained alike)."
    )
    max_tissue_pieces: int = Field(3, ge=1, le=5, description="Most tissue pieces on one slide.")
    min_aspect: float = Field(
        0.75, gt=0, le=1, description="Slides are size x (size * aspect) px, aspect uniform in [min_aspect, 1]."
    )


class SignalOptions(NicModel):
    """How hard the tasks are: the signal-to-noise knob."""

    identity_fields = frozenset({
        "snr", "mitotic_fraction", "mitotic_spread", "apoptotic_fraction", "proliferation_noise",
    })

    snr: float = Field(
        0.7, ge=0, le=1,
        description="Visibility of the proliferation signal, 0..1: mitotic figure size and darkness, and "
        "the mitotic rate (x(0.3 + 0.7 snr)). 1 = large, black, frequent mitoses; 0 = needle in a haystack.",
    )
    mitotic_fraction: float = Field(
        0.006, gt=0, lt=0.2,
        description="Median fraction of tumour nuclei in mitosis at snr = 1 (patients vary log-normally around it).",
    )
    mitotic_spread: float = Field(
        0.6, ge=0, le=2, description="Standard deviation of log(mitotic fraction) between patients."
    )
    apoptotic_fraction: float = Field(
        0.004, ge=0, lt=0.2,
        description="Median fraction of tumour nuclei drawn as apoptotic bodies (dark mitosis look-alikes); "
        "slides vary log-normally around it, independently of the mitotic rate. 0 = no look-alikes.",
    )
    proliferation_noise: float = Field(
        0.5, ge=0,
        description="Standard deviation of the noise added to the standardised log mitotic rate to make the "
        "proliferation score (0 = the score is exactly the rate).",
    )


class CohortOptions(NicModel):
    """Patients and their biology."""

    identity_fields = frozenset({"two_slide_fraction", "desmoplastic_fraction"})

    two_slide_fraction: float = Field(
        0.25, ge=0, le=1, description="Fraction of patients with two slides (so splits must group by patient)."
    )
    desmoplastic_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of patients with the desmoplastic growth pattern (label 1)."
    )


class SurvivalOptions(NicModel):
    """Proportional-hazards survival: hazard = baseline Weibull x exp(sum of coefficient x covariate)."""

    identity_fields = frozenset({
        "beta_proliferation", "beta_desmoplastic", "beta_til", "beta_necrosis", "weibull_shape",
        "weibull_scale_months", "follow_up_months", "dropout_months",
    })

    beta_proliferation: float = Field(0.7, description="Log hazard ratio per SD of log mitotic rate.")
    beta_desmoplastic: float = Field(-0.8, description="Log hazard ratio of the desmoplastic growth pattern.")
    beta_til: float = Field(-0.5, description="Log hazard ratio per SD of TIL density.")
    beta_necrosis: float = Field(0.3, description="Log hazard ratio per SD of the necrotic fraction.")
    weibull_shape: float = Field(1.3, gt=0, description="Shape of the baseline Weibull event-time distribution.")
    weibull_scale_months: float = Field(48.0, gt=0, description="Scale (months) of the baseline Weibull.")
    follow_up_months: float = Field(
        120.0, gt=0, description="End of the study: times beyond it are censored."
    )
    dropout_months: float = Field(
        150.0, gt=0, description="Mean of the exponential random-censoring (loss to follow-up) time."
    )


class ArtefactOptions(NicModel):
    """Probability that a slide carries each artefact."""

    identity_fields = frozenset({"pen", "fold", "blur"})

    pen: float = Field(0.15, ge=0, le=1, description="Probability of a pen mark.")
    fold: float = Field(0.15, ge=0, le=1, description="Probability of a tissue fold.")
    blur: float = Field(0.15, ge=0, le=1, description="Probability of an out-of-focus area.")


class PatchOptions(NicModel):
    """Labelled patch datasets for training the patch encoder."""

    # chunk_canvases has been in the patch spec since the first cohorts: a change re-renders the patches.
    identity_fields = frozenset({
        "tasks", "train", "val", "patch_px", "mpp", "canvas_patches", "mitosis_positive_fraction", "chunk_canvases",
    })

    tasks: list[str] = Field(
        list(PATCH_TASKS), description=f"Tasks to generate, any of {', '.join(PATCH_TASKS)}, the dense "
        f"(per-pixel) tasks {', '.join(DENSE_TASKS)}, and the held-out tasks {', '.join(HELDOUT_TASKS)} "
        "(for the transfer benchmark: listed in heldout_tasks.yaml, not tasks.yaml).",
    )
    train: int = Field(2400, ge=0, description="Training patches per task.")
    val: int = Field(600, ge=0, description="Validation patches per task (rendered from separate canvases).")
    patch_px: int = Field(128, ge=16, description="Patch size in px.")
    mpp: float = Field(0.5, gt=0, description="Resolution of the patches (um/px); NIC uses 0.5.")
    canvas_patches: int = Field(
        4, ge=1, le=16, description="Patches per canvas side: each canvas (one stain, one scene) gives n x n patches."
    )
    mitosis_positive_fraction: float = Field(
        0.35, gt=0, lt=1,
        description="Fraction of mitosis patches holding a mitotic figure (exact over each split); the "
        "rest are figure-free tiles of the same tumour-rich tissue, look-alikes included.",
    )
    chunk_canvases: int = Field(16, ge=1, description="Canvases per Ray task.")

    @model_validator(mode="after")
    def _known_tasks(self) -> PatchOptions:
        known = PATCH_TASKS + DENSE_TASKS + HELDOUT_TASKS
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"unknown patch tasks {unknown}; known: {', '.join(known)}")
        return self


class SynthConfig(StageConfig):
    """`nic synth`: a synthetic cohort with known ground truth."""

    identity_fields = frozenset({
        "slides", "size", "min_size", "seed", "mpp", "render", "signal", "cohort", "survival", "artefacts",
        "patches",
    })
    execution_fields = frozenset({"out", "strict"})

    out: Path = Field(Path("cohort"), description="Output folder of the cohort.")
    slides: int = Field(36, ge=1, description="Number of slides.")
    size: int = Field(6000, ge=256, description="Level-0 width of the largest slide, in px.")
    min_size: int | None = Field(
        None, ge=256, description="If set, each slide's width is drawn uniformly in [min_size, size]."
    )
    seed: int = Field(0, ge=0, description="Master seed: the same seed gives byte-identical outputs.")
    mpp: float = Field(0.5, gt=0, le=4, description="Level-0 resolution of the slides in um/px (0.25 = '40x').")
    strict: bool = Field(False, description="Exit non-zero if any slide or patch task failed.")
    render: RenderOptions = Field(default_factory=RenderOptions, description="Drawing and writing slides.")
    signal: SignalOptions = Field(default_factory=SignalOptions, description="Signal-to-noise of the targets.")
    cohort: CohortOptions = Field(default_factory=CohortOptions, description="Patients and biology.")
    survival: SurvivalOptions = Field(default_factory=SurvivalOptions, description="Survival model.")
    artefacts: ArtefactOptions = Field(default_factory=ArtefactOptions, description="Slide artefacts.")
    patches: PatchOptions = Field(default_factory=PatchOptions, description="Patch task datasets.")

    @model_validator(mode="after")
    def _sizes(self) -> SynthConfig:
        if self.min_size is not None and self.min_size > self.size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed size ({self.size})")
        return self
