"""Same config, same machine, same numbers (issue 13 item 6: "the demo tells the truth").

Each stage that learns or computes something from the cohort is run twice with one config and
the two results are compared bit for bit: encoder training (2 DDP workers, augmentation on),
compression (batches that span slides and end part-full) and `nic train-downstream` (the demo's
NIC CNN, folds side by side, the linear probe, bootstrap intervals). What keeps them equal, and
what does not: docs/pipeline.md, "Reproducibility".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nic.config.base import load_config
from nic.config.pipeline import PipelineConfig
from nic.train.determinism import worker_threads

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _without_timings(value):
    """A JSON value with every timing (keys naming seconds) left out, recursively."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


# ---------------------------------------------------------------------------- no Ray


def test_the_demo_trains_no_encoder_against_the_clock():
    """A time cap per epoch lets the machine's load decide how many batches an encoder sees; the
    demo's table must not depend on that. Its compression keeps the actors' batches fixed."""
    from nic.pipeline import plan_pipeline

    config = load_config(PipelineConfig, CONFIGS / "demo" / "pipeline.yaml")
    _, steps, _ = plan_pipeline(config)
    encoders = [s.config for s in steps if s.stage == "train-encoder"]
    assert encoders, "the demo trains its encoders"
    for enc in encoders:
        assert enc.max_minutes_per_epoch is None, f"encoder {enc.name}: max_minutes_per_epoch set"
    assert all(s.config.preserve_order for s in steps if s.stage == "compress")


def test_worker_threads_follow_the_reserved_cpus():
    assert [worker_threads(c) for c in (None, 0.5, 1, 1.0, 1.5, 2, 4.0)] == [1, 1, 1, 1, 1, 2, 4]


def test_make_deterministic_fixes_threads_and_kernels():
    """In a fresh process (it changes process-wide torch settings): the thread count is set from
    the CPUs, deterministic kernels are on, and new tensors are not NaN-filled (a cost that
    repeatability does not need)."""
    code = (
        "import torch, torch.utils.deterministic as d\n"
        "from nic.train.determinism import make_deterministic\n"
        "n = make_deterministic(2.0, 'cpu')\n"
        "print(n, torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),"
        " torch.is_deterministic_algorithms_warn_only_enabled(), d.fill_uninitialized_memory)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["2", "2", "True", "True", "False"]


# ---------------------------------------------------------------------------- Ray: twice, compared


PX = 64


def _tasks(root: Path) -> Path:
    """The two-task set the encoder-training tests use (tissue folder + tumour HDF5)."""
    from test_train_encoder_ray import _tasks as two_tasks

    return two_tasks(root)


@pytest.mark.ray
@pytest.mark.slow
def test_encoder_training_twice_gives_the_same_weights(ray_session, tmp_path: Path) -> None:
    """Two DDP workers, augmentation, per-worker noise and sample order, lr schedule and early
    stopping: the second run's weights, heads, metrics and history equal the first's."""
    from nic.config.encoder import TrainEncoderConfig
    from nic.train.encoder_stage import train_encoder

    tasks = _tasks(tmp_path / "data")
    infos, outs = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        config = TrainEncoderConfig(tasks=tasks, out=out, tile_px=PX, embedding_dim=16, batch_size=16, epochs=2,
                                    num_workers=2, seed=3, samples_per_task=64, max_steps_per_epoch=3,
                                    augment={"blur_prob": 0.5})
        infos.append(train_encoder(config))
        outs.append(out)
    a, b = outs
    assert infos[0].metrics == infos[1].metrics and infos[0].epochs_trained == infos[1].epochs_trained == 2
    assert infos[0].content_hash == infos[1].content_hash
    for name in ("encoder.pt", "heads.pt"):
        first, second = (torch.load(o / name, map_location="cpu", weights_only=False) for o in (a, b))
        _assert_same_tensors(first, second, name)
    history = [_without_timings(json.loads((o / "history.json").read_text())) for o in (a, b)]
    assert history[0] == history[1]
    assert [row["steps"] for row in history[0]] == [3, 3]  # 4 batches per worker, capped at 3


def _assert_same_tensors(first, second, where: str) -> None:
    """Nested dicts/lists of tensors (state dicts, head files) equal bit for bit."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second), f"{where}: tensors differ"
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            _assert_same_tensors(first[key], second[key], f"{where}/{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for i, (x, y) in enumerate(zip(first, second, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert first == second, f"{where}: {first!r} != {second!r}"


@pytest.mark.ray
@pytest.mark.slow
def test_compression_twice_gives_the_same_grids(ray_session, tmp_path: Path) -> None:
    """A trunk-and-weights encoder (random) in float32, batches of 7 tiles: batches span slides
    and end part-full, and in float32 on CPU a tile's embedding can depend on its batch's size
    (below 13 tiles for this trunk), so only batches cut the same way in both runs give the same
    grids."""
    from compress_support import INNER_CELLS, colour_image, compress_args, write_slide
    from nic.cli.main import main
    from nic.grids import list_slides, load_grid

    slides = [write_slide(tmp_path / f"s{k}.tiff", colour_image(cells=INNER_CELLS, texture=True, seed=k))
              for k in range(3)]
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(compress_args(slides, out, "random", "--set", "mixed_precision=false")
                    + ["--batch-size", "7"]) == 0
    ids = list_slides(outs[0])
    assert ids == list_slides(outs[1]) == ["s0", "s1", "s2"]
    for sid in ids:
        (grid_a, mask_a), (grid_b, mask_b) = (load_grid(o, sid) for o in outs)
        assert mask_a.sum() == len(INNER_CELLS)
        np.testing.assert_array_equal(mask_a, mask_b)
        np.testing.assert_array_equal(grid_a, grid_b, err_msg=f"slide {sid}: grids differ")


@pytest.mark.ray
@pytest.mark.slow
def test_train_downstream_twice_gives_the_same_metrics(ray_session, tmp_path: Path) -> None:
    """The demo's head (NIC CNN), 3 folds trained side by side, test-time crops, the linear probe
    and bootstrap intervals: the same folds, predictions and metrics.json in both runs."""
    from downstream_helpers import make_cohort
    from nic.config.downstream import TrainDownstreamConfig
    from nic.train.downstream_stage import run_train_downstream

    grids, labels = make_cohort(tmp_path / "cohort", n=24, channels=8, size=(8, 12), seed=4)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        config = load_config(TrainDownstreamConfig, values=dict(
            grids=str(grids), labels=str(labels), out=str(out), kind="binary", target="label", model="nic-cnn",
            folds=3, epochs=4, batch_size=4, crops_per_slide=2, lr=1e-3, tta_crops=2, bootstrap=50, seed=0))
        assert run_train_downstream(config) == 0
    a, b = ([_without_timings(json.loads((o / "metrics.json").read_text())) for o in outs])
    assert a["cv"]["metrics"]["roc_auc"]["value"] is not None and "probe" in a
    assert a == b
    for name in ("splits.parquet", "predictions.parquet", "probe_predictions.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(outs[0] / name), pd.read_parquet(outs[1] / name),
                                      check_exact=True, obj=name)
