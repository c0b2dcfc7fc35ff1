"""Resume at scale on an object store (issue 16 item 6), against the local S3 server (moto), whose
request log counts what a stage downloads.

A re-run of `nic compress --out s3://...` decides what is complete from the manifest and one
listing of the bucket without downloading a grid; a grid the manifest cannot vouch for (cut short,
replaced, of another slide, missing) is fetched, verified and redone as in a local store, and a
stale grid is deleted from the bucket. Grid stores are written directly with nic's grid writer
(tests/grid_factory.py) and the slides are a few bytes each, so nothing here starts Ray: a re-run
that finds every slide complete never does, and the one that has slides to encode gets a stand-in
for the Ray pass (`_compress_on_ray`) that writes grids as the collector would. The same re-run with
Ray and real slides: tests/test_storage.py::test_compress_reads_slides_and_an_encoder_from_a_bucket...
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import nic.storage as storage
from grid_factory import compress_setup, write_grid_store
from nic.storage import ensure_local, mirror_path, publish, remote_files

N = 20


def _put(uri: str, data: bytes) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as out:
        out.write(data)


def _get(uri: str) -> bytes:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as src:
        return src.read()


def _forget(uri: str) -> None:
    shutil.rmtree(mirror_path(uri), ignore_errors=True)


@pytest.fixture
def store(s3_bucket, monkeypatch):
    """N slides (a few bytes each: never opened) and their finished grid store in the bucket, the
    mirror empty (a new node). Yields (bucket, slide ids, compress arguments, grids URI)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # should anything try to start Ray, it fails at once
    ids = [f"s{i:02d}" for i in range(N)]
    for sid in ids:
        _put(f"{s3_bucket}/slides/{sid}.tiff", b"II*\x00 never opened")
    slides, grids = f"{s3_bucket}/slides", f"{s3_bucket}/grids"
    config, facts, options_hash, transforms = compress_setup([slides], "mean-rgb", grids)
    local = mirror_path(grids)
    write_grid_store(local, {sid: f"{slides}/{sid}.tiff" for sid in ids}, facts, options_hash, transforms,
                     config=config)
    assert publish(local) == N + 2  # grids, then compress_config.yaml and slides.parquet
    _forget(s3_bucket)
    return s3_bucket, ids, ["compress", "--slides", slides, "--encoder", "mean-rgb", "--out", grids], grids


def _manifest(grids: str) -> dict[str, dict]:
    path = ensure_local(mirror_path(f"{grids}/slides.parquet"))
    return {r["slide_id"]: r for r in pq.read_table(path).to_pylist()}


def _grid_gets(log, bucket: str) -> list[str]:
    return sorted(r.key for r in log.object_gets(bucket.removeprefix("s3://"), "grids/tiles/"))


def test_a_rerun_over_a_finished_store_downloads_no_grid(store, s3_requests, capsys, monkeypatch):
    from nic.cli.main import main

    bucket, ids, args, grids = store
    assert main(args) == 0
    assert _grid_gets(s3_requests, bucket) == []  # counted by the server: not one grid file fetched
    err = capsys.readouterr().err
    assert f"{N} already complete" in err and f"{N} grid(s) vouched for without a download, 0 fetched" in err
    assert not any(mirror_path(grids).glob("tiles/*/*.parquet"))  # and none copied to this node
    manifest = _manifest(grids)
    assert {r["status"] for r in manifest.values()} == {"skipped"} and sorted(manifest) == ids
    sizes = {k: f.size for k, f in remote_files(mirror_path(grids)).items() if k.startswith("tiles/")}
    assert all(sizes[r["file"]] == r["file_bytes"] for r in manifest.values())  # vouches for the next run too

    # Again on this node, and from an empty mirror: still nothing fetched.
    s3_requests.clear()
    assert main(args) == 0
    _forget(bucket)
    assert main(args) == 0
    assert _grid_gets(s3_requests, bucket) == []

    # Listing the grids of a store needs no grid either (the report, `nic grids ls`).
    from nic.grids import GridError, list_slides

    _forget(bucket)
    assert list_slides(grids) == ids and _grid_gets(s3_requests, bucket) == []
    with pytest.raises(GridError, match="no such grid folder"):
        list_slides(f"{bucket}/nothing")

    # What every re-run did before: fetch the whole store, then verify each grid locally.
    _forget(bucket)
    s3_requests.clear()
    monkeypatch.setattr(storage, "PREFETCH_OUTPUTS", True)
    assert main(args) == 0
    assert len(_grid_gets(s3_requests, bucket)) == N
    assert {r["status"] for r in _manifest(grids).values()} == {"skipped"}


