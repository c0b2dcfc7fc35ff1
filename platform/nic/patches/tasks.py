"""Task specs: what a patch dataset is, read from tasks.yaml.

tasks.yaml is a contract with `nic synth` and with users' own data, so it is validated strictly
(unknown keys are errors) and every error names the file and the task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from nic.config.base import ConfigError, NicModel, format_validation_error, read_yaml

TaskKind = Literal["multiclass", "binary", "regression"]
TaskFormat = Literal["folder", "hdf5", "manifest"]


class TaskSpec(NicModel):
    """One labelled patch dataset and the task it teaches."""

    name: str = Field(..., min_length=1, description="Task name; also the head's name and the metric prefix.")
    kind: TaskKind = Field(..., description="multiclass, binary or regression.")
    classes: list[str] | None = Field(
        None, description="Class names in label order (multiclass, binary); omit for regression. "
        "Binary defaults to [negative, positive] (label 1 = positive = the second name).",
    )
    format: TaskFormat = Field(
        ..., description="folder (<path>/<class>/*.png|jpg|tif), hdf5 (x (N,H,W,3) uint8 and y), "
        "or manifest (CSV/Parquet with columns path,label; paths relative to the manifest).",
    )
    path: Path = Field(..., description="Training data; relative paths are relative to tasks.yaml.")
    val_path: Path | None = Field(None, description="Validation data in the same format (optional).")
    weight: float = Field(1.0, ge=0, description="Loss weight of this task.")

    @model_validator(mode="after")
    def _check_classes(self) -> TaskSpec:
        if self.kind == "regression":
            if self.classes is not None:
                raise ValueError(f"task '{self.name}': a regression task has no 'classes'")
            if self.format == "folder":
                raise ValueError(f"task '{self.name}': format 'folder' needs classes; use hdf5 or manifest "
                                 "for regression")
        elif self.kind == "binary":
            if self.classes is None:
                if self.format == "folder":
                    raise ValueError(f"task '{self.name}': a binary folder task needs 'classes' "
                                     "(the two folder names, negative first)")
                self.classes = ["negative", "positive"]
            if len(self.classes) != 2:
                raise ValueError(f"task '{self.name}': a binary task has exactly 2 classes, got {self.classes}")
        else:
            if not self.classes or len(self.classes) < 2:
                raise ValueError(f"task '{self.name}': a multiclass task needs at least 2 classes")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task '{self.name}': duplicate class names in {self.classes}")
        return self

    @property
    def num_outputs(self) -> int:
        """Logits of this task's head: one per class, one for binary and regression."""
        return len(self.classes) if self.kind == "multiclass" else 1

    def describe(self) -> dict:
        """What encoder.json records about a task (paths are deliberately left out: they are local)."""
        return {"name": self.name, "kind": self.kind, "classes": self.classes, "weight": self.weight}


class TaskFile(NicModel):
    """The whole tasks.yaml."""

    tasks: list[TaskSpec] = Field(..., min_length=1, description="The patch tasks.")

    @model_validator(mode="after")
    def _unique(self) -> TaskFile:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate task names: {dupes}")
        return self


def load_tasks(path: str | Path) -> list[TaskSpec]:
    """Read tasks.yaml; relative data paths become absolute (relative to the YAML file)."""
    path = Path(path)
    data = read_yaml(path)
    try:
        spec = TaskFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, TaskFile, str(path))) from None
    base = path.resolve().parent
    for task in spec.tasks:
        task.path = task.path if task.path.is_absolute() else base / task.path
        if task.val_path is not None and not task.val_path.is_absolute():
            task.val_path = base / task.val_path
    return spec.tasks


def select_tasks(
    tasks: list[TaskSpec], subset: list[str] | None = None, weights: dict[str, float] | None = None
) -> list[TaskSpec]:
    """Keep `subset` (in the YAML's order) and apply weight overrides; unknown names are errors."""
    known = [t.name for t in tasks]
    for name in list(subset or []) + list(weights or {}):
        if name not in known:
            raise ConfigError(f"unknown task '{name}'; tasks.yaml defines: {', '.join(known)}")
    chosen = [t.model_copy(deep=True) for t in tasks if subset is None or t.name in subset]
    if not chosen:
        raise ConfigError("tasks_subset selects no task")
    for task in chosen:
        if weights and task.name in weights:
            task.weight = float(weights[task.name])
    if all(t.weight == 0 for t in chosen):
        raise ConfigError("every selected task has weight 0: nothing would be learned")
    return chosen
