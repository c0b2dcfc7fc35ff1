"""Config identity: which settings decide what a stage makes, and which only how it runs.

A stage skips work it finds complete by comparing a hash stored with its outputs against the hash
of the current settings (the resume key: docs/architecture.md, each stage's "resume key"). A
setting in that hash that only changes how a run goes (workers, paths, retries) forces needless
re-runs when it changes; a setting left out that changes the result lets stale outputs pass as
complete. So every config model says, for each field it declares, which it is:

    class CompressConfig(StageConfig):
        identity_fields = frozenset({"slides", "encoder", "slide", "dihedral", "heads", ...})
        execution_fields = frozenset({"out", "batch_size", "use_gpu", "overwrite", ...})

- identity: a change makes outputs made before stale, so it is part of the resume key;
- execution: a change leaves earlier outputs valid: where and how the stage runs, how fast, what
  it reports or exits with (and a few settings that move results only in the last bits, such as
  compress's mixed_precision, by design; each says so beside its set).

A model names only its own fields; a subclass inherits its bases' classification. A model that
classifies any field must classify all of them, checked when the class is created (NicModel), so
a new field without a class fails at import; tests/test_config_identity.py walks every model of
nic.config (nested ones too) and requires each to be classified. `config_identity` is the one way
to turn a config into what a resume key covers, and `nic.artifacts.stable_hash` the one hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

IDENTITY_ATTR = "identity_fields"
EXECUTION_ATTR = "execution_fields"


class UnclassifiedFieldError(TypeError):
    """A config model field that is neither identity nor execution (or both, or not a field)."""


def field_roles(model: type[BaseModel]) -> dict[str, bool]:
    """Field name -> True for identity, False for execution, from the model's and its bases'
    declarations (each class declares only the fields it adds)."""
    roles: dict[str, bool] = {}
    for klass in reversed(model.__mro__):
        for name in klass.__dict__.get(IDENTITY_ATTR, ()):
            roles[name] = True
        for name in klass.__dict__.get(EXECUTION_ATTR, ()):
            roles[name] = False
    return roles


def classification_problems(model: type[BaseModel]) -> list[str]:
    """What is wrong with a model's classification: unclassified fields, names in both sets, names
    that are no field of the model (a typo); empty when every field is classified once."""
    problems = []
    for klass in model.__mro__:
        both = set(klass.__dict__.get(IDENTITY_ATTR, ())) & set(klass.__dict__.get(EXECUTION_ATTR, ()))
        if both:
            problems.append(f"{klass.__name__} lists {sorted(both)} as both identity and execution")
    roles = field_roles(model)
    unknown = sorted(set(roles) - set(model.model_fields))
    if unknown:
        problems.append(f"{model.__name__} classifies {unknown}, which are not its fields")
    missing = [name for name in model.model_fields if name not in roles]
    if missing:
        problems.append(
            f"{model.__name__}: {missing} are in neither {IDENTITY_ATTR} (a change makes earlier outputs "
            f"stale: part of the resume key) nor {EXECUTION_ATTR} (a change only alters how the stage runs); "
            "add each to one (nic.config.identity)")
    return problems


def check_classified(model: type[BaseModel], *, required: bool) -> None:
    """Raise UnclassifiedFieldError unless every field of `model` is classified exactly once.
    With `required=False` a model that classifies nothing at all passes (NicModels that are not
    stage configs: tasks.yaml entries, encoder specs)."""
    if not required and not field_roles(model):
        return
    problems = classification_problems(model)
    if problems:
        raise UnclassifiedFieldError("; ".join(problems))


def _exclusions(config: BaseModel) -> dict[Any, Any]:
    """The pydantic `exclude` spec that drops every execution field, at every depth."""
    check_classified(type(config), required=True)
    spec: dict[Any, Any] = {}
    for name, identity in field_roles(type(config)).items():
        if not identity:
            spec[name] = True
            continue
        nested = _nested_exclusions(getattr(config, name))
        if nested:
            spec[name] = nested
    return spec


def _nested_exclusions(value: Any) -> dict[Any, Any]:
    """Exclusions inside an identity field's value: a model, or models in a list or mapping."""
    if isinstance(value, BaseModel):
        return _exclusions(value)
    if isinstance(value, (list, tuple)):
        items = {i: _nested_exclusions(v) for i, v in enumerate(value)}
    elif isinstance(value, Mapping):
        items = {k: _nested_exclusions(v) for k, v in value.items()}
    else:
        return {}
    return {k: v for k, v in items.items() if v}


def config_identity(config: BaseModel) -> dict[str, Any]:
    """The config as JSON-able data without its execution fields (nested models included): what
    a stage's resume key covers. Serialised by the model itself (`model_dump(mode="json")`), so
    the values, and the hashes made of them, are those the stages have always computed."""
    return config.model_dump(mode="json", exclude=_exclusions(config) or None)
