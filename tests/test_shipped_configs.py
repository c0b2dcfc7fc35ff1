"""Every YAML shipped under configs/ is a valid config of the stage it is for (a typo in a study
config would otherwise surface only an hour into a run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nic.cli.main import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STAGES = ("train_downstream", "train_encoder", "compress", "synth", "tile", "tune", "pipeline")


def stage_of(path: Path) -> str:
    """The stage a shipped config drives, from its file name (a study without one is a pipeline)."""
    name = path.stem
    for stage in STAGES:
        if name.startswith(stage) or name.endswith(stage):
            return stage.replace("_", "-")
    assert path.parent.name == "studies", f"{path}: cannot tell which stage it is for; name it <stage>*.yaml"
    return "pipeline"


SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_are_found():
    assert len(SHIPPED) >= 10
    assert {stage_of(p) for p in SHIPPED} >= {"pipeline", "tune", "train-downstream", "synth"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates(path, capsys):
    code = main([stage_of(path), "--config", str(path), "--print-config"])
    err = capsys.readouterr().err
    assert code == 0, f"{path} ({stage_of(path)}): {err}"


def test_a_typo_inside_a_study_section_is_caught_by_print_config(tmp_path, capsys):
    study = (CONFIGS / "studies" / "tupac_like.yaml").read_text()
    assert "crops_per_slide:" in study
    bad = tmp_path / "study.yaml"
    bad.write_text(study.replace("crops_per_slide:", "cropz_per_slide:"))
    assert main(["pipeline", "--config", str(bad), "--print-config"]) == 2
    assert "did you mean 'crops_per_slide'" in capsys.readouterr().err
    tune = (CONFIGS / "studies" / "tupac_like_tune.yaml").read_text()
    bad.write_text(tune.replace("  epochs: 3", "  epochz: 3"))
    assert main(["tune", "--config", str(bad), "--print-config"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err
