"""Object-store URIs through the mirror (nic.storage), against a local S3 server (moto).

Unit tests of the mapping, download, upload and listing; then `nic compress` from slides in a
bucket to grids in a bucket, and a whole `nic pipeline` study written to a bucket, resumed from an
empty mirror as a new node would."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from nic.storage import (
    StorageError,
    display,
    ensure_local,
    mirror_path,
    mirror_root,
    publish,
    remote_children,
    to_local,
    upload_order,
    uri_for,
)
from study_configs import SURVIVAL, tiny_search, tiny_study, write_config


def _bucket_files(uri: str) -> dict[str, pafs.FileInfo]:
    fs, path = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path):].lstrip("/"): i for i in infos if i.type == pafs.FileType.File}


def _put(uri: str, data: bytes) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as out:
        out.write(data)


def _forget(uri: str) -> None:
    """Delete this node's copies of a bucket: the next read behaves as on a new node."""
    shutil.rmtree(mirror_path(uri), ignore_errors=True)


def test_uris_map_to_mirror_paths_and_back():
    path = mirror_path("s3://bucket/cohort/slides/a.tiff")
    assert path == mirror_root() / "s3" / "bucket" / "cohort" / "slides" / "a.tiff"
    assert uri_for(path) == "s3://bucket/cohort/slides/a.tiff"
    assert uri_for(mirror_path("gcs://b/x")) == "gs://b/x"
    assert display(path) == "s3://bucket/cohort/slides/a.tiff" and display("/data/a.tiff") == "/data/a.tiff"
    assert uri_for("/data/a.tiff") is None
    assert to_local("file:///data/x") == "/data/x" and to_local("/data/x") == "/data/x"
    for bad, problem in (("ftp://h/x", "unsupported URI scheme"), ("s3://b/x?region=y", "options in the URI"),
                         ("s3://b/../x", "'..'")):
        with pytest.raises(StorageError, match=problem):
            to_local(bad)


def test_upload_order_puts_manifests_and_sidecars_last():
    order = upload_order(["slides.parquet", "tiles/slide_id=a/part-0.parquet", "encoder.json", "encoder.pt",
                          "report.md", "report/roc.png", "summary.yaml"])
    assert order[:3] == ["encoder.pt", "report/roc.png", "tiles/slide_id=a/part-0.parquet"]
    assert set(order[3:]) == {"encoder.json", "report.md", "slides.parquet", "summary.yaml"}


def test_publish_uploads_what_changed_and_ensure_local_fetches_what_changed(s3_bucket):
    out = mirror_path(f"{s3_bucket}/out")
    (out / "data").mkdir(parents=True)
    (out / "data" / "a.bin").write_bytes(b"a" * 1000)
    (out / "manifest.json").write_text("{}")
    (out / ".a.bin.1234.tmp").write_bytes(b"half")  # a temporary: never uploaded
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "c.pt").write_bytes(b"ray writes these to the URI itself")
    assert publish(out) == 2
    assert set(_bucket_files(f"{s3_bucket}/out")) == {"data/a.bin", "manifest.json"}
    assert publish(out) == 0  # nothing changed
    (out / "data" / "a.bin").write_bytes(b"b" * 1001)
    assert publish(out) == 1

    # Another node (an empty mirror) gets the current content; a changed object is fetched again.
    _forget(s3_bucket)
    local = ensure_local(out)
    assert (local / "data" / "a.bin").read_bytes() == b"b" * 1001 and (local / "manifest.json").exists()
    stamp = (local / "data" / "a.bin").stat().st_mtime_ns
    ensure_local(out)
    assert (local / "data" / "a.bin").stat().st_mtime_ns == stamp  # current copies are not fetched again
    _put(f"{s3_bucket}/out/data/a.bin", b"c" * 7)
    assert ensure_local(out / "data" / "a.bin").read_bytes() == b"c" * 7
    # A copy whose object is gone is not kept as if it were current (the URI is the truth).
    (local / "data" / "stale.bin").write_bytes(b"a copy of an object deleted since")
    os.utime(local / "data" / "stale.bin", (1_700_000_000, 1_700_000_000))  # copies get whole seconds
    (local / "data" / "pending.bin").write_bytes(b"written here, not uploaded yet")
    ensure_local(out)
    assert sorted(p.name for p in (local / "data").iterdir()) == ["a.bin", "pending.bin"]

    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nothing: no such object"):
        ensure_local(mirror_path(f"{s3_bucket}/nothing"))
    assert ensure_local(mirror_path(f"{s3_bucket}/nothing"), missing_ok=True) == mirror_path(f"{s3_bucket}/nothing")


