"""Damaged or changed artifacts give a clear error naming the file and the problem, or are redone
on re-run; never a silently wrong result: a truncated grid, a grid whose tile count disagrees with
the manifest, encoder weights that do not match encoder.json, labels changed since training, and a
full disk. Grid stores are written with nic.grids' writer (no Ray); the `nic tile` cases run on the
real fixture small_HE.svs with the session's Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from downstream_helpers import write_grid
from nic.artifacts import NoSpaceError, write_manifest, write_parquet_atomic
from nic.cli.main import main
from nic.grids import GridError, load_grid, read_grid_meta, slide_file, verify_store
from nic.grids.manifest import MANIFEST_SCHEMA, grid_row
from nic.grids.schema import manifest_path
from test_downstream_probe import _signal_cohort


def _with_manifest(grids: Path) -> dict[str, dict]:
    """The manifest nic compress would have written for the store's grids."""
    rows = {}
    for part in sorted((grids / "tiles").iterdir()):
        sid = part.name.split("=", 1)[1]
        rows[sid] = grid_row(read_grid_meta(grids, sid), "ok", 0.0, str(slide_file(grids, sid).relative_to(grids)))
    write_manifest(manifest_path(grids), list(rows.values()), MANIFEST_SCHEMA)
    return rows


def _downstream(grids: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["train-downstream", "--grids", str(grids), "--labels", str(labels), "--kind", "binary",
            "--target", "label", "--out", str(out), "--set", "train_model=false", "--set", "folds=3",
            "--set", "bootstrap=10", *extra]


@pytest.fixture()
def cohort(tmp_path, monkeypatch):
    """24 slides with a manifest; the stage's linear probe is stubbed (what is tested here happens
    before it, and it would take most of the time)."""
    import nic.train.downstream_stage as stage

    stub = {"model": "stub", "features": "none", "error": "not run in this test", "seconds": 0.0}
    monkeypatch.setattr(stage, "run_probe", lambda *a: (stub, pd.DataFrame()))
    grids, labels = _signal_cohort(tmp_path / "cohort", n=24)
    return grids, labels, _with_manifest(grids)


def test_grid_disagreeing_with_the_manifest_or_truncated_is_named(cohort, tmp_path, capsys):
    from nic.compress.collector import EncoderFacts
    from nic.compress.stage import completed_row

    grids, labels, rows = cohort
    sid = "s003"
    path = slide_file(grids, sid)
    original = path.read_bytes()
    args = _downstream(grids, labels, tmp_path / "model")

    # (b) the grid was replaced by a complete one of fewer tiles: it disagrees with slides.parquet
    grid, mask = load_grid(grids, sid)
    fewer = mask.copy()
    fewer[tuple(np.argwhere(mask)[0])] = False
    write_grid(grids, sid, grid, fewer)
    with pytest.raises(GridError, match=f"{sid}.*{mask.sum() - 1} tiles, but the manifest .* says slide {sid} "
                                        f"has {mask.sum()}"):
        verify_store(grids, [sid])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "but the manifest" in err and "re-run nic compress" in err
    facts = EncoderFacts("test", "test-encoder", 4)
    done, why = completed_row(grids, sid, "x.tiff", facts, "", (0,), rows[sid])
    assert done is None and why.startswith("tile count disagrees with the manifest"), why  # re-encoded

    # (a) a grid file cut in half: named by every reader, and train-downstream stops before training
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(GridError, match=f"{path}: not a readable Parquet file"):
        load_grid(grids, sid)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a readable Parquet file" in err
    done, why = completed_row(grids, sid, "x.tiff", facts, "", (0,), rows[sid])
    assert done is None and why.startswith("incomplete or unreadable grid")

    # a file whose metadata promises more tiles than it holds never loads as a grid with holes
    table = pq.read_table(pa.BufferReader(original))
    meta = dict(table.schema.metadata)
    meta[b"nic.tiles"] = str(int(mask.sum()) + 5).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(GridError, match=f"{path}: {mask.sum()} rows of transform 0, but its metadata promises"):
        load_grid(grids, sid)

    path.write_bytes(original)  # the real file back: everything agrees again
    assert main(args) == 0


def test_labels_changed_since_training_are_not_trained_on_silently(cohort, tmp_path, capsys):
    grids, labels, _ = cohort
    out = tmp_path / "model"
    assert main(_downstream(grids, labels, out)) == 0
    assert main(_downstream(grids, labels, out)) == 0  # the same labels: the run resumes
    frame = pd.read_csv(labels)
    frame.loc[frame.index[:4], "label"] = 1 - frame.loc[frame.index[:4], "label"]
    frame.to_csv(labels, index=False)
    # a fold of the earlier labels, as a CNN run would have left it
    fold = out / "folds" / "fold_0"
    fold.mkdir(parents=True)
    old_hash = json.loads((out / "run.json").read_text())["run_hash"]
    (fold / "fold.json").write_text(json.dumps({"status": "ok", "run_hash": old_hash}))
    capsys.readouterr()
    assert main(_downstream(grids, labels, out)) == 2
    err = capsys.readouterr().err
    assert f"holds a run made with other labels ({labels} differs from the labels of that run" in err, err
    assert "not reused" in err and "overwrite" in err
    assert fold.exists()
    assert main(_downstream(grids, labels, out, "--set", "overwrite=true")) == 0
    assert not fold.exists(), "the folds of the other labels are discarded"


def test_encoder_weights_not_matching_encoder_json(tmp_path, capsys):
    from nic.config.base import load_config
    from nic.config.encoder import TrainEncoderConfig
    from nic.encoders import EncoderInfo, build_encoder, save_encoder
    from nic.train.encoder_stage import _existing

    enc = tmp_path / "enc"
    info = EncoderInfo(name="e", kind="mtl", architecture="reference", embedding_dim=8, tile_px=128,
                       content_hash="pending", config_hash="cfg1")
    save_encoder(build_encoder("reference", 8, seed=0), enc, info)
    config = load_config(TrainEncoderConfig, values={"out": str(enc), "kind": "mean-rgb"})
    assert _existing(config, "cfg1") is not None
    weights = enc / "encoder.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert _existing(config, "cfg1") is None, "a re-run of train-encoder trains again instead of skipping"
    assert main(["compress", "--slides", str(tmp_path / "x.svs"), "--encoder", str(enc),
                 "--out", str(tmp_path / "grids")]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: sha256" in err and "does not match encoder.json's content_hash" in err
    assert not (tmp_path / "grids" / "slides.parquet").exists()


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A 512 KiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Fill the disk but `leave_bytes`."""
    filler = disk / "filler.bin"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave_bytes))
    return filler


def test_full_disk_writers_name_the_file_and_leave_nothing(small_disk):
    from nic.encoders import EncoderInfo, build_encoder, save_encoder
    from test_grids_format import write_random_slide

    _fill(small_disk, 8192)
    target = small_disk / "out" / "big.parquet"
    with pytest.raises(NoSpaceError, match=f"^no space left on device writing {target}$"):
        write_parquet_atomic(target, pa.table({"a": np.random.default_rng(0).random(50_000)}), compression="none")
    assert list(target.parent.iterdir()) == []
    grids = small_disk / "grids"
    with pytest.raises(NoSpaceError, match=f"writing {slide_file(grids, 's1')}"):
        write_random_slide(grids, "s1", rows=60, cols=60)
    assert not slide_file(grids, "s1").exists() and list((grids / ".staging").iterdir()) == []
    info = EncoderInfo(name="e", kind="mtl", architecture="reference", embedding_dim=64, tile_px=128,
                       content_hash="pending")
    with pytest.raises(NoSpaceError, match="encoder.pt"):
        save_encoder(build_encoder("reference", 64, seed=0), small_disk / "enc", info)
    assert sorted(p.name for p in (small_disk / "enc").iterdir()) == [], "no encoder.json: not complete"


@pytest.mark.usefixtures("ray_session")
def test_full_disk_fails_a_stage_clearly_and_a_rerun_completes(small_disk, real_slide, capsys):
    out = small_disk / "tiles-out"
    filler = _fill(small_disk, 12 * 1024)
    args = ["tile", "--slides", str(real_slide), "--out", str(out), "--thumbnail-px", "256"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"no space left on device writing {out}/" in err, err
    assert not (out / "tiles" / "small_HE.parquet").exists(), "nothing looks complete"
    assert not list(out.rglob("*.tmp")) and not (out / ".nic-lock.json").exists()
    if (out / "slides.parquet").exists():
        (row,) = pq.read_table(out / "slides.parquet").to_pylist()
        assert row["status"] == "failed" and row["error_kind"] == "no_space" and "no space left" in row["reason"]
    filler.unlink()
    assert main(args) == 0
    (row,) = pq.read_table(out / "slides.parquet").to_pylist()
    assert row["status"] == "ok" and (out / "tiles" / "small_HE.parquet").exists()


@pytest.mark.usefixtures("ray_session")
def test_tile_redoes_a_truncated_or_disagreeing_tile_file(real_slide, tmp_path):
    out = tmp_path / "tiles-out"
    args = ["tile", "--slides", str(real_slide), "--out", str(out), "--thumbnail-px", "128"]
    assert main(args) == 0
    tiles = out / "tiles" / "small_HE.parquet"
    good = pq.read_table(tiles)
    n = good.num_rows

    tiles.write_bytes(tiles.read_bytes()[: tiles.stat().st_size // 2])  # (a) cut in half
    assert main(args) == 0
    (row,) = pq.read_table(out / "slides.parquet").to_pylist()
    assert row["status"] == "ok" and pq.read_table(tiles).num_rows == n == row["tiles"], "tiled again"

    # (b) a complete file of fewer tiles than slides.parquet says (replaced after the manifest)
    meta = dict(good.schema.metadata)
    meta[b"nic.tiles"] = str(n - 3).encode()
    pq.write_table(good.slice(0, n - 3).replace_schema_metadata(meta), tiles)
    assert main(args) == 0
    (row,) = pq.read_table(out / "slides.parquet").to_pylist()
    assert row["status"] == "ok" and pq.read_table(tiles).num_rows == n == row["tiles"], "tiled again"
