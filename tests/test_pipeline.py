"""`nic pipeline`: config checks up front, then a tiny study end to end with its report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nic.cli.main import main
from nic.config.base import ConfigError, load_config
from nic.config.pipeline import PipelineConfig
from nic.pipeline import plan_pipeline
from study_configs import tiny_study, write_config

REPO = Path(__file__).resolve().parent.parent


def test_demo_config_plans_every_step():
    cfg = load_config(PipelineConfig, REPO / "configs" / "demo" / "pipeline.yaml")
    layout, steps, inputs = plan_pipeline(cfg)
    stages = [s.stage for s in steps]
    assert stages[0] == "synth"
    assert stages.count("train-encoder") == 2  # mtl + contrastive; mean-rgb needs no training
    assert stages.count("compress") == 3
    assert stages.count("train-downstream") == 9
    assert inputs["encoders"]["mean-rgb"] == "mean-rgb"
    comp = next(s for s in steps if s.stage == "compress")
    assert comp.config.slides == [str(layout.cohort / "slides")]


def test_a_typo_in_a_late_section_fails_before_anything_runs(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "o"), "downstream": {"epoch": 3}}))
    cfg = load_config(PipelineConfig, path)
    with pytest.raises(ConfigError) as err:
        plan_pipeline(cfg)
    assert "pipeline: downstream" in str(err.value) and "unknown key 'epoch'" in str(err.value)
    assert not (tmp_path / "o").exists()


def test_wired_paths_cannot_be_overridden(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"compress": {"out": "elsewhere"}}))
    with pytest.raises(ConfigError, match="set by the pipeline"):
        load_config(PipelineConfig, path)


def test_synth_or_data_but_not_neither(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"synth": None}))
    with pytest.raises(ConfigError, match="either 'synth'"):
        load_config(PipelineConfig, path)


@pytest.mark.integration
@pytest.mark.usefixtures("ray_session")
def test_tiny_study_end_to_end_and_resume(tmp_path):
    path = write_config(tiny_study(str(tmp_path / "study")), tmp_path / "pipeline.yaml")
    assert main(["pipeline", "--config", str(path)]) == 0

    root = tmp_path / "study"
    report = (root / "report.md").read_text()
    for heading in ("## Slide-level models", "## Encoders", "## Compression", "## Cohort",
                    "## Slides and their feature grids", "## Steps"):
        assert heading in report
    assert (root / "report" / "comparison.png").exists()
    for enc in ("mtl", "mean-rgb"):
        for target in ("growth", "survival"):
            assert (root / "models" / enc / target / "metrics.json").exists()
    # each step keeps its log in its own folder; pipeline.log holds every step's lines too
    pipeline_log = (root / "pipeline.log").read_text()
    assert "[pipeline] step 1/" in pipeline_log and "[synth] cohort in " in pipeline_log
    assert "--- resolved config ---" in (root / "models" / "mtl" / "growth" / "train-downstream.log").read_text()
    assert "[train-encoder] " in (root / "encoders" / "mtl" / "train-encoder.log").read_text()
    assert "[compress] done: " in (root / "grids" / "mtl" / "compress.log").read_text()

    # every image the report links exists
    import re

    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (root / link).exists(), link

    # a re-run skips finished work and rebuilds the same report
    encoder_json = root / "encoders" / "mtl" / "encoder.json"
    stamp = encoder_json.stat().st_mtime_ns
    assert main(["pipeline", "--config", str(path)]) == 0
    assert encoder_json.stat().st_mtime_ns == stamp
