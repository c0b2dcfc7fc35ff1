"""Config loading: YAML + flags + --set, and errors that name the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from nic.config import ConfigError, load_config
from nic.config.tile import TileConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tile.yaml"
    path.write_text(text)
    return path


def test_yaml_then_flags_then_set_override_in_that_order(tmp_path):
    path = write(tmp_path, "slides: [a.svs]\nout: o\nslide:\n  tile_px: 64\n")
    cfg = load_config(TileConfig, path, overrides=["slide.tile_px=256", "slide.tissue.threshold=0.25"],
                      values={"out": "from-flag"})
    assert cfg.slide.tile_px == 256
    assert cfg.slide.tissue.threshold == 0.25
    assert str(cfg.out) == "from-flag"
    assert cfg.slides == ["a.svs"]
    assert cfg.slide.target_mpp == 0.5  # default kept


def test_unknown_key_names_file_key_suggestion_and_allowed_keys(tmp_path):
    path = write(tmp_path, "slides: [a.svs]\nout: o\nslide:\n  tile_pz: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(TileConfig, path)
    msg = str(err.value)
    assert str(path) in msg
    assert "unknown key 'slide.tile_pz'" in msg
    assert "did you mean 'slide.tile_px'" in msg
    assert "target_mpp" in msg  # allowed keys listed


def test_bad_value_names_key_and_value(tmp_path):
    path = write(tmp_path, "slides: [a.svs]\nout: o\nslide:\n  tissue:\n    threshold: 1.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(TileConfig, path)
    msg = str(err.value)
    assert "slide.tissue.threshold" in msg and "1.5" in msg and str(path) in msg


def test_missing_required_key_is_reported(tmp_path):
    path = write(tmp_path, "out: o\n")
    with pytest.raises(ConfigError, match="key 'slides'"):
        load_config(TileConfig, path)


def test_set_requires_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TileConfig, None, overrides=["slide.tile_px"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TileConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("slides: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TileConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TileConfig, listy)


def test_shipped_configs_are_valid():
    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(TileConfig, repo / "configs" / "tile.yaml")
    assert cfg.slide.tile_px == 128


def test_unknown_key_inside_a_list_item_gets_a_hint(tmp_path):
    from nic.config.pipeline import PipelineConfig

    path = tmp_path / "p.yaml"
    path.write_text("encoders:\n  - name: a\n    kind: mtl\n    setings: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(PipelineConfig, path)
    assert "did you mean 'encoders.0.settings'" in str(err.value)
