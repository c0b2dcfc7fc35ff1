"""Reduced-precision encoding: float16 on GPUs, bfloat16 on CPUs that have it, float32 on request."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress_support import INNER_CELLS, colour_image, compress_args, random_encoder_grid, write_slide
from nic.cli.main import main
from nic.encoders.inference import cpu_has_native_bfloat16, reduced_precision
from nic.grids import load_grid

CELLS = INNER_CELLS


def test_precision_is_chosen_per_device_and_can_be_turned_off():
    assert reduced_precision("cuda") is torch.float16
    assert reduced_precision("cpu") is (torch.bfloat16 if cpu_has_native_bfloat16() else None)
    assert reduced_precision("cpu", enabled=False) is None
    assert reduced_precision("cuda", enabled=False) is None


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    image = colour_image(cells=CELLS, texture=True, seed=4)
    return write_slide(tmp_path_factory.mktemp("prec") / "tex.tiff", image), image


@pytest.mark.usefixtures("ray_session")
def test_float32_on_request_and_reduced_precision_close_to_it(textured, tmp_path):
    slide, image = textured
    expected = random_encoder_grid(image)  # float32, rounded to float16
    exact, reduced = tmp_path / "fp32", tmp_path / "auto"
    assert main(compress_args([slide], exact, "random", "--set", "mixed_precision=false")) == 0
    assert main(compress_args([slide], reduced, "random")) == 0

    grid32, mask = load_grid(exact, "tex")
    assert mask.sum() == len(CELLS)
    np.testing.assert_allclose(grid32, expected, rtol=2e-3, atol=1e-3)
    assert json.loads((exact / "compress_run.json").read_text())["precision"] == ["float32"]

    stats = json.loads((reduced / "compress_run.json").read_text())
    grid, _ = load_grid(reduced, "tex")
    cells = grid[:, mask].T
    ref = expected[:, mask].T
    relative = np.linalg.norm(cells - ref, axis=1) / np.linalg.norm(ref, axis=1)
    if cpu_has_native_bfloat16():
        assert stats["precision"] == ["bfloat16"]
        # bfloat16 really ran (not float32 relabelled), and stays close to float32
        assert 1e-4 < np.median(relative) < 1e-2
    else:
        assert stats["precision"] == ["float32"]
        assert np.median(relative) < 1e-3
