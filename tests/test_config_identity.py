"""Config identity: which settings of a stage config change its results (and so its resume key)
and which only change how it runs (issue 17 item 5).

tests/data/config_identity_pins.json holds the shipped configs (configs/ at commit fd5b6db, and the
stage configs its pipeline configs build) in full, each with the resume keys the stages computed
for it before config identity had one home. A completed encoder, grid store, tile set, fold or
synthetic cohort made then is found complete now only while these keys stay equal. A failure here
means existing outputs would be re-run (or outputs of other settings would pass as complete):
change a pin only on purpose, and say why in the commit message. Adding a result-changing field
to a stage config fails here too, since every existing key then covers one more value.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import nic.config
from config_identity_keys import PINS, stage_keys
from nic.config.base import NicModel, RayOptions, StageConfig
from nic.config.identity import (
    UnclassifiedFieldError,
    classification_problems,
    config_identity,
    field_roles,
)
from nic.config.pipeline import PipelineConfig
from nic.config.synth import SynthConfig

SNAPSHOT: dict[str, dict[str, Any]] = json.loads(PINS.read_text())


def _config(entry: dict[str, Any]) -> Any:
    module, name = entry["model"].split(":")
    return getattr(importlib.import_module(module), name).model_validate(entry["config"])


def test_the_snapshot_covers_every_stage_with_a_resume_key() -> None:
    models = {entry["model"].rsplit(":", 1)[1] for entry in SNAPSHOT.values()}
    assert models == {"TileConfig", "CompressConfig", "TrainEncoderConfig", "TrainDownstreamConfig", "SynthConfig"}
    assert sum(len(entry["keys"]) for entry in SNAPSHOT.values()) >= 70


@pytest.mark.parametrize("label", sorted(SNAPSHOT))
def test_resume_keys_of_shipped_configs_are_unchanged(label: str) -> None:
    entry = SNAPSHOT[label]
    assert stage_keys(_config(entry)) == entry["keys"], (
        f"{label}: a resume key changed, so outputs made with this config would no longer resume "
        "(or outputs of other settings would pass as complete)")


# ------------------------------------------------------------------ every field is classified


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def config_models() -> list[type[BaseModel]]:
    """Every pydantic model defined in nic.config, and every model its fields hold, at any depth."""
    found: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = []
    for info in pkgutil.iter_modules(nic.config.__path__, "nic.config."):
        module = importlib.import_module(info.name)
        todo += [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, BaseModel)
                 and obj.__module__.startswith("nic.config")]
    while todo:
        model = todo.pop()
        name = f"{model.__module__}.{model.__qualname__}"
        if name not in found:
            found[name] = model
            todo += [m for field in model.model_fields.values() for m in _models_in(field.annotation)]
    return [found[name] for name in sorted(found)]


MODELS = config_models()


def test_the_walk_finds_the_stage_configs_and_their_nested_models() -> None:
    names = {m.__name__ for m in MODELS}
    assert {"TileConfig", "CompressConfig", "TrainEncoderConfig", "TrainDownstreamConfig", "SynthConfig",
            "TuneConfig", "PipelineConfig"} <= names
    assert {"RayOptions", "SlideOptions", "TissueOptions", "AugmentOptions", "PatchOptions", "EncoderRun",
            "Range"} <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_of_every_config_model_is_classified(model: type[BaseModel]) -> None:
    """A field in neither set would silently enter resume keys (forcing re-runs) or be left out
    of them (letting stale outputs pass): each is declared identity or execution, once."""
    assert classification_problems(model) == []
    assert set(field_roles(model)) == set(model.model_fields)


def test_a_model_with_an_unclassified_field_fails_when_it_is_created() -> None:
    with pytest.raises(UnclassifiedFieldError, match=r"\['threads'\] are in neither identity_fields"):
        class Options(StageConfig):
            identity_fields = frozenset({"seed"})
            seed: int = 0
            threads: int = 1


def test_a_misspelt_or_doubly_classified_field_fails_when_the_model_is_created() -> None:
    with pytest.raises(UnclassifiedFieldError, match=r"classifies \['sed'\], which are not its fields"):
        class Typo(NicModel):
            identity_fields = frozenset({"seed", "sed"})
            seed: int = 0
    with pytest.raises(UnclassifiedFieldError, match="as both identity and execution"):
        class Both(NicModel):
            identity_fields = frozenset({"seed"})
            execution_fields = frozenset({"seed"})
            seed: int = 0


def test_config_identity_refuses_a_model_that_classifies_nothing() -> None:
    class Loose(BaseModel):
        seed: int = 0

    with pytest.raises(UnclassifiedFieldError, match="Loose"):
        config_identity(Loose())


# ------------------------------------------------------------------ what config_identity keeps


def test_config_identity_drops_execution_fields_at_every_depth() -> None:
    config = SynthConfig(out="elsewhere", strict=True, ray=RayOptions(num_cpus=3), seed=4)
    identity = config_identity(config)
    assert identity["seed"] == 4 and identity["patches"]["chunk_canvases"] == 16
    assert not {"out", "strict", "ray", "verbose"} & set(identity)
    assert identity == {k: v for k, v in config.model_dump(mode="json").items()
                        if k not in {"out", "strict", "ray", "verbose"}}

    pipeline = PipelineConfig(out="p", title="t")
    identity = config_identity(pipeline)
    assert [run.get("name") for run in identity["encoders"]] == [None, None, None]  # names: execution, in a list
    assert [run["kind"] for run in identity["encoders"]] == ["mtl", "contrastive", "mean-rgb"]
    assert "title" not in identity and "out" not in identity


def _sample(annotation: Any) -> Any:
    """A value of a field's type, for a field that is None."""
    for arg in typing.get_args(annotation) or (annotation,):
        origin = typing.get_origin(arg)
        if origin is typing.Literal:
            return typing.get_args(arg)[0]
        if origin is list or arg is list:
            return ["x"]
        if origin is dict:
            return {"x": 1.0}
        if arg is bool:
            return True
        if arg in (int, float, str, Path):
            return arg(3) if arg in (int, float) else arg("x")
    raise TypeError(f"no sample value of {annotation}")