def _fake_encoding(monkeypatch, fail: frozenset[str] = frozenset()) -> list[str]:
    """Stand in for the Ray pass: grids written as the collector would (or a failed row for the
    slides in `fail`); returns the list of slide ids it was asked to encode."""
    import nic.compress.stage as stage
    from nic.grids.manifest import failed_row

    encoded: list[str] = []

    def fake(config, todo, out, facts, options_hash, transforms, results, order, path):
        encoded.extend(sid for sid, _ in todo)
        ok = {sid: p for sid, p in todo if sid not in fail}
        results.update(write_grid_store(out, ok, facts, options_hash, transforms, seed=7, manifest=False))
        results.update({sid: failed_row(sid, p, f"{p}: could not be read", "read") for sid, p in todo if sid in fail})
        return {}

    monkeypatch.setattr(stage, "_compress_on_ray", fake)
    return encoded


def test_grids_the_manifest_cannot_vouch_for_are_fetched_verified_and_redone(store, s3_requests, capsys,
                                                                             monkeypatch, tmp_path):
    from nic.cli.main import main

    bucket, ids, args, grids = store
    files = remote_files(mirror_path(grids))
    time.sleep(1.1)  # object times are whole seconds: the damage below is newer than the manifest
    # s03 cut in half; s05 replaced by a complete grid of fewer tiles; s07 gone; s09 holds s10's grid.
    key = "tiles/slide_id={}/part-0.parquet"
    _put(f"{grids}/{key.format('s03')}", _get(f"{grids}/{key.format('s03')}")[: files[key.format('s03')].size // 2])
    _, facts, options_hash, transforms = compress_setup([f"{bucket}/slides"], "mean-rgb", grids)
    write_grid_store(tmp_path / "fewer", {"s05": f"{bucket}/slides/s05.tiff"}, facts, options_hash, transforms,
                     tiles=11)
    _put(f"{grids}/{key.format('s05')}", (tmp_path / "fewer" / key.format("s05")).read_bytes())
    pafs.FileSystem.from_uri(f"{grids}/{key.format('s07')}")[0].delete_file(
        f"{bucket.removeprefix('s3://')}/grids/{key.format('s07')}")
    _put(f"{grids}/{key.format('s09')}", _get(f"{grids}/{key.format('s10')}"))

    encoded = _fake_encoding(monkeypatch, fail=frozenset({"s03"}))
    s3_requests.clear()
    assert main(args) == 0
    assert encoded == ["s03", "s05", "s07", "s09"]
    # Only the grids the manifest could not vouch for were fetched (the missing one could not be).
    assert _grid_gets(s3_requests, bucket) == ["grids/" + key.format(s) for s in ("s03", "s05", "s09")]
    err = capsys.readouterr().err
    for why in ("incomplete or unreadable grid", "tile count disagrees with the manifest", "new",
                "file belongs to another slide id"):
        assert f"1 {why}" in err, why
    assert f"{N - 4} grid(s) vouched for without a download, 3 fetched to be verified" in err

    manifest = _manifest(grids)
    assert [s for s, r in manifest.items() if r["status"] == "ok"] == ["s05", "s07", "s09"]
    assert manifest["s03"]["status"] == "failed"
    # The stale grid of the slide that failed is gone from the bucket too: no later run or reader
    # may take it for complete (the manifest says failed).
    now = remote_files(mirror_path(grids))
    assert key.format("s03") not in now and all(key.format(s) in now for s in ids if s != "s03")

    # The next run, from an empty mirror: only s03 is left to encode, and no grid is fetched.
    _forget(bucket)
    encoded.clear()
    s3_requests.clear()
    assert main(args) == 0
    assert encoded == ["s03"] and _grid_gets(s3_requests, bucket) == []
    assert {r["status"] for s, r in _manifest(grids).items() if s != "s03"} == {"skipped"}


def test_a_store_from_before_file_bytes_is_verified_by_fetching_once(store, s3_requests, capsys, monkeypatch):
    """A manifest without `file_bytes` (written before it existed) vouches for nothing: each grid is
    fetched and verified once, as every re-run used to, and the manifest then records the sizes."""
    from nic.cli.main import main

    bucket, ids, args, grids = store
    path = ensure_local(mirror_path(f"{grids}/slides.parquet"))
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["file_bytes"]), path)
    publish(path)
    _forget(bucket)
    s3_requests.clear()
    assert main(args) == 0
    assert len(_grid_gets(s3_requests, bucket)) == N
    _forget(bucket)
    s3_requests.clear()
    assert main(args) == 0
    assert _grid_gets(s3_requests, bucket) == []


