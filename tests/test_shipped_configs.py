"""Every file shipped under configs/ is a valid config of the stage it is for (a typo in a study
config would otherwise surface only an hour into a run): each is found (recursively), mapped to its
stage, and validated by `nic <stage> --config FILE --print-config`, which loads it into the stage's
config model (nic.cli.main.STAGES) and, for the stages made of other stages (pipeline, tune), each
section as it would run. Files the configs name that earlier stages make (runs/demo/cohort/...)
need not exist: loading a config checks types and values, not inputs. A new file that no rule maps
to a stage fails here until it is named <stage>*.yaml or listed in NAMED."""

from __future__ import annotations

from pathlib import Path

import pytest

from nic.cli.main import STAGES, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: File-name stems a config may start or end with, and the stage each drives.
BY_NAME = {"train_downstream": "train-downstream", "train_encoder": "train-encoder", "compress": "compress",
           "synth": "synth", "tile": "tile", "tune": "tune", "pipeline": "pipeline"}
#: Configs whose name does not say their stage (studies), by path under configs/.
NAMED = {"studies/tupac_like.yaml": "pipeline", "studies/transfer.yaml": "pipeline"}


def stage_of(path: Path) -> str | None:
    """The stage a shipped config drives: listed in NAMED, else from its file name; None if neither."""
    rel = path.relative_to(CONFIGS).as_posix()
    if rel in NAMED:
        return NAMED[rel]
    if path.suffix not in (".yaml", ".yml"):
        return None
    for stem, stage in BY_NAME.items():
        if path.stem.startswith(stem) or path.stem.endswith(stem):
            return stage
    return None


SHIPPED = sorted(p for p in CONFIGS.rglob("*") if p.is_file())


def test_configs_are_found_and_every_one_maps_to_a_stage():
    assert len(SHIPPED) >= 10
    assert {p.suffix for p in SHIPPED} <= {".yaml", ".yml"}, "only configs live under configs/"
    unmapped = [str(p.relative_to(CONFIGS)) for p in SHIPPED if stage_of(p) is None]
    assert not unmapped, f"configs/ files of no known stage: {unmapped}: name them <stage>*.yaml or add to NAMED"
    assert {stage_of(p) for p in SHIPPED} >= {"pipeline", "tune", "train-downstream", "train-encoder",
                                               "compress", "synth", "tile"}
    assert set(BY_NAME.values()) <= {s.name for s in STAGES}, "every mapped stage is a `nic` command"
    assert all((CONFIGS / rel).is_file() for rel in NAMED), "NAMED lists a file that is gone"


def test_a_new_config_of_no_known_stage_is_not_mapped():
    assert stage_of(CONFIGS / "studies" / "mystery.yaml") is None  # studies are not pipelines by default
    assert stage_of(CONFIGS / "demo" / "notes.md") is None
    assert stage_of(CONFIGS / "demo" / "train_encoder_small.yml") == "train-encoder"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates(path, capsys):
    stage = stage_of(path)
    assert stage is not None, f"{path}: cannot tell which stage it is for; name it <stage>*.yaml or add it to NAMED"
    code = main([stage, "--config", str(path), "--print-config"])
    captured = capsys.readouterr()
    assert code == 0, f"{path} ({stage}): {captured.err}"
    assert captured.out.strip(), f"{path} ({stage}): --print-config printed no config"


def test_a_typo_inside_a_study_section_is_caught_by_print_config(tmp_path, capsys):
    study = (CONFIGS / "studies" / "tupac_like.yaml").read_text()
    assert "crops_per_slide:" in study
    bad = tmp_path / "study.yaml"
    bad.write_text(study.replace("crops_per_slide:", "cropz_per_slide:"))
    assert main(["pipeline", "--config", str(bad), "--print-config"]) == 2
    assert "did you mean 'crops_per_slide'" in capsys.readouterr().err
    tune = (CONFIGS / "studies" / "tupac_like_tune.yaml").read_text()
    assert "\n  epochs:" in tune
    bad.write_text(tune.replace("\n  epochs:", "\n  epochz:"))
    assert main(["tune", "--config", str(bad), "--print-config"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err
