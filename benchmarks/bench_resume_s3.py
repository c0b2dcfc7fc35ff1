"""Resume at scale on an object store: a re-run of `nic compress --out s3://...` over a finished grid
store, in a local S3 server (moto), counted by the server.

Run:  .venv/bin/python benchmarks/bench_resume_s3.py [--slides 1000] [--tiles 16] [--repeats 3] [--write]

Builds, in one process: a local S3 server whose every request is logged with its response bytes
(tests/s3_requests.py); a bucket with --slides slide objects (a few bytes each: a re-run that finds
every slide complete never opens one) and a grid store of one grid per slide (--tiles tiles of
random embeddings at the encoder's C, written with nic's own grid writer, tests/grid_factory.py)
with the manifest `nic compress` would have written, uploaded as the stage uploads its outputs.
Then times `nic compress --slides s3://B/slides --encoder ENCODER --out s3://B/grids` (in this
process, via nic.cli.main; no Ray starts, since nothing is left to encode) in two ways:

  before: the whole output prefix is fetched into the node's mirror first and every grid file is
          verified from its local copy (`nic.storage.PREFETCH_OUTPUTS = True`, what every re-run
          did until issue 16 item 6);
  after:  the default: grids are not fetched; the manifest vouches for each grid whose object in
          the bucket listing has the size the manifest recorded (and is not newer than the
          manifest); only grids it cannot vouch for are fetched and verified.

each from an empty mirror (a new node, or a job whose driver lands on another node) and again on
the same node (the mirror as the previous run left it). Every run must end with every slide
'skipped' (already complete). Reported per run: wall time of the whole command and of fetching +
deciding (up to the stage's plan line, less the encoder's loading), requests the server received,
object GETs (of grid files among them) and bytes it sent. Results go to
benchmarks/results/resume_s3.md between the bench_resume_s3 markers (--write).

A second table: the mirror's size limit is checked before a big download; it used to walk the
whole mirror each time. Here --slides grid files are fetched one by one into a mirror already
holding a copy of the store, with every download checking the limit (`_BIG = 0`): walks and
time, with a scan per download (before: `_RESCAN_S = 0`) and with the running total (after).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_model  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

RESULTS = REPO / "benchmarks" / "results" / "resume_s3.md"
START, END = "<!-- bench_resume_s3:start -->", "<!-- bench_resume_s3:end -->"


def machine() -> str:
    return f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, {platform.system()} {platform.release()}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server():
    """A moto S3 server on a free local port, its requests logged; the environment points at it."""
    import logging

    from moto.server import ThreadedMotoServer

    from s3_requests import install

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    })
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, install(server)


def _put_many(uri: str, names: list[str], data: bytes) -> None:
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(uri)
    for name in names:
        with fs.open_output_stream(f"{base}/{name}") as out:
            out.write(data)


def build_store(bucket: str, n: int, tiles: int, encoder: str) -> tuple[list[str], int]:
    """Slides and a finished grid store of n slides in the bucket; returns (command args, grid bytes)."""
    from grid_factory import compress_setup, write_grid_store
    from nic.storage import mirror_path, publish

    ids = [f"S{i:05d}" for i in range(n)]
    _put_many(f"{bucket}/slides", [f"{sid}.tiff" for sid in ids], b"II*\x00 never opened")
    slides, grids = f"{bucket}/slides", f"{bucket}/grids"
    config, facts, options_hash, transforms = compress_setup([slides], encoder, grids)
    local = mirror_path(grids)
    rows = write_grid_store(local, {sid: f"{slides}/{sid}.tiff" for sid in ids}, facts, options_hash, transforms,
                            tiles=tiles, config=config)
    publish(local)
    shutil.rmtree(local)  # what the bucket holds is what a re-run sees
    return ["compress", "--slides", slides, "--encoder", encoder, "--out", grids], sum(
        r["file_bytes"] for r in rows.values())


class _PlanClock:
    """A stderr stand-in that notes when the stage prints its plan ("[compress] N inputs: ..."),
    which it does right after deciding what is complete."""

    def __init__(self) -> None:
        self.at: float | None = None

    def write(self, text: str) -> int:
        if self.at is None and "inputs:" in text:
            self.at = time.perf_counter()
        return len(text)

    def flush(self) -> None:
        pass


def rerun(args: list[str], log, bucket_name: str, fresh_mirror: bool) -> dict:
    import nic.compress.stage as stage
    from nic.cli.main import main
    from nic.storage import mirror_path

    out = mirror_path(args[args.index("--out") + 1])
    if fresh_mirror:
        shutil.rmtree(out, ignore_errors=True)
    loading = [0.0]
    load = stage.encoder_facts

    def timed_load(config):
        t = time.perf_counter()
        try:
            return load(config)
        finally:
            loading[0] += time.perf_counter() - t

    stage.encoder_facts = timed_load
    clock = _PlanClock()
    log.clear()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(clock):
            code = main(args)
    finally:
        stage.encoder_facts = load
    wall = time.perf_counter() - start
    requests = [r for r in log.snapshot() if r.bucket == bucket_name]
    import pyarrow.parquet as pq

    statuses = set(pq.read_table(out / "slides.parquet").column("status").to_pylist())
    if code != 0 or statuses != {"skipped"}:
        raise SystemExit(f"the re-run did not find every slide complete (exit {code}, statuses {statuses})")
    gets = [r for r in requests if r.is_object_get]
    return {
        "wall": wall, "decision": (clock.at or start) - start - loading[0], "requests": len(requests),
        "lists": sum(r.method == "GET" and not r.key for r in requests),
        "heads": sum(r.method == "HEAD" for r in requests),
        "puts": sum(r.method == "PUT" for r in requests),
        "gets": len(gets), "grid_gets": sum(r.key.startswith("grids/tiles/") for r in gets),
        "bytes": sum(r.bytes for r in requests),
    }


def bench_mirror_check(bucket: str, n: int) -> list[tuple[str, int, float, float]]:
    """Fetch n grid files one by one with every download checking the mirror's limit."""
    import nic.storage as storage

    listing = storage.remote_files(storage.mirror_path(f"{bucket}/grids")) or {}
    keys = sorted(k for k in listing if k.startswith("tiles/"))[:n]
    results = []
    big, rescan = storage._BIG, storage._RESCAN_S
    scans = [0]
    checking = [0.0]
    scan, make_room = storage._scan_mirror, storage._make_room

    def counted(*a, **k):
        scans[0] += 1
        return scan(*a, **k)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return make_room(*a, **k)
        finally:
            checking[0] += time.perf_counter() - t

    storage._scan_mirror, storage._make_room = counted, timed
    try:
        for label, interval in (("before: a walk of the mirror per download", 0.0),
                                ("after: a running total, rescanned every "
                                 f"{storage._RESCAN_S:g} s or near the limit", rescan)):
            shutil.rmtree(storage.mirror_path(f"{bucket}/grids/tiles"), ignore_errors=True)
            storage._BIG, storage._RESCAN_S = 0, interval
            storage._forget_usage()
            storage.ensure_local(storage.mirror_path(f"{bucket}/grids"))  # the mirror holds the whole store
            for key in keys:  # dropped again, so each is downloaded once more below
                storage.mirror_path(f"{bucket}/grids/{key}").unlink()
            scans[0], checking[0] = 0, 0.0
            start = time.perf_counter()
            for key in keys:
                storage.ensure_local(storage.mirror_path(f"{bucket}/grids/{key}"))
            results.append((label, scans[0], checking[0], time.perf_counter() - start))
    finally:
        storage._BIG, storage._RESCAN_S, storage._scan_mirror, storage._make_room = big, rescan, scan, make_room
        storage._forget_usage()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--tiles", type=int, default=16, help="tissue tiles per grid")
    ap.add_argument("--encoder", default="mean-rgb", help="a built-in encoder (its C sizes the grids)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode and mirror state (median)")
    ap.add_argument("--write", action="store_true", help=f"write the table into {RESULTS.relative_to(REPO)}")
    args = ap.parse_args(argv)

    mirror = tempfile.mkdtemp(prefix="nic-bench-mirror-")
    os.environ["NIC_MIRROR"] = mirror
    server, log = start_server()
    try:
        import pyarrow.fs as pafs

        import nic.storage as storage

        name = "nic-bench-resume"
        fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
        fs.create_dir(name)
        bucket = f"s3://{name}"
        t = time.perf_counter()
        command, grid_bytes = build_store(bucket, args.slides, args.tiles, args.encoder)
        print(f"built {args.slides} slides and grids ({grid_bytes / 1e6:.1f} MB of grids) in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        rerun(command, log, name, fresh_mirror=True)  # warm-up: imports, the encoder's first load

        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeats):
            for mode in ("before", "after"):
                storage.PREFETCH_OUTPUTS = mode == "before"
                for state, fresh in (("new node (empty mirror)", True), ("same node (mirror kept)", False)):
                    result = rerun(command, log, name, fresh_mirror=fresh)
                    runs.setdefault((mode, state), []).append(result)
                    print(f"{mode:6s} {state:25s} {result['wall']:6.2f} s, {result['requests']} requests, "
                          f"{result['grid_gets']} grid GETs, {result['bytes'] / 1e6:.2f} MB", flush=True)
        storage.PREFETCH_OUTPUTS = False
        mirror_rows = bench_mirror_check(bucket, args.slides)
    finally:
        server.stop()
        shutil.rmtree(mirror, ignore_errors=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        START,
        f"Command: `.venv/bin/python benchmarks/bench_resume_s3.py --slides {args.slides} --tiles {args.tiles} "
        f"--encoder {args.encoder} --repeats {args.repeats} --write`",
        "",
        f"Machine: {machine()}; load average at the end {load} (shared machine). S3: moto "
        "(ThreadedMotoServer) in the same process, every request logged with its response bytes.",
        f"Store: {args.slides} slides, one grid each ({args.tiles} tiles, encoder {args.encoder}, "
        f"{grid_bytes / args.slides / 1e3:.1f} kB per grid, {grid_bytes / 1e6:.1f} MB in all) and its manifest. "
        f"The re-run: `nic {' '.join(command)}`, in-process after a warm-up; every run ends with all "
        f"{args.slides} slides 'skipped'. Medians of {args.repeats} runs.",
        "",
        "| re-run | mirror | whole command (s) | fetching + deciding (s) | requests | listings | HEADs "
        "| object GETs | of them grid files | PUTs | bytes sent by the server |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (mode, state), rows in runs.items():
        label = {"before": "before (whole output fetched, grids verified locally)",
                 "after": "after (manifest + listing; grids not fetched)"}[mode]
        lines.append(f"| {label} | {state} | {med(rows, 'wall'):.2f} | {med(rows, 'decision'):.2f} | "
                     f"{med(rows, 'requests'):.0f} | {med(rows, 'lists'):.0f} | {med(rows, 'heads'):.0f} | "
                     f"{med(rows, 'gets'):.0f} | {med(rows, 'grid_gets'):.0f} | {med(rows, 'puts'):.0f} | "
                     f"{med(rows, 'bytes') / 1e6:.2f} MB |")
    before = runs[("before", "new node (empty mirror)")]
    after = runs[("after", "new node (empty mirror)")]
    lines += [
        "",
        "Fetching + deciding: from the start of the command to the stage's plan line (`[compress] N inputs: "
        "...`), without loading the encoder: parsing, fetching the output, listing the slides, reading the "
        "manifest and deciding for each slide. The rest of the command writes and uploads the manifest.",
        "",
        f"New node: deciding {med(before, 'decision') / max(med(after, 'decision'), 1e-9):.1f}x faster; grid files "
        f"downloaded {med(before, 'grid_gets'):.0f} -> {med(after, 'grid_gets'):.0f}, requests "
        f"{med(before, 'requests'):.0f} -> {med(after, 'requests'):.0f}, bytes {med(before, 'bytes') / 1e6:.2f} MB "
        f"-> {med(after, 'bytes') / 1e6:.2f} MB. Bytes grow with the grids (real grids are MBs each: thousands "
        "of tiles x C float16), requests with the slides.",
        "",
        f"Mirror size check: {args.slides} grid files fetched one by one into a mirror holding the store "
        f"({args.slides + 2} files), every download checking the limit:",
        "",
        f"| size check | mirror walks during the {args.slides} downloads | time in the size checks (s) "
        "| time of the downloads, checks included (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, walks, checks, seconds in mirror_rows:
        lines.append(f"| {label} | {walks} | {checks:.3f} | {seconds:.2f} |")
    lines.append(END)
    table = "\n".join(lines)
    print(table)
    if args.write:
        from collect_results import replace_section

        replace_section(RESULTS, START, END, table, "# Resume on an object store")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
