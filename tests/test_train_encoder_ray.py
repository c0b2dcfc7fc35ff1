"""Encoder training on the shared Ray instance: a 2-worker DDP run, and resume after a worker is
really killed (SIGKILL) mid-run with FailureConfig(max_failures=1)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
import yaml

from nic.config.encoder import TrainEncoderConfig
from nic.encoders import load_encoder
from nic.train.encoder_stage import train_encoder
from test_patches_data import write_folder_task, write_hdf5_task

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The epoch hooks below are defined in this test module, which Ray workers cannot import: ship
# them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PX = 64  # the reference trunk works on 64 x 64 anyway; smaller tiles keep these runs quick


def _tasks(root: Path) -> Path:
    write_folder_task(root / "tissue", ["stroma", "tumour", "fat"], 16, PX, seed=1)
    labels = np.random.default_rng(0).integers(0, 2, 40)
    write_hdf5_task(root / "tumour.h5", labels, PX, seed=2)
    spec = {"tasks": [
        {"name": "tissue_type", "kind": "multiclass", "classes": ["stroma", "tumour", "fat"], "format": "folder",
         "path": "tissue"},
        {"name": "tumour", "kind": "binary", "format": "hdf5", "path": "tumour.h5", "weight": 0.5},
    ]}
    (root / "tasks.yaml").write_text(yaml.safe_dump(spec))
    return root / "tasks.yaml"


def _config(tmp_path: Path, **kw) -> TrainEncoderConfig:
    values = dict(tasks=_tasks(tmp_path / "data"), out=tmp_path / "enc", tile_px=PX, embedding_dim=32,
                  batch_size=16, epochs=2, num_workers=2, seed=0, augment={"blur_prob": 0.0})
    values.update(kw)
    return TrainEncoderConfig(**values)


def _record(log: Path):
    def hook(epoch: int, rank: int) -> None:
        import ray.train

        world = ray.train.get_context().get_world_size()
        with open(log, "a") as f:
            f.write(f"{epoch} {rank} {world} {os.getpid()}\n")

    return hook


def test_two_worker_ddp_run_writes_a_complete_encoder(ray_session, tmp_path: Path) -> None:
    log = tmp_path / "epochs.log"
    config = _config(tmp_path)
    info = train_encoder(config, epoch_hook=_record(log))
    rows = [line.split() for line in log.read_text().splitlines()]
    assert sorted((int(e), int(r)) for e, r, _, _ in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert {int(w) for _, _, w, _ in rows} == {2}
    assert len({pid for _, r, _, pid in rows if r == "0"} | {pid for _, r, _, pid in rows if r == "1"}) == 2

    out = config.out
    assert {p.name for p in out.iterdir()} >= {"encoder.json", "encoder.pt", "heads.pt", "history.json"}
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["kind"] == "mtl" and meta["embedding_dim"] == 32 and meta["tile_px"] == PX
    assert [t["name"] for t in meta["tasks"]] == ["tissue_type", "tumour"]
    for key in ("val_loss", "tissue_type/acc", "tumour/auc", "tumour/acc", "epoch"):
        assert key in meta["metrics"]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(h["steps"] > 0 for h in history)
    assert meta["metrics"]["epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]  # best weights kept
    module, loaded = load_encoder(out)
    assert loaded.content_hash == info.content_hash
    assert module(torch.zeros(2, 3, PX, PX, dtype=torch.uint8)).shape == (2, 32)
    heads = torch.load(out / "heads.pt", weights_only=False)
    assert set(heads["heads"]) >= {"tissue_type.weight", "tumour.weight"}


def test_resume_after_a_worker_is_killed(ray_session, tmp_path: Path) -> None:
    log = tmp_path / "epochs.log"
    marker = tmp_path / "killed"
    config = _config(tmp_path, epochs=3, max_failures=1, patience=5)
    run_dir = config.out / "checkpoints"

    def kill_once(epoch: int, rank: int) -> None:
        with open(log, "a") as f:
            f.write(f"{epoch} {rank} {time.time():.1f}\n")
        if epoch == 2 and rank == 0 and not marker.exists():
            # Wait until Ray Train has committed the epoch-1 checkpoint, then die like a crashed node.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                snapshots = list(run_dir.glob("*/checkpoint_manager_snapshot.json"))
                if snapshots and "checkpoint_" in snapshots[0].read_text():
                    break
                time.sleep(0.2)
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    train_encoder(config, epoch_hook=kill_once)
    assert marker.exists()
    rank0 = [int(line.split()[0]) for line in log.read_text().splitlines() if line.split()[1] == "0"]
    # Epoch 1 ran once; epoch 2 started, was killed, and ran again from the epoch-1 checkpoint.
    assert rank0 == [1, 2, 2, 3]
    history = json.loads((config.out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    meta = json.loads((config.out / "encoder.json").read_text())
    assert meta["epochs_trained"] == 3

    # Running the same command again finds the complete artifact and does not train.
    log.unlink()
    again = train_encoder(config, epoch_hook=kill_once)
    assert again.content_hash == meta["content_hash"] and not log.exists()
