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
from typing import Any

import pytest

from config_identity_keys import PINS, stage_keys

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
