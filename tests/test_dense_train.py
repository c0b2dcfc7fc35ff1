"""A tiny dense multitask run through the real `nic train-encoder` path on Ray Train: a patch task,
a segmentation task (PNG pairs) and a typed nuclei task (HDF5) in mixed batches on two DDP workers
(so a decoder can be unused on one worker's batch while used on the other's); encoder.json gets the
dense metrics, the progress lines show them, the grid-facing encoder is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nic.encoders import load_encoder
from test_dense_data import NUCLEUS_TYPES, synthetic_nuclei, synthetic_regions, write_dense_h5, write_pairs
from test_patches_data import write_hdf5_task

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PX = 64


def _tasks(root: Path) -> Path:
    write_hdf5_task(root / "tumour.h5", np.random.default_rng(0).integers(0, 2, 20), PX, seed=1)
    x, y = synthetic_regions(20, PX, seed=2)
    write_pairs(root / "regions", x, y)
    xn, inst, types = synthetic_nuclei(20, PX, seed=3)
    write_dense_h5(root / "cells.h5", xn, inst, types)
    spec = {"tasks": [
        {"name": "tumour", "kind": "binary", "format": "hdf5", "path": "tumour.h5"},
        {"name": "regions", "kind": "segmentation", "classes": ["glass", "light", "dark"], "format": "folder",
         "path": "regions"},
        {"name": "cells", "kind": "nuclei", "classes": NUCLEUS_TYPES, "format": "hdf5", "path": "cells.h5",
         "weight": 2.0},
    ]}
    (root / "tasks.yaml").write_text(yaml.safe_dump(spec))
    return root / "tasks.yaml"


def test_tiny_dense_mtl_run_writes_dense_metrics(ray_session, tmp_path: Path, capfd) -> None:
    from nic.cli.main import main

    out = tmp_path / "enc"
    argv = ["train-encoder", "--tasks", str(_tasks(tmp_path / "data")), "--out", str(out),
            "--set", f"tile_px={PX}", "--set", "embedding_dim=16", "--set", "batch_size=12", "--set", "epochs=2",
            "--set", "num_workers=2", "--set", "seed=0", "--set", "samples_per_task=12",
            "--set", "augment.blur_prob=0.0"]
    assert main(argv) == 0
    meta = json.loads((out / "encoder.json").read_text())
    metrics = meta["metrics"]
    for key in ("tumour/auc", "regions/dice", "cells/dice", "cells/pq", "cells/count_r", "val_loss"):
        assert key in metrics, key
    for key in ("regions/dice", "cells/dice", "cells/pq"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    assert [t["kind"] for t in meta["tasks"]] == ["binary", "segmentation", "nuclei"]
    assert meta["tasks"][1]["background"] == 0 and meta["tasks"][2]["classes"] == NUCLEUS_TYPES
    err = capfd.readouterr().err
    assert "cells dice" in err and "cells count_r" in err and "regions dice" in err
    assert "task cells (nuclei, 2 nucleus types, weight 2)" in err

    # decoders are kept beside the encoder, the encoder itself still maps a tile to C numbers
    heads = torch.load(out / "heads.pt", weights_only=False)
    assert set(heads["decoders"]) and all(k.split(".")[0] in {"regions", "cells"} for k in heads["decoders"])
    module, _ = load_encoder(out)
    assert module(torch.zeros(2, 3, PX, PX, dtype=torch.uint8)).shape == (2, 16)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all("loss/cells" in h for h in history)
