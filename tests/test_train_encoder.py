"""`nic train-encoder` without Ray: config, hashing, early stopping, progress lines, built-in kinds,
skipping a complete artifact, and clear errors for bad data."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from nic.cli.main import build_parser, config_from_args, main
from nic.config.base import ConfigError, load_config
from nic.config.encoder import TrainEncoderConfig
from nic.encoders import load_encoder
from nic.train.common import EarlyStopping, epoch_line, load_checkpoint, path_fingerprint, save_checkpoint
from nic.train.encoder_stage import selected_tasks, training_config_hash
from test_patches_data import write_cohort, write_folder_task


def test_config_requires_tasks_for_trained_kinds_and_validates_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind 'mtl' needs 'tasks'"):
        load_config(TrainEncoderConfig, values={"kind": "mtl"})
    with pytest.raises(ConfigError, match="key 'kind'"):
        load_config(TrainEncoderConfig, values={"kind": "autoencoder", "tasks": "t.yaml"})
    with pytest.raises(ConfigError, match="unknown key 'augment.hed'"):
        load_config(TrainEncoderConfig, values={"tasks": "t.yaml"}, overrides=["augment.hed=0.1"])
    config = load_config(TrainEncoderConfig, values={"kind": "random"})
    assert config.tasks is None and config.embedding_dim == 128


def test_cli_flags_and_dotted_overrides(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["train-encoder", "--tasks", "t.yaml", "--kind", "vae", "--tasks-subset", "a", "b",
                              "--epochs", "3", "--set", "task_weights.a=2.5", "--set", "augment.hed_sigma=0.1",
                              "--use-gpu"])
    config = config_from_args(args)
    assert config.kind == "vae" and config.tasks_subset == ["a", "b"] and config.epochs == 3
    assert config.task_weights == {"a": 2.5} and config.augment.hed_sigma == 0.1 and config.use_gpu


def test_shipped_configs_load() -> None:
    repo = Path(__file__).resolve().parent.parent
    for name in ("configs/train_encoder.yaml", "configs/demo/train_encoder.yaml"):
        config = load_config(TrainEncoderConfig, repo / name)
        assert config.kind == "mtl"


def test_config_hash_tracks_what_is_learned(tmp_path: Path) -> None:
    tasks_yaml = write_cohort(tmp_path, per_class=2, px=32)
    base = TrainEncoderConfig(tasks=tasks_yaml, tile_px=32)
    h = training_config_hash(base, selected_tasks(base))
    same = base.model_copy(update={"out": tmp_path / "elsewhere", "max_failures": 3, "storage_path": tmp_path})
    assert training_config_hash(same, selected_tasks(same)) == h
    lr = base.model_copy(update={"lr": 0.01})
    assert training_config_hash(lr, selected_tasks(lr)) != h
    subset = base.model_copy(update={"tasks_subset": ["tumour"]})
    assert training_config_hash(subset, selected_tasks(subset)) != h
    weights = base.model_copy(update={"task_weights": {"tumour": 2.0}})
    assert training_config_hash(weights, selected_tasks(weights)) != h
    # Changing the data behind an unchanged tasks.yaml changes the hash too.
    before = path_fingerprint(tmp_path / "patches" / "tissue")
    write_folder_task(tmp_path / "patches" / "tissue", ["stroma"], 3, 32, seed=7)
    assert path_fingerprint(tmp_path / "patches" / "tissue") != before
    assert training_config_hash(base, selected_tasks(base)) != h


def test_early_stopping_and_its_state() -> None:
    stop = EarlyStopping(patience=2)
    assert stop.update(1.0, 1) and not stop.should_stop
    assert stop.update(0.8, 2)
    assert not stop.update(0.85, 3) and not stop.should_stop
    assert not stop.update(float("nan"), 4) and stop.should_stop
    assert stop.best == 0.8 and stop.best_epoch == 2
    again = EarlyStopping(patience=2)
    again.load_state_dict(stop.state_dict())
    assert again.should_stop and again.best_epoch == 2
    maxi = EarlyStopping(patience=1, mode="max")
    assert maxi.update(0.5, 1) and maxi.update(0.6, 2) and not maxi.update(0.55, 3) and maxi.should_stop


def test_epoch_line_and_checkpoint_helpers(tmp_path: Path) -> None:
    line = epoch_line("train-encoder", 3, 10, {"loss": 0.41, "val_loss": 0.38, "tissue_type/acc": 0.93}, 12.34)
    assert line == "[train-encoder] epoch 3/10 loss 0.41 val_loss 0.38 tissue_type acc 0.93 (12.3 s)"
    save_checkpoint(tmp_path, {"epoch": 2, "w": torch.ones(3)})
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.ones(3))
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "none")


def test_builtin_kinds_write_artifacts_and_skip_when_complete(tmp_path: Path, capsys) -> None:
    out = tmp_path / "random_enc"
    assert main(["train-encoder", "--kind", "random", "--out", str(out), "--embedding-dim", "16", "--seed", "3"]) == 0
    info = json.loads((out / "encoder.json").read_text())
    assert info["kind"] == "random" and info["embedding_dim"] == 16 and info["seed"] == 3
    module, loaded = load_encoder(out)
    x = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    assert module(x).shape == (2, 16)
    first_mtime = (out / "encoder.json").stat().st_mtime_ns
    time.sleep(0.01)
    assert main(["train-encoder", "--kind", "random", "--out", str(out), "--embedding-dim", "16", "--seed", "3"]) == 0
    assert "skipping" in capsys.readouterr().err
    assert (out / "encoder.json").stat().st_mtime_ns == first_mtime
    assert main(["train-encoder", "--kind", "random", "--out", str(out), "--embedding-dim", "16", "--seed", "3",
                 "--overwrite"]) == 0
    assert (out / "encoder.json").stat().st_mtime_ns != first_mtime

    assert main(["train-encoder", "--kind", "mean-rgb", "--out", str(tmp_path / "mean")]) == 0
    module, info = load_encoder(tmp_path / "mean")
    assert info.embedding_dim == 3 and info.weights is None
    assert torch.allclose(module(x), x.float().mean(dim=(2, 3)) / 127.5 - 1, atol=1e-5)


def test_bad_patch_data_fails_before_training_with_the_file_named(tmp_path: Path, capsys) -> None:
    tasks_yaml = write_cohort(tmp_path, per_class=3, px=32)
    bad = tmp_path / "patches" / "tissue" / "fat" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG broken")
    code = main(["train-encoder", "--tasks", str(tasks_yaml), "--out", str(tmp_path / "enc"), "--tile-px", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "zz_broken.png: unreadable image" in err
    assert not (tmp_path / "enc" / "encoder.json").exists()
    os.remove(bad)
    code = main(["train-encoder", "--tasks", str(tasks_yaml), "--out", str(tmp_path / "enc"), "--tile-px", "32",
                 "--tasks-subset", "nope"])
    assert code == 2 and "unknown task 'nope'" in capsys.readouterr().err
