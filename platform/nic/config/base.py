"""Typed configuration: every job's config is a pydantic model loaded from YAML.

Errors must be readable by someone who only knows their YAML file, so validation errors are
rewritten to name the file, the dotted key, the problem and the allowed keys or values.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, ValidationInfo, field_validator

from nic.config.identity import check_classified
from nic.storage import ensure_local, local_path, to_local


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is meant for the user."""


#: Mark of str fields that name files or folders (`Field(..., json_schema_extra=LOCAL_PATH_FIELD)`);
#: Path fields need no mark.
LOCAL_PATH = "local_path"
LOCAL_PATH_FIELD: dict[str, JsonValue] = {LOCAL_PATH: True}  # typed as pydantic's json_schema_extra


def _is_path_type(annotation: Any) -> bool:
    if annotation is Path:
        return True
    return any(_is_path_type(arg) for arg in typing.get_args(annotation))


class NicModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    #: The fields this class adds, by what a change to them means (nic.config.identity): part of
    #: the result (and so of the resume key), or only of how the stage runs.
    identity_fields: ClassVar[frozenset[str]] = frozenset()
    execution_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A model that classifies its fields must classify every one, checked here so that a new
        field without a class fails at import instead of silently entering or leaving resume keys."""
        super().__pydantic_init_subclass__(**kwargs)
        check_classified(cls, required=False)

    @field_validator("*", mode="before")
    @classmethod
    def _object_store_uris(cls, value: Any, info: ValidationInfo) -> Any:
        """Path() would quietly turn 's3://bucket/grids' into a local folder 's3:/bucket/grids':
        a URI in a path field becomes its mirror path (nic.storage), which every stage and Ray
        worker maps back to the object; an unsupported URI is an error naming it."""
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _names_files(field):
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(to_local(v) if isinstance(v, str) else v for v in value)
        return to_local(value) if isinstance(value, str) else value


def _names_files(field: Any) -> bool:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return _is_path_type(field.annotation) or bool(extra.get(LOCAL_PATH))


def path_fields(model: type[BaseModel]) -> list[tuple[str, bool]]:
    """(name, lazy) of a config's fields that name files or folders; `lazy` marks the str fields
    (slide lists, encoder names) whose files are fetched where they are opened."""
    found = []
    for name, field in model.model_fields.items():
        if _is_path_type(field.annotation):
            found.append((name, False))
        elif _names_files(field):
            found.append((name, True))
    return found


class RayOptions(NicModel):
    """Where and how a stage runs on Ray."""

    execution_fields = frozenset({"address", "num_cpus", "num_gpus", "resource_timeout_s"})

    address: str | None = Field(
        None,
        description="Ray cluster address (e.g. 'auto' or 'ray://head:10001'). Default: RAY_ADDRESS, "
        "else an embedded local Ray instance sized to this machine.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs for an embedded local instance (default: all of this machine)."
    )
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs for an embedded local instance (default: detected)."
    )
    resource_timeout_s: float = Field(
        300.0, ge=0, description="How long a stage waits for the CPUs/GPUs its workers ask for while other "
        "work holds them, before it fails with exit code 3 naming what it asked for and what holds them "
        "(a request larger than the whole cluster fails at once).",
    )


class StageConfig(NicModel):
    """Fields every stage has."""

    execution_fields = frozenset({"ray", "verbose"})

    ray: RayOptions = Field(default_factory=RayOptions, description="Ray connection options.")
    verbose: bool = Field(False, description="Show Ray's own logs and progress bars.")


def _parse_scalar(text: str) -> Any:
    """`--set key=value` values are YAML scalars, so `0.5`, `true`, `[a, b]` and `null` work."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):  # PyYAML raises ValueError for a date that is not one (2024-13-01)
        return text


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Turn `key.sub=value` strings into (dotted key, parsed value) pairs."""
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        pairs.append((key, _parse_scalar(value)))
    return pairs


def read_yaml(path: str | Path) -> dict:
    path = ensure_local(local_path(path), missing_ok=True)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: PyYAML's for a date that is not one (2024-13-01)
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The sub-model that owns the key at `loc`, to list its allowed keys in an error."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):  # an index into a list of models: the item's model is the same
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = unwrap_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key '{key}'"
            if hint:
                msg += f" (did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?)"
            if allowed:
                msg += f"; allowed keys here: {', '.join(allowed)}"
        else:
            msg = f"key '{key}': {err['msg']}"
            ctx = err.get("ctx") or {}
            if "expected" in ctx:
                msg += f" (allowed values: {ctx['expected']})"
            if "input" in err and not isinstance(err["input"], dict):
                msg += f"; got {err['input']!r}"
        lines.append("  - " + msg)
    return "\n".join(lines)


def load_config(
    model: type[BaseModel],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Any:
    """Build a config: YAML file, then flag values (dotted keys), then `--set` overrides.

    Later sources win. Every error names the file (or the flag) and the key.
    """
    data: dict = read_yaml(path) if path else {}
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    source = str(path) if path else "command line"
    if overrides or values:
        source += " with command-line values" if path else ""
    return build_config(model, data, source)


def build_config(model: type[BaseModel], data: dict, source: str) -> Any:
    """Validate a plain dict as `model`; errors name `source` (a file, or e.g. 'pipeline.encoders[1]')."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def dump_config(config: BaseModel) -> str:
    """YAML of a config with every default filled in, written next to each stage's outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
