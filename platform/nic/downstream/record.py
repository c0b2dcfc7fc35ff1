"""The records `nic train-downstream` writes per run, as types: `metrics.json` (`RunRecord`, with
its per-split entries and the linear probe's) and `run.json` (`RunMarker`).

They are TypedDicts, not classes of their own: the stage builds plain dicts and writes them with
`nic.artifacts.write_json_atomic` (sorted keys), so the files stay what they were; the types give
mypy the keys and their values where the stage builds and reads them. The layout is described for
users in docs/downstream.md ("Outputs", "Linear probe").

Each fold's record (`folds/fold_<k>/fold.json`, and its copy in `RunRecord.folds` without the
epoch history and with `cv_<primary metric>`) stays a `dict[str, Any]`: its metric key is named
after the run's primary metric.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

#: The splits a run scores: pooled out-of-fold predictions and the fixed test set.
Split = Literal["cv", "test"]
SPLITS: tuple[Split, ...] = ("cv", "test")


class _SplitScores(TypedDict):
    metrics: dict[str, dict[str, Any]]  # metric name -> {value, ci_low, ci_high, n}
    slides: int


class SplitEntry(_SplitScores, total=False):
    """metrics.json's `cv` or `test` (the trained model's, or the probe's): the pooled metrics with
    their bootstrap intervals and the number of slides; `cv` also the mean of the per-fold values."""

    fold_mean: dict[str, dict[str, Any]]  # primary metric -> {mean, sd, folds}
    plots: dict[str, Any]  # the trained model's: plot kind -> PNG name (and logrank_p for survival)
    logrank_p: float | None  # the probe's, survival only: log-rank p of its predicted-risk groups


class _ProbeModel(TypedDict):
    model: str  # ridge | logistic | cox
    features: str


class ProbeEntry(_ProbeModel, total=False):
    """metrics.json's `probe`: the linear probe on the run's folds, in the layout of the trained
    model's entries; `error` instead of `cv`/`test`/`folds` when it could not be fitted."""

    cv: SplitEntry
    test: SplitEntry
    folds: list[dict[str, Any]]  # per fold: slides, chosen penalty, inner scores
    error: str
    seconds: float


class _RunFacts(TypedDict):
    stage: str
    kind: str  # binary | multiclass | regression | survival
    target: str | None
    model: str
    encoder_hash: str
    crop_size: int
    tta_views: int
    primary_metric: str
    labels: dict[str, Any]  # Labels.summary()
    unlabelled_grids: list[str]
    run_hash: str
    trained_model: bool
    folds: list[dict[str, Any]]  # each fold's record without its history, with cv_<primary metric>


class RunRecord(_RunFacts, total=False):
    """metrics.json, written at the end of every run: the run's facts, each fold's record, the
    pooled metrics per split (when any fold predicted), the probe's entry and the run's seconds."""

    cv: SplitEntry
    test: SplitEntry
    probe: ProbeEntry
    seconds: float


class RunParts(TypedDict):
    """What the run hash covers, each part hashed on its own, so that a refusal can say what changed."""

    settings: str  # stable_hash of the config's identity
    encoder_hash: str
    labels: str  # stable_hash of the validated labels
    labels_file: str  # as the user named it (a URI stays a URI)


class _RunIdentity(TypedDict):
    run_hash: str
    stage: str


class RunMarker(_RunIdentity, total=False):
    """run.json: which run the folds and checkpoints of `out` belong to."""

    parts: RunParts
