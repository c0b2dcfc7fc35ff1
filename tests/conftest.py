"""Shared fixtures: the real slide fixtures from ../shared/data and one local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_SLIDES = REPO.parent / "shared" / "data" / "slides"


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """Folder of the real slide fixtures (small_HE.svs, small.svs, unreadable.svs, unopenable.tiff, boxes.tiff)."""
    if not SHARED_SLIDES.exists():
        pytest.fail(f"real slide fixtures not found at {SHARED_SLIDES}: ../shared must sit beside the repo")
    return SHARED_SLIDES


@pytest.fixture(scope="session")
def real_slide(shared_slides: Path) -> Path:
    return shared_slides / "small_HE.svs"


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray instance for the whole test session (2 CPUs here; starting Ray costs seconds)."""
    import ray

    from nic.config.base import RayOptions
    from nic.runtime import connect

    os.environ.pop("RAY_ADDRESS", None)
    # A small object store: tests move little data, and several test sessions may share this machine.
    os.environ.setdefault("NIC_OBJECT_STORE_BYTES", str(1_500_000_000))
    connect(RayOptions(num_cpus=max(2, os.cpu_count() or 2), num_gpus=0))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory, ray_session) -> Path:
    """A small synthetic cohort made once per session with `nic synth` (8 slides, 2 patch tasks)."""
    from nic.cli.main import main

    out = tmp_path_factory.mktemp("tiny") / "cohort"
    code = main(["synth", "--out", str(out), "--slides", "8", "--size", "1600", "--seed", "5",
                 "--set", "min_size=1200", "--set", "patches.train=160", "--set", "patches.val=40",
                 "--set", "patches.tasks=[tissue_type, tumour]"])
    assert code == 0
    return out