def test_lazy_folders_of_an_output_are_not_fetched_and_never_keep_stale_copies(s3_bucket):
    out = mirror_path(f"{s3_bucket}/out")
    (out / "tiles" / "a").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (out / "tiles" / name).mkdir(parents=True, exist_ok=True)
        (out / "tiles" / name / "part-0.parquet").write_bytes(name.encode() * 100)
    (out / "slides.parquet").write_bytes(b"manifest")
    assert publish(out) == 4
    _put(f"{s3_bucket}/out/tiles/b/part-0.parquet", b"replaced in the bucket")  # b's copy is stale now
    (out / "tiles" / "c" / "part-0.parquet").write_bytes(b"written here, superseded by the bucket's")
    (out / "tiles" / "d").mkdir()
    (out / "tiles" / "d" / "part-0.parquet").write_bytes(b"written here, not uploaded yet")
    (out / "slides.parquet").unlink()

    ensure_local(out, lazy=("tiles",))
    assert (out / "slides.parquet").read_bytes() == b"manifest"  # everything else is fetched
    assert (out / "tiles" / "a" / "part-0.parquet").exists()  # a current copy stays
    assert not (out / "tiles" / "b" / "part-0.parquet").exists()  # stale: removed, not fetched
    assert not (out / "tiles" / "c" / "part-0.parquet").exists()  # the bucket is the truth
    assert (out / "tiles" / "d" / "part-0.parquet").exists()  # pending upload: kept
    listing = remote_files(out)
    assert sorted(listing) == ["slides.parquet", "tiles/a/part-0.parquet", "tiles/b/part-0.parquet",
                               "tiles/c/part-0.parquet"]
    assert listing["tiles/b/part-0.parquet"].size == len(b"replaced in the bucket")
    assert storage.is_current_copy(out / "tiles" / "a" / "part-0.parquet", listing["tiles/a/part-0.parquet"])
    assert remote_files(Path("/not/a/mirror/path")) is None

    _forget(s3_bucket)  # a new node: patterns match one name per `*`
    ensure_local(out, lazy=("t*",))
    assert (out / "slides.parquet").exists() and not (out / "tiles").exists()
    monkeypatch_free = storage.PREFETCH_OUTPUTS
    try:
        storage.PREFETCH_OUTPUTS = True  # the benchmark's "before": lazy folders are fetched too
        ensure_local(out, lazy=("tiles",))
        assert (out / "tiles" / "b" / "part-0.parquet").read_bytes() == b"replaced in the bucket"
    finally:
        storage.PREFETCH_OUTPUTS = monkeypatch_free