def _changed(value: Any, annotation: Any = None) -> Any:
    """Another value of the same type, unvalidated: only its effect on the keys matters here."""
    if value is None:
        return _sample(annotation)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, Path):
        return value / "moved"
    if isinstance(value, str):
        return value + "-moved"
    if isinstance(value, list):
        return [*value, value[0]] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "moved": 1.0}
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return value.model_copy(update={n: _changed(getattr(value, n), f.annotation) for n, f in fields.items()})
    raise TypeError(f"no changed value for {value!r}")


def _moved(config: BaseModel, name: str) -> BaseModel:
    return config.model_copy(update={name: _changed(getattr(config, name), type(config).model_fields[name].annotation)})


@pytest.mark.parametrize("label", sorted(SNAPSHOT))
def test_execution_fields_leave_every_resume_key_unchanged(label: str) -> None:
    """The stages derive their keys from the classification: any execution field, changed, keeps
    complete outputs complete."""
    config = _config(SNAPSHOT[label])
    keys = stage_keys(config)
    for name, identity in field_roles(type(config)).items():
        if not identity:
            assert stage_keys(_moved(config, name)) == keys, f"{label}: execution field {name} moved a resume key"


def test_identity_fields_of_whole_config_keys_each_move_the_key() -> None:
    """Where a key covers the whole config (encoder, synth cohort), each identity field is in it."""
    from nic.synth.stage import cohort_config_hash
    from nic.train.encoder_stage import training_config_hash

    for label, key in (("train_encoder.yaml", lambda c: training_config_hash(c, [])),
                       ("synth.yaml", cohort_config_hash)):
        config = _config(SNAPSHOT[label])
        for name, identity in field_roles(type(config)).items():
            if identity:
                assert key(_moved(config, name)) != key(config), f"{label}: identity field {name} left its key"
