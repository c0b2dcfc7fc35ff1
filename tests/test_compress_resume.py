"""Resume: a re-run skips complete slides, redoes stale or damaged ones, re-encodes for a new encoder."""

from __future__ import annotations

import pytest

from compress_support import L_CELLS, colour_image, compress_args, manifest_rows, write_slide
from nic.cli.main import main
from nic.grids import load_grid, read_grid_meta, verify_grid_file
from nic.grids.schema import slide_file, staging_dir

pytestmark = pytest.mark.usefixtures("ray_session")


def test_resume_skips_complete_slides_and_redoes_stale_ones(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "a.tiff", colour_image())
    write_slide(slides / "b.tiff", colour_image(cells=L_CELLS[:5]))
    out = tmp_path / "grids"
    assert main(compress_args([slides], out)) == 0
    first = manifest_rows(out)
    assert {r["status"] for r in first.values()} == {"ok"}
    stamp = {sid: slide_file(out, sid).stat().st_mtime_ns for sid in first}

    # 1. nothing changed: everything is skipped and no file is rewritten
    assert main(compress_args([slides], out)) == 0
    again = manifest_rows(out)
    assert {r["status"] for r in again.values()} == {"skipped"}
    assert again["a"]["tiles"] == first["a"]["tiles"] and again["a"]["encoder_hash"] == first["a"]["encoder_hash"]
    assert all(slide_file(out, sid).stat().st_mtime_ns == stamp[sid] for sid in first)

    # 2. a killed writer leaves a staging temporary and no grid; a damaged grid file does not
    #    verify: both slides are encoded again, the temporary is cleaned up
    slide_file(out, "b").unlink()
    staging_dir(out).mkdir(exist_ok=True)
    (staging_dir(out) / "b.0badf00d.parquet.tmp").write_bytes(b"PAR1 half written")
    path_a = slide_file(out, "a")
    path_a.write_bytes(path_a.read_bytes()[:-200])
    assert main(compress_args([slides], out)) == 0
    rows = manifest_rows(out)
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "ok"
    assert not any(staging_dir(out).iterdir())
    verify_grid_file(slide_file(out, "a"))

    # 3. another encoder: every slide is re-encoded, and its grid says which encoder made it
    assert main(compress_args([slides], out, "random")) == 0
    rows = manifest_rows(out)
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert rows["a"]["encoder_hash"] != first["a"]["encoder_hash"] and rows["a"]["embedding_dim"] == 128
    grid, mask = load_grid(out, "a")
    assert grid.shape == (128, 8, 12) and mask.sum() == len(L_CELLS)
    assert read_grid_meta(out, "a").encoder_name == "random"

    # 4. --overwrite redoes complete slides
    assert main(compress_args([slides], out, "random", "--overwrite")) == 0
    assert {r["status"] for r in manifest_rows(out).values()} == {"ok"}