def test_the_mirror_size_check_walks_the_mirror_on_a_schedule_not_per_download(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("NIC_MIRROR", str(tmp_path / "mirror"))
    storage._forget_usage()
    folder = mirror_path(f"{s3_bucket}/many")
    folder.mkdir(parents=True)
    for i in range(30):
        (folder / f"{i:02d}.bin").write_bytes(bytes(1000))
    publish(folder)
    shutil.rmtree(folder)

    walks = []
    scan = storage._scan_mirror
    monkeypatch.setattr(storage, "_scan_mirror", lambda root: walks.append(root) or scan(root))
    monkeypatch.setattr(storage, "_BIG", 0)  # every download checks the limit
    for i in range(30):
        ensure_local(folder / f"{i:02d}.bin")
    assert len(walks) == 1  # one walk, then the running total (was: 30 walks)

    # The total says the next download would not fit: a walk, which drops the oldest copies down to
    # the low-water mark, so the following downloads fit without one.
    monkeypatch.setenv("NIC_MIRROR_MAX_GB", str(25_500 / 1e9))
    for i in range(30):
        os.utime(folder / f"{i:02d}.bin", ns=(10**15 + i * 10**9, (folder / f"{i:02d}.bin").stat().st_mtime_ns))
    (folder / "00.bin").unlink()
    ensure_local(folder / "00.bin")
    assert len(walks) == 2
    kept = sorted(p.name for p in folder.iterdir())
    assert "00.bin" in kept and "01.bin" not in kept and sum(1 for _ in folder.iterdir()) * 1000 <= 0.9 * 25_500
    for name in ("01.bin", "02.bin"):
        ensure_local(folder / name)
    assert len(walks) == 2

    # A walk is good for _RESCAN_S only: other processes on the node fetch too.
    monkeypatch.setattr(storage, "_RESCAN_S", 0.0)
    (folder / "03.bin").unlink(missing_ok=True)
    ensure_local(folder / "03.bin")
    assert len(walks) == 3
    storage._forget_usage()


def test_a_tile_rerun_decides_from_the_manifest_and_redoes_only_a_damaged_slide(
        s3_bucket, s3_requests, real_slide, capsys, monkeypatch):
    """`nic tile --out s3://...` the same way: tile files and overviews are not fetched unless the
    manifest cannot vouch for them. The outputs are made by the stage's own worker function, without
    Ray (and the re-tiling of the damaged slide too)."""
    import nic.tiling.stage as tile_stage
    from nic.artifacts import stable_hash, write_manifest
    from nic.cli.main import main
    from nic.config.tile import TileConfig
    from nic.storage import to_local
    from nic.tiling.worker import MANIFEST_SCHEMA, tile_one_slide

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    ids = ["a", "b", "c"]
    for sid in ids:
        _put(f"{s3_bucket}/slides/{sid}.svs", real_slide.read_bytes())
    slides, out = f"{s3_bucket}/slides", f"{s3_bucket}/tiled"
    config = TileConfig(slides=[to_local(slides)], out=to_local(out))
    options_hash = stable_hash(config.slide.model_dump(mode="json"))

    def tile(sid: str) -> dict:
        return tile_one_slide({"slide_id": sid, "path": to_local(f"{slides}/{sid}.svs")}, config.slide,
                              mirror_path(out), config.thumbnail_px, options_hash)

    rows = [tile(sid) for sid in ids]  # each publishes its own files, as on a cluster
    assert {r["status"] for r in rows} == {"ok"}
    write_manifest(mirror_path(out) / "slides.parquet", rows, MANIFEST_SCHEMA)
    publish(mirror_path(out))
    _forget(s3_bucket)

    bucket = s3_bucket.removeprefix("s3://")
    args = ["tile", "--slides", slides, "--out", out]
    s3_requests.clear()
    assert main(args) == 0
    assert s3_requests.object_gets(bucket, "tiled/tiles/") == [] == s3_requests.object_gets(bucket, "tiled/thumbnails/")
    assert s3_requests.object_gets(bucket, "slides/") == []  # nor a slide
    assert "3 slide(s) vouched for without a download, 0 fetched" in capsys.readouterr().err
    manifest = pq.read_table(ensure_local(mirror_path(f"{out}/slides.parquet"))).to_pylist()
    assert {r["status"] for r in manifest} == {"skipped"} and all(r["file_bytes"] for r in manifest)

    time.sleep(1.1)
    whole = _get(f"{out}/tiles/b.parquet")
    _put(f"{out}/tiles/b.parquet", whole[: len(whole) // 2])
    _forget(s3_bucket)
    redone: list[str] = []

    def fake(config, todo, out_dir, options_hash, results, order, manifest_path):
        for item in todo:
            redone.append(item.slide_id)
            results[item.slide_id] = tile(item.slide_id)

    monkeypatch.setattr(tile_stage, "_tile_on_ray", fake)
    s3_requests.clear()
    assert main(args) == 0
    assert redone == ["b"]
    fetched = sorted(r.key for r in s3_requests.object_gets(bucket, "tiled/t") if "/b." in r.key or "/a." in r.key
                     or "/c." in r.key)
    assert fetched == ["tiled/thumbnails/b.png", "tiled/tiles/b.parquet"]  # only the slide it could not vouch for
    assert _get(f"{out}/tiles/b.parquet") == whole