def test_a_slide_prefix_is_listed_without_downloading(s3_bucket):
    from nic.slides.inputs import expand_slide_inputs

    for name in ("b.svs", "a.tiff", "notes.txt"):
        _put(f"{s3_bucket}/slides/{name}", b"II*\x00")
    folder = to_local(f"{s3_bucket}/slides")
    inputs = expand_slide_inputs([folder, to_local(f"{s3_bucket}/missing.svs"), to_local(f"{s3_bucket}/slides/*.svs")])
    assert [(i.slide_id, display(i.path)) for i in inputs[:2]] == [("a", f"{s3_bucket}/slides/a.tiff"),
                                                                   ("b", f"{s3_bucket}/slides/b.svs")]
    assert inputs[2].error == f"{s3_bucket}/missing.svs: no such object"
    assert "patterns are not supported" in inputs[3].error
    assert not Path(folder).exists()  # nothing was downloaded to list it
    assert remote_children(folder) == [Path(folder) / n for n in ("a.tiff", "b.svs", "notes.txt")]


@pytest.mark.usefixtures("ray_session")
def test_compress_reads_slides_and_an_encoder_from_a_bucket_and_writes_grids_there(
        s3_bucket, s3_requests, tiny_cohort, tmp_path, capsys):
    from nic.cli.main import main
    from nic.grids import list_slides, load_grid, read_manifest

    slides = sorted((tiny_cohort / "slides").glob("*.tiff"))[:3]
    for path in slides:
        _put(f"{s3_bucket}/slides/{path.name}", path.read_bytes())
    _put(f"{s3_bucket}/slides/broken.svs", b"not a slide at all")
    encoder = f"{s3_bucket}/encoders/random"
    assert main(["train-encoder", "--set", "kind=random", "--set", "embedding_dim=8", "--out", encoder]) == 0
    assert "encoder.json" in _bucket_files(encoder)

    grids = f"{s3_bucket}/grids"
    args = ["compress", "--slides", f"{s3_bucket}/slides", f"{s3_bucket}/gone.svs", "--encoder", encoder,
            "--batch-size", "32"]
    assert main([*args, "--out", grids]) == 0  # the broken and the missing slide fail, the rest is done
    files = _bucket_files(grids)
    assert "slides.parquet" in files and sum(f.endswith(".parquet") for f in files) == 4
    assert max(i.mtime for k, i in files.items() if k != "slides.parquet") <= files["slides.parquet"].mtime

    # What a new node sees: the bucket alone.
    _forget(s3_bucket)
    manifest = read_manifest(grids).set_index("slide_id")
    assert manifest.loc["broken", "status"] == "failed" and manifest.loc["gone", "status"] == "failed"
    assert manifest.loc["gone", "reason"].startswith(f"{s3_bucket}/gone.svs: no such object")
    assert manifest.loc["broken", "path"] == f"{s3_bucket}/slides/broken.svs"
    ids = [p.name.removesuffix(".tiff") for p in slides]
    assert list_slides(grids) == ids and (manifest.loc[ids, "status"] == "ok").all()

    # Looking at it needs no local copy either: the picture goes to the bucket too.
    assert main(["grids", "ls", "--grids", grids]) == 0
    assert f"{s3_bucket}/gone.svs: no such object" in capsys.readouterr().out
    assert main(["grids", "show", "--grids", grids, "--slide", ids[0], "--out", f"{s3_bucket}/look/a.png"]) == 0
    assert _bucket_files(f"{s3_bucket}/look")["a.png"].size > 1000

    # The same slides and encoder, compressed from local files: the same grids.
    local_encoder = tmp_path / "encoder"
    shutil.copytree(ensure_local(mirror_path(encoder)), local_encoder)
    assert main(["compress", "--slides", *map(str, slides), "--encoder", str(local_encoder), "--batch-size", "32",
                 "--out", str(tmp_path / "grids")]) == 0
    for sid in ids:
        remote, local = load_grid(grids, sid), load_grid(tmp_path / "grids", sid)
        assert np.array_equal(remote[1], local[1]) and np.allclose(remote[0], local[0])

    # A re-run from an empty mirror skips every complete slide (their grids are in the bucket),
    # deciding so from the manifest and a listing: the server sent no grid file.
    bucket = s3_bucket.removeprefix("s3://")
    _forget(s3_bucket)
    capsys.readouterr()
    s3_requests.clear()
    assert main([*args, "--out", grids]) == 0
    manifest = read_manifest(grids).set_index("slide_id")
    assert (manifest.loc[ids, "status"] == "skipped").all()
    assert s3_requests.object_gets(bucket, "grids/tiles/") == []
    assert f"{len(ids)} grid(s) vouched for without a download, 0 fetched" in capsys.readouterr().err

    # A grid cut short in the bucket: only it is fetched, found incomplete and encoded again.
    key = f"tiles/slide_id={ids[0]}/part-0.parquet"
    whole = _bucket_files(grids)[key].size
    fs, base = pafs.FileSystem.from_uri(f"{grids}/{key}")
    with fs.open_input_stream(base) as src:
        data = src.read()
    _put(f"{grids}/{key}", data[: whole // 2])
    _forget(s3_bucket)
    s3_requests.clear()
    assert main([*args, "--out", grids]) == 0
    assert [r.key for r in s3_requests.object_gets(bucket, "grids/tiles/")] == [f"grids/{key}"]
    assert "1 incomplete or unreadable grid" in capsys.readouterr().err
    manifest = read_manifest(grids).set_index("slide_id")
    assert manifest.loc[ids[0], "status"] == "ok" and (manifest.loc[ids[1:], "status"] == "skipped").all()
    assert _bucket_files(grids)[key].size > whole // 2  # the whole grid is back in the bucket
    remote, local = load_grid(grids, ids[0]), load_grid(tmp_path / "grids", ids[0])
    assert np.array_equal(remote[1], local[1]) and np.allclose(remote[0], local[0])


@pytest.mark.heavy
@pytest.mark.integration
@pytest.mark.usefixtures("ray_session")
def test_a_whole_study_lives_in_a_bucket_and_resumes_from_an_empty_mirror(s3_bucket, tmp_path, capsys):
    from nic.cli.main import main
    from nic.grids import load_grid, read_manifest

    study = f"{s3_bucket}/study"
    path = write_config(tiny_study(study, targets=[SURVIVAL]), tmp_path / "pipeline.yaml")
    assert main(["pipeline", "--config", str(path)]) == 0

    files = _bucket_files(study)
    for key in ("report.md", "cohort/labels.csv", "encoders/mtl/encoder.json", "grids/mtl/slides.parquet",
                "models/mtl/survival/metrics.json", "models/mean-rgb/survival/metrics.json"):
        assert key in files, key
    assert sum(k.startswith("cohort/slides/") and k.endswith(".tiff") for k in files) == 8
    # Ray Train wrote its checkpoints to the bucket itself (no local storage path on a cluster).
    assert any(k.startswith("encoders/mtl/checkpoints/") for k in files)
    assert any(k.startswith("models/mtl/survival/ray/") for k in files)
    report_time = files["report.md"].mtime
    assert all(i.mtime <= report_time for k, i in files.items() if k.startswith("report/"))

    # A new node: nothing local. Grids read straight from the URI; a re-run skips every stage.
    _forget(s3_bucket)
    grid, mask = load_grid(f"{study}/grids/mtl", "S0000")
    assert grid.shape[0] == 16 and mask.any()
    encoder_stamp = files["encoders/mtl/encoder.json"].mtime
    capsys.readouterr()
    assert main(["pipeline", "--config", str(path)]) == 0
    again = _bucket_files(study)
    assert again["encoders/mtl/encoder.json"].mtime == encoder_stamp
    assert set(read_manifest(f"{study}/grids/mtl")["status"]) == {"skipped"}  # no slide encoded again
    assert "2 fold(s) already complete, skipping" in capsys.readouterr().err
    assert os.path.exists(mirror_path(f"{study}/report.md"))


def test_a_full_mirror_drops_the_oldest_uploaded_copies_never_pending_outputs(s3_bucket, monkeypatch, tmp_path):
    from nic.storage import _make_room

    monkeypatch.setenv("NIC_MIRROR", str(tmp_path / "mirror"))  # this node's mirror holds only these files
    folder = mirror_path(f"{s3_bucket}/lru")
    folder.mkdir(parents=True)
    for i, name in enumerate(("old.bin", "mid.bin", "new.bin")):
        (folder / name).write_bytes(bytes(1000))
        publish(folder / name)
        os.utime(folder / name, ns=(10**15 + i * 10**9, (folder / name).stat().st_mtime_ns))  # used: old < mid < new
    (folder / "pending.bin").write_bytes(bytes(1000))  # written here, not uploaded yet
    os.utime(folder / "pending.bin", ns=(10**9, (folder / "pending.bin").stat().st_mtime_ns))  # the oldest of all
    monkeypatch.setenv("NIC_MIRROR_MAX_GB", str(3000 / 1e9))
    assert _make_room(1500, keep=folder / "new.bin") == 2000
    assert sorted(p.name for p in folder.iterdir()) == ["new.bin", "pending.bin"]
    assert ensure_local(folder / "old.bin").read_bytes() == bytes(1000)  # fetched again when needed


def _upload_tree(folder: Path, uri: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            _put(f"{uri}/{path.relative_to(folder).as_posix()}", path.read_bytes())


@pytest.mark.heavy
@pytest.mark.integration
@pytest.mark.usefixtures("ray_session")
def test_a_search_reads_its_cohort_from_a_bucket_and_keeps_trials_and_checkpoints_there(
        s3_bucket, tiny_cohort, tmp_path, capfd):
    import pandas as pd

    from nic.cli.main import main

    cohort = f"{s3_bucket}/cohort"
    _upload_tree(tiny_cohort, cohort)
    out = f"{s3_bucket}/tune"
    config = tiny_search(f"{cohort}/tasks.yaml", f"{cohort}/slides", f"{cohort}/labels.csv", out,
                         space={"encoder_lr": [2e-3], "downstream_lr": [1e-3]})
    path = write_config(config, tmp_path / "tune.yaml")
    assert main(["tune", "--config", str(path)]) == 0
    assert "2/2 trials done" in capfd.readouterr().err

    files = _bucket_files(out)
    for key in ("trials.parquet", "trials.csv", "best_config.yaml", "tasks_vs_metric.png"):
        assert key in files, key
    assert any(k.startswith("ray/") for k in files)  # Tune's experiment state, for Tuner.restore
    trials = [k for k in files if k.startswith("trials/") and k.endswith("encoder/encoder.json")]
    assert len(trials) == 2  # each trial's encoder, grids and model, uploaded by the trial itself
    _forget(s3_bucket)
    table = pd.read_parquet(ensure_local(mirror_path(f"{out}/trials.parquet")))
    assert len(table) == 2 and table["complete"].any()


def test_a_failed_upload_fails_the_stage_by_name_and_keeps_the_outputs(s3_server, capsys):
    from nic.cli.main import main

    target = "s3://nic-no-such-bucket/encoder"
    assert main(["train-encoder", "--set", "kind=random", "--set", "embedding_dim=8", "--out", target]) == 1
    err = capsys.readouterr().err
    assert f"{target}: upload failed" in err and "a re-run uploads them" in err
    assert (mirror_path(target) / "encoder.json").exists()  # nothing written is lost
