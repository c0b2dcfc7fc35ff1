"""`nic synth` dense datasets: nuclei (instances + types, HDF5) and tissue regions (PNG pairs), read
back by the platform's dense readers, deterministic to the byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nic.config.synth import SynthConfig
from nic.patches.readers import read_patches
from nic.patches.tasks import load_tasks
from nic.synth.dense import NUCLEUS_TYPES, nucleus_instances, render_dense_chunk
from nic.synth.patches import plan_chunks
from nic.synth.render import KIND_LYMPHOCYTE, Scene

SMALL = {"tasks": ["nuclei", "tissue_regions"], "train": 4, "val": 2, "patch_px": 64, "canvas_patches": 2,
         "chunk_canvases": 1}


def test_dense_chunks_are_pure_functions_of_their_seed() -> None:
    config = SynthConfig(patches=SMALL)
    for chunk in [c for c in plan_chunks(config) if c.split == "train"]:
        a, b = render_dense_chunk(config, chunk), render_dense_chunk(config, chunk)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
        assert a["x"].shape == (4, 64, 64, 3) and a["y"].shape == (4, 64, 64)
    other = render_dense_chunk(SynthConfig(seed=1, patches=SMALL), plan_chunks(config)[0])
    assert not np.array_equal(other["x"], render_dense_chunk(config, plan_chunks(config)[0])["x"])


def test_nucleus_instances_follow_the_rendered_sprites() -> None:
    from nic.synth.patches import _canvas_params

    config = SynthConfig(patches=SMALL)
    scene = Scene(_canvas_params(np.random.default_rng(0), config, 128, til_density=1.0))
    inst, types = nucleus_instances(scene, 0, 0, 128, 128)
    ids = np.unique(inst)
    assert ids.tolist() == list(range(len(ids))) and len(ids) > 5
    assert ((inst > 0) == (types > 0)).all() and types.max() <= len(NUCLEUS_TYPES)
    # each instance has one type; lymphocytes (type 2) sit where the scene put lymphocyte nuclei
    for i in ids[1:]:
        assert len(np.unique(types[inst == i])) == 1
    lymph = scene.nuclei(0, 0, 128, 128)
    lymph = lymph[lymph[:, 2] == KIND_LYMPHOCYTE]
    if len(lymph):
        y, x = lymph[0, :2]
        assert types[y, x] in (2, 0)  # 0 only if a darker neighbour covers its centre


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.ray
@pytest.mark.slow
def test_synth_writes_dense_datasets_deterministically(ray_session, tmp_path: Path) -> None:
    from nic.cli.main import main

    def run(out: Path) -> int:
        return main(["synth", "--out", str(out), "--slides", "1", "--size", "512", "--seed", "2",
                     "--set", "patches.tasks=[nuclei, tissue_regions]", "--set", "patches.train=4",
                     "--set", "patches.val=2", "--set", "patches.patch_px=64", "--set", "patches.canvas_patches=2",
                     "--set", "patches.chunk_canvases=1"])

    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a) == 0 and run(b) == 0
    files = sorted(p.relative_to(a / "patches") for p in (a / "patches").rglob("*") if p.is_file())
    assert Path("nuclei/train.h5") in files and Path("tissue_regions/masks/tissue_regions_train_000003.png") in files
    for rel in files:
        assert digest(a / "patches" / rel) == digest(b / "patches" / rel), rel
    assert digest(a / "tasks.yaml") == digest(b / "tasks.yaml")

    tasks = {t.name: t for t in load_tasks(a / "tasks.yaml")}
    assert tasks["nuclei"].kind == "nuclei" and tasks["nuclei"].classes == list(NUCLEUS_TYPES)
    assert tasks["tissue_regions"].kind == "segmentation" and tasks["tissue_regions"].classes[0] == "background"
    nuclei = read_patches(tasks["nuclei"], tasks["nuclei"].path, 64)
    regions = read_patches(tasks["tissue_regions"], tasks["tissue_regions"].val_path, 64)
    assert len(nuclei) == 4 and nuclei.types is not None and nuclei.masks.max() > 0
    assert len(regions) == 2 and regions.masks.max() < len(tasks["tissue_regions"].classes)
    sidecar = json.loads((a / "patches" / "nuclei.json").read_text())
    assert sidecar["train"] == 4 and set(sidecar["nuclei_by_type"]["train"]) == set(NUCLEUS_TYPES)
    cohort = json.loads((a / "cohort.json").read_text())
    assert {t["name"]: t["status"] for t in cohort["patch_tasks"]} == {"nuclei": "ok", "tissue_regions": "ok"}
    # a re-run skips the complete dense tasks
    assert run(a) == 0
    cohort = json.loads((a / "cohort.json").read_text())
    assert {t["status"] for t in cohort["patch_tasks"]} == {"skipped"}
