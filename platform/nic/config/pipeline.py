"""Config of `nic pipeline`: the whole study from one file.

Each section holds the keys of the stage it drives (the same keys as that stage's own YAML), minus
the paths the pipeline wires between stages. Sections are validated against the stage models when
the file is loaded, so a typo in the last stage fails in the first second, not after an hour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from nic.config.base import LOCAL_PATH_FIELD, NicModel, StageConfig, build_config

# Keys the pipeline sets itself; a section that sets them is an error.
WIRED_KEYS = {
    "synth": {"out", "ray", "verbose"},
    "encoder": {"tasks", "kind", "out", "ray", "verbose"},
    "compress": {"slides", "encoder", "out", "ray", "verbose"},
    "downstream": {"grids", "labels", "out", "kind", "target", "ray", "verbose"},
}


class OwnData(NicModel):
    """The user's own cohort instead of a synthetic one."""

    identity_fields = frozenset({"slides", "labels", "tasks"})

    slides: list[str] = Field(..., min_length=1, description="Slide files, folders, globs or CSV lists.",
                             json_schema_extra=LOCAL_PATH_FIELD)
    labels: Path = Field(..., description="Labels table (CSV/Parquet) with slide_id, targets, time/event.")
    tasks: Path | None = Field(None, description="tasks.yaml of the patch datasets (needed for trained encoders).")


class EncoderRun(NicModel):
    """One encoder of the comparison."""

    # name: which folder and which label in the report, not what is trained.
    identity_fields = frozenset({"kind", "path", "settings"})
    execution_fields = frozenset({"name"})

    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$", description="Folder name and label in the report.")
    kind: Literal["mtl", "vae", "bigan", "contrastive", "mean-rgb", "random", "external"] = Field(
        ..., description="Encoder kind (see nic train-encoder); 'external': your own encoder, named by `path`."
    )
    path: str | None = Field(
        None, description="kind 'external' only: your own encoder as nic compress --encoder takes it (an "
        "encoder.yaml, a TorchScript file, 'package.module:factory', 'timm:<architecture>'; docs/encoders.md).",
        json_schema_extra=LOCAL_PATH_FIELD,
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Any nic train-encoder key; for kind 'external', nic compress keys for "
        "this encoder's grids (e.g. encoder_weights, slide: {tile_px: 224}).")

    @model_validator(mode="after")
    def _path_for_external(self) -> EncoderRun:
        if self.kind == "external" and not self.path:
            raise ValueError(f"encoder '{self.name}': kind 'external' needs a path (your encoder.yaml, TorchScript "
                             "file, package.module:factory or timm:<architecture>)")
        if self.kind != "external" and self.path:
            raise ValueError(f"encoder '{self.name}': path is only for kind 'external' (a {self.kind} encoder is "
                             "trained by the pipeline)")
        return self


class TargetRun(NicModel):
    """One slide-level target to learn from the grids of every encoder."""

    # name: which folder and which label in the report, not what is learned.
    identity_fields = frozenset({"kind", "target", "settings"})
    execution_fields = frozenset({"name"})

    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$", description="Folder name and label in the report.")
    kind: Literal["binary", "multiclass", "regression", "survival"] = Field(..., description="Target kind.")
    target: str | None = Field(None, description="Labels column (not needed for survival).")
    settings: dict[str, Any] = Field(default_factory=dict, description="Any nic train-downstream key for this target.")


def _default_encoders() -> list[EncoderRun]:
    return [
        EncoderRun(name="mtl", kind="mtl"),
        EncoderRun(name="contrastive", kind="contrastive"),
        EncoderRun(name="mean-rgb", kind="mean-rgb"),
    ]


def _default_targets() -> list[TargetRun]:
    return [
        TargetRun(name="proliferation", kind="regression", target="proliferation"),
        TargetRun(name="growth_pattern", kind="binary", target="growth_pattern"),
        TargetRun(name="survival", kind="survival"),
    ]


class PipelineConfig(StageConfig):
    """synth (or your data) -> encoders -> compress -> downstream models -> report.md."""

    # The stage sections are taken whole; each step's own config classifies their keys.
    identity_fields = frozenset({
        "synth", "data", "encoders", "encoder", "compress", "downstream", "targets", "report_slides",
    })
    execution_fields = frozenset({"out", "title"})

    out: Path = Field(Path("pipeline-out"), description="Folder of every artifact and of report.md.")
    synth: dict[str, Any] | None = Field(
        default_factory=dict,
        description="nic synth keys for a synthetic cohort; null to use `data` (your own slides) instead.",
    )
    data: OwnData | None = Field(None, description="Your own slides, labels and patch tasks (when synth is null).")
    encoders: list[EncoderRun] = Field(
        default_factory=_default_encoders, min_length=1, description="Encoders to train (or use) and compare."
    )
    encoder: dict[str, Any] = Field(
        default_factory=dict, description="nic train-encoder keys shared by every trained encoder."
    )
    compress: dict[str, Any] = Field(default_factory=dict, description="nic compress keys.")
    downstream: dict[str, Any] = Field(
        default_factory=dict, description="nic train-downstream keys shared by every target."
    )
    targets: list[TargetRun] = Field(
        default_factory=_default_targets, min_length=1, description="Slide-level targets to learn."
    )
    report_slides: int = Field(3, ge=0, description="Slides pictured in the report (thumbnail + grid PCA).")
    title: str = Field("NIC study", description="Title of report.md.")

    @model_validator(mode="after")
    def _check_sections(self) -> PipelineConfig:
        if self.synth is None and self.data is None:
            raise ValueError("give either 'synth' (a synthetic cohort) or 'data' (your own slides and labels)")
        if self.synth is not None and self.data is not None:
            raise ValueError("give 'synth' or 'data', not both")
        for names, what in (([e.name for e in self.encoders], "encoders"), ([t.name for t in self.targets], "targets")):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: names must be unique, repeated: {', '.join(dupes)}")
        self._check_wired("synth", self.synth or {})
        self._check_wired("encoder", self.encoder)
        self._check_wired("compress", self.compress)
        self._check_wired("downstream", self.downstream)
        for run in self.encoders:
            self._check_wired("compress" if run.kind == "external" else "encoder", run.settings,
                              f"encoders[{run.name}].settings")
        for target in self.targets:
            self._check_wired("downstream", target.settings, f"targets[{target.name}].settings")
        return self

    @staticmethod
    def _check_wired(section: str, values: dict[str, Any], where: str | None = None) -> None:
        wired = sorted(WIRED_KEYS[section] & set(values))
        if wired:
            raise ValueError(f"{where or section}: {', '.join(wired)} are set by the pipeline; remove them")


def stage_config(model: type, wired: dict[str, Any], *sections: dict[str, Any], source: str) -> Any:
    """A stage config from the pipeline: later sections win, wired paths always win."""
    data: dict[str, Any] = {}
    for section in sections:
        data = _deep_merge(data, section)
    data = _deep_merge(data, wired)
    return build_config(model, data, source)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
