"""Task specs: what a patch dataset is, read from tasks.yaml.

tasks.yaml is a contract with `nic synth` and with users' own data, so it is validated strictly
(unknown keys are errors) and every error names the file and the task.

Patch tasks (multiclass, binary, regression) carry one label per tile. Dense tasks carry one per
pixel: `segmentation` (a class per pixel, `ignore_index` for unlabelled pixels) and `nuclei`
(an instance id per pixel, 0 = background, and optionally a nucleus type per pixel). They are
trained through a decoder on the same trunk (Cerberus); see nic.encoders.dense.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from nic.config.base import ConfigError, NicModel, format_validation_error, read_yaml

TaskKind = Literal["multiclass", "binary", "regression", "segmentation", "nuclei"]
DENSE_KINDS = ("segmentation", "nuclei")
_DENSE_FIELDS = {"ignore_index", "background"}
TaskFormat = Literal["folder", "hdf5", "manifest"]


class TaskSpec(NicModel):
    """One labelled patch dataset and the task it teaches."""

    name: str = Field(..., min_length=1, description="Task name; also the head's name and the metric prefix.")
    kind: TaskKind = Field(..., description="multiclass, binary or regression (one label per tile); "
                           "segmentation or nuclei (one label per pixel, a decoder head).")
    classes: list[str] | None = Field(
        None, description="Class names in label order (multiclass, binary, segmentation); omit for regression. "
        "Binary defaults to [negative, positive] (label 1 = positive = the second name). For nuclei: the "
        "nucleus types (type map value 1 = the first name); omit for untyped nuclei.",
    )
    format: TaskFormat = Field(
        ..., description="folder (<path>/<class>/*.png|jpg|tif; dense tasks: <path>/images/*.png with "
        "<path>/masks/*.png of the same name, nuclei types in <path>/types/), hdf5 (x (N,H,W,3) uint8 and y; "
        "dense tasks: y (N,H,W) masks, nuclei types in `types`), or manifest (CSV/Parquet with columns "
        "path,label; paths relative to the manifest; patch tasks only).",
    )
    path: Path = Field(..., description="Training data; relative paths are relative to tasks.yaml.")
    val_path: Path | None = Field(None, description="Validation data in the same format (optional).")
    weight: float = Field(1.0, ge=0, description="Loss weight of this task.")
    ignore_index: int = Field(255, ge=0, le=65535, description="segmentation: mask value of unlabelled pixels "
                              "(no loss, not scored).")
    background: int | None = Field(0, ge=0, description="segmentation: the class left out of the mean "
                                   "foreground Dice (null: every class counts).")

    @property
    def dense(self) -> bool:
        """A per-pixel task, trained through a decoder rather than a head on the embedding."""
        return self.kind in DENSE_KINDS

    @model_validator(mode="after")
    def _check_classes(self) -> TaskSpec:
        if self.dense:
            return self._check_dense()
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

    def _check_dense(self) -> TaskSpec:
        if self.format == "manifest":
            raise ValueError(f"task '{self.name}': a {self.kind} task reads folder or hdf5, not manifest")
        if self.kind == "segmentation":
            if not self.classes or len(self.classes) < 2:
                raise ValueError(f"task '{self.name}': a segmentation task needs at least 2 classes")
            if self.ignore_index < len(self.classes):
                raise ValueError(f"task '{self.name}': ignore_index {self.ignore_index} is a class index "
                                 f"(classes 0..{len(self.classes) - 1})")
            if self.background is not None and self.background >= len(self.classes):
                raise ValueError(f"task '{self.name}': background {self.background} is not a class index")
        elif self.classes is not None and not self.classes:
            raise ValueError(f"task '{self.name}': nucleus types, if given, need at least one name")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task '{self.name}': duplicate class names in {self.classes}")
        return self

    @property
    def num_outputs(self) -> int:
        """Logits of this task's head: one per class, one for binary and regression. Dense tasks:
        one map per class (segmentation); background/interior/boundary plus, if typed, one map for
        background and one per nucleus type (nuclei)."""
        if self.kind == "segmentation":
            return len(self.classes or [])
        if self.kind == "nuclei":
            return 3 + (len(self.classes) + 1 if self.classes else 0)
        return len(self.classes or []) if self.kind == "multiclass" else 1

    def describe(self) -> dict:
        """What encoder.json records about a task (paths are deliberately left out: they are local)."""
        return {"name": self.name, "kind": self.kind, "classes": self.classes, "weight": self.weight}

    def identity(self) -> dict:
        """What a training run's config hash takes from the task. Patch tasks leave out the
        dense-only fields, so adding those fields changed no existing run's hash."""
        return self.model_dump(mode="json", exclude=None if self.dense else _DENSE_FIELDS)


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
