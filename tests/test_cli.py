"""The `nic` command line: help for every stage, flags generated from the config models, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nic.cli.main import STAGES, build_parser, main


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage.name in out


def test_tile_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["tile", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--config", "--set", "--address", "--slides", "--out", "--thumbnail-px", "--strict"):
        assert flag in out
    assert "slide.tissue.threshold = 0.5" in out  # nested keys are listed with defaults
    assert "CSV files with a 'path' column" in out  # the field description is the help text


def test_flags_and_set_reach_the_config(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["tile", "--slides", "a.svs", "b", "--out", str(tmp_path),
                              "--set", "slide.tile_px=64", "--strict", "--address", "auto"])
    from nic.cli.main import config_from_args

    cfg = config_from_args(args)
    assert cfg.slides == ["a.svs", "b"]
    assert cfg.slide.tile_px == 64
    assert cfg.strict is True
    assert cfg.ray.address == "auto"


def test_bad_config_exits_2_with_message(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("slides: [x]\nout: o\nthumbnail_px: tiny\n")
    assert main(["tile", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "thumbnail_px" in err and str(bad) in err


def test_print_config_shows_defaults(capsys):
    assert main(["tile", "--slides", "x.svs", "--out", "o", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "target_mpp: 0.5" in out and "tile_px: 128" in out


def test_console_script_runs():
    exe = __import__("pathlib").Path(sys.executable).parent / "nic"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "tile" in result.stdout
