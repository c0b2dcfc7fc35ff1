"""Resume keys of stage configs, computed by the stages' own functions, for
tests/test_config_identity.py, and the script that wrote its pins.

`python tests/config_identity_keys.py CONFIGS_DIR OUT.json` loads the shipped configs found under
CONFIGS_DIR (and the stage configs the pipeline configs among them build), and writes each
config in full with its resume keys. The test rebuilds every config from that snapshot, not from
configs/, so editing a shipped config does not move a pin: only a change to how a stage turns a
config into its resume key (or a new result-changing field) does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from nic.config.base import load_config
from nic.config.compress import CompressConfig
from nic.config.downstream import TrainDownstreamConfig
from nic.config.encoder import TrainEncoderConfig
from nic.config.pipeline import PipelineConfig
from nic.config.synth import SynthConfig
from nic.config.tile import TileConfig

PINS = Path(__file__).resolve().parent / "data" / "config_identity_pins.json"
#: A stand-in for the grids' encoder and the labels: the pins are about the config's part of a key.
ENCODER_HASH = "e" * 64
LABELS = SimpleNamespace(frame=pd.DataFrame({"row": [2, 1], "slide_id": ["b", "a"], "target": [1.0, 0.5]}))
#: Shipped config file stems and the model each loads into.
MODELS: dict[str, type] = {"tile": TileConfig, "compress": CompressConfig, "train_encoder": TrainEncoderConfig,
                           "train_downstream": TrainDownstreamConfig, "synth": SynthConfig}
#: Pipeline steps pinned: the cohort, every encoder, and the first of the compress and downstream
#: steps of each kind (the others differ only in paths the pipeline wires).
PIPELINE_STEPS = ("synth", "train-encoder")


def stage_keys(config: Any) -> dict[str, str]:
    """Every resume key (or record hash) that a stage derives from this config, by name."""
    if isinstance(config, TileConfig):
        from nic.tiling.stage import options_hash_of

        return {"options_hash": options_hash_of(config)}
    if isinstance(config, CompressConfig):
        from nic.compress.stage import options_hash_of as compress_options_hash

        return {"options_hash": compress_options_hash(config)}
    if isinstance(config, TrainEncoderConfig):
        from nic.train.encoder_stage import training_config_hash

        return {"config_hash": training_config_hash(config, [])}
    if isinstance(config, TrainDownstreamConfig):
        from nic.train.downstream_stage import _run_hash, _run_parts

        return {"run_hash": _run_hash(config, ENCODER_HASH, LABELS),  # type: ignore[arg-type]
                "settings": _run_parts(config, ENCODER_HASH, LABELS)["settings"]}  # type: ignore[arg-type]
    if isinstance(config, SynthConfig):
        from nic.synth.labels import plan_cohort
        from nic.synth.stage import _patch_spec, _slide_spec, cohort_config_hash, spec_hash

        first = plan_cohort(config)[0][0]
        keys = {"cohort_config_hash": cohort_config_hash(config),
                "first_slide_spec": spec_hash(_slide_spec(first, config))}
        keys.update({f"patch_spec:{task}": _patch_spec(config, task) for task in config.patches.tasks})
        return keys
    raise TypeError(f"no resume key for {type(config).__name__}")


def shipped_configs(root: Path) -> Iterator[tuple[str, Any]]:
    """(label, stage config) for every config file under `root` with a stage of its own, and the
    pinned steps (PIPELINE_STEPS, and the first compress and downstream step per target kind) of
    every pipeline config."""
    from nic.pipeline import plan_pipeline

    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root).as_posix()
        model = next((m for stem, m in MODELS.items() if path.stem.startswith(stem)), None)
        if model is not None:
            yield rel, load_config(model, path)
        elif path.stem == "pipeline" or rel.startswith("studies/") and "tune" not in path.stem:
            _layout, steps, _inputs = plan_pipeline(load_config(PipelineConfig, path))
            seen: set[str] = set()
            for step in steps:
                kind = f"{step.stage}:{getattr(step.config, 'kind', '')}"
                if step.stage in PIPELINE_STEPS or kind not in seen:
                    seen.add(kind)
                    yield f"{rel} [{step.label}]", step.config


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """label -> {"model": "module:Class", "config": the config in full, "keys": its resume keys}."""
    return {label: {"model": f"{type(config).__module__}:{type(config).__name__}",
                    "config": config.model_dump(mode="json"), "keys": stage_keys(config)}
            for label, config in shipped_configs(root)}


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(snapshot(source), indent=1, sort_keys=True) + "\n")
