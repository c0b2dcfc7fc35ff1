"""Config loading: YAML + flags + --set, and errors that name the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nic.config import ConfigError, load_config
from nic.config.base import parse_overrides
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
    # PyYAML raises a plain ValueError for a date that is no date: still a config error naming the file
    dated = tmp_path / "dated.yaml"
    dated.write_text("slides: 2024-13-01\n")
    with pytest.raises(ConfigError, match=r"dated\.yaml: not valid YAML.*month"):
        load_config(TileConfig, dated)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00slides")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not valid YAML"):
        load_config(TileConfig, binary)
    # on the command line the same text is kept as a string, as any other value YAML cannot parse
    assert parse_overrides(["note=2024-13-01"]) == [("note", "2024-13-01")]


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


_URI_CASES = [
    ("compress", "out", "s3://bucket/grids"),
    ("compress", "slides", ["/data/a.svs", "s3://bucket/b.svs"]),
    ("compress", "encoder", "gs://bucket/encoders/mtl"),
    ("train-downstream", "grids", "s3://bucket/grids"),
    ("train-encoder", "out", "s3://bucket/encoder"),
    ("tile", "slides", ["s3://bucket/slides"]),
    ("tune", "out", "abfs://container/tune"),
    ("pipeline", "out", "s3://bucket/study"),
]


def _stage_config(stage: str, key: str, value, tmp_path):
    import importlib

    from nic.cli.main import STAGES

    base = {
        "compress": {"slides": ["/data"], "encoder": "mean-rgb", "out": str(tmp_path / "g")},
        "train-downstream": {"grids": str(tmp_path / "g"), "labels": str(tmp_path / "l.csv"), "kind": "survival",
                             "out": str(tmp_path / "m")},
        "train-encoder": {"tasks": str(tmp_path / "t.yaml"), "out": str(tmp_path / "e")},
        "tile": {"slides": ["/data"], "out": str(tmp_path / "t")},
        "tune": {"tasks": str(tmp_path / "t.yaml"), "slides": ["/data"], "labels": str(tmp_path / "l.csv"),
                 "kind": "survival", "out": str(tmp_path / "u")},
        "pipeline": {"out": str(tmp_path / "p")},
    }[stage]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, key: value}))
    module, name = next(s for s in STAGES if s.name == stage).config.split(":")
    return load_config(getattr(importlib.import_module(module), name), path)


@pytest.mark.parametrize("stage, key, value", _URI_CASES)
def test_object_store_uris_become_mirror_paths_not_mangled_folders(stage, key, value, tmp_path):
    """Path('s3://b/x') is the local folder 's3:/b/x'; every path key keeps a URI as its mirror
    path instead, which maps back to the URI on any node (nic.storage)."""
    from nic.storage import mirror_path, uri_for

    config = _stage_config(stage, key, value, tmp_path)
    got = getattr(config, key)
    for given, kept in zip(value if isinstance(value, list) else [value], got if isinstance(got, list) else [got]):
        if "://" in given:
            assert Path(kept) == mirror_path(given)
            assert uri_for(kept) == given
        else:
            assert str(kept) == given
    assert not any(p.name.endswith(":") for p in tmp_path.iterdir())


@pytest.mark.parametrize("value, problem", [
    ("ftp://host/grids", "unsupported URI scheme 'ftp://'"),
    ("s3://bucket/grids?endpoint_override=x", "options in the URI are not supported"),
    ("s3:///grids", "no bucket"),
])
def test_unusable_uris_are_refused_by_name(value, problem, tmp_path):
    with pytest.raises(ConfigError) as err:
        _stage_config("compress", "out", value, tmp_path)
    message = str(err.value)
    assert "out" in message and value in message and problem in message
