"""The 8 rotations/flips: grid k must be the grid of the slide rotated/flipped by k, pixels included."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from compress_support import L_CELLS, colour_image, compress_args, manifest_rows, write_slide
from nic.cli.main import main
from nic.grids import TRANSFORM_NAMES, load_grid, read_grid_meta, transform_image
from nic.grids.schema import slide_file

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """An L of textured tissue tiles (orientation visible to a conv encoder) and its 8 transforms
    written as slides of their own."""
    folder = tmp_path_factory.mktemp("dihedral")
    image = colour_image(texture=True, seed=3)
    orig = write_slide(folder / "orig.tiff", image)
    rotated = folder / "rotated"
    rotated.mkdir()
    for k in range(8):
        write_slide(rotated / f"t{k}.tiff", np.ascontiguousarray(transform_image(image, k)))
    return orig, rotated


def test_mean_rgb_grids_move_with_the_transform(textured, tmp_path):
    orig, _ = textured
    out = tmp_path / "grids"
    assert main(compress_args([orig], out, "mean-rgb", "--dihedral")) == 0
    row = manifest_rows(out)["orig"]
    assert row["status"] == "ok" and row["dihedral"] is True and row["tiles"] == len(L_CELLS)
    meta = read_grid_meta(out, "orig")
    assert meta.transforms == tuple(range(8))
    assert pq.ParquetFile(slide_file(out, "orig")).metadata.num_rows == 8 * len(L_CELLS)
    ident, mask0 = load_grid(out, "orig", 0)
    for k in range(8):
        grid, mask = load_grid(out, "orig", k)
        # a tile's mean colour does not change when it is rotated: only its cell moves
        np.testing.assert_array_equal(mask, transform_image(mask0, k), err_msg=TRANSFORM_NAMES[k])
        np.testing.assert_allclose(grid, transform_image(ident, k, axes=(1, 2)), atol=1e-3)


def test_random_encoder_sees_rotated_pixels(textured, tmp_path):
    orig, rotated = textured
    out = tmp_path / "aug"
    ref = tmp_path / "ref"
    # two batches in flight per actor here: the threaded path (a reader per thread) gives the same grids
    assert main(compress_args([orig], out, "random", "--dihedral", "--read-parallelism", "2")) == 0
    assert main(compress_args([rotated], ref, "random")) == 0
    ident, mask0 = load_grid(out, "orig", 0)
    for k in range(8):
        grid, mask = load_grid(out, "orig", k)
        expected, expected_mask = load_grid(ref, f"t{k}", 0)
        name = TRANSFORM_NAMES[k]
        np.testing.assert_array_equal(mask, expected_mask, err_msg=name)
        # transform k of the slide == compressing the rotated slide, embedding for embedding
        np.testing.assert_allclose(grid, expected, atol=2e-2, rtol=1e-2, err_msg=name)
        if k:
            # ... and not merely the identity grid moved: the tiles' pixels were rotated too
            moved = transform_image(ident, k, axes=(1, 2))
            assert np.abs(grid - moved)[:, mask].mean() > 20 * np.abs(grid - expected)[:, mask].mean() + 1e-3, name
