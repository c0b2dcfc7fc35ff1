"""Every trainable encoder kind runs end to end through `nic train-encoder` on the shared Ray
instance and produces a loadable encoder (one worker, one short epoch each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nic.cli.main import main
from nic.encoders import load_encoder
from test_patches_data import write_folder_task

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PX = 64


@pytest.fixture(scope="module")
def tasks_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinds")
    write_folder_task(root / "tissue", ["stroma", "tumour"], 12, PX, seed=1)
    (root / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "tissue_type", "kind": "multiclass", "classes": ["stroma", "tumour"], "format": "folder",
         "path": "tissue"}]}))
    return root / "tasks.yaml"


@pytest.mark.parametrize("kind", ["vae", "bigan", "contrastive"])
def test_unsupervised_kind_trains_and_writes_an_encoder(ray_session, tasks_yaml: Path, tmp_path: Path,
                                                        kind: str) -> None:
    out = tmp_path / kind
    code = main(["train-encoder", "--tasks", str(tasks_yaml), "--kind", kind, "--out", str(out),
                 "--tile-px", str(PX), "--embedding-dim", "16", "--epochs", "2", "--batch-size", "8",
                 "--max-steps-per-epoch", "2", "--num-workers", "1"])
    assert code == 0
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["kind"] == kind and meta["embedding_dim"] == 16
    assert meta["tasks"][0]["labels_used"] is False
    assert np.isfinite(meta["metrics"]["val_loss"])
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(h["steps"] == 2 for h in history)
    module, info = load_encoder(out)
    emb = module(torch.randint(0, 256, (3, 3, PX, PX), dtype=torch.uint8))
    assert emb.shape == (3, 16) and torch.isfinite(emb).all()
    assert not (out / "heads.pt").exists()
