"""Faults during a job: an encoder actor killed mid-job, the driver killed mid-job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from compress_support import (
    INNER_CELLS,
    SMALL_TISSUE,
    colour_image,
    manifest_rows,
    random_encoder_grid,
    write_slide,
)
from nic.cli.main import main
from nic.grids import list_slides, load_grid, verify_grid_file
from nic.grids.schema import slide_file

pytestmark = pytest.mark.usefixtures("ray_session")

ALL_CELLS = INNER_CELLS  # 60 tissue tiles per slide
ENCODER_CLASS = "MapBatches(EncoderActor)"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    images = {}
    for i in range(4):
        images[f"s{i}"] = colour_image(cells=ALL_CELLS, texture=True, seed=i)
        write_slide(folder / f"s{i}.tiff", images[f"s{i}"])
    return folder, images


def encoder_actors() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values() if ENCODER_CLASS in a.get("ActorClassName", "")]


def test_killed_encoder_actor_loses_and_duplicates_nothing(cohort, tmp_path):
    folder, images = cohort
    out = tmp_path / "grids"
    args = ["compress", "--slides", str(folder), "--encoder", "random", "--out", str(out), "--batch-size", "8",
            "--read-parallelism", "1"] + [x for s in SMALL_TISSUE for x in ("--set", s)]
    codes: list[int] = []
    job = threading.Thread(target=lambda: codes.append(main(args)))
    job.start()

    # Kill the encoder actor's process from outside (SIGKILL: no cleanup, like an OOM kill) once
    # the job is visibly under way: the first slide written, the others not yet.
    killed = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.is_alive() and killed is None:
        alive = [a for a in encoder_actors() if a["State"] == "ALIVE" and a.get("Pid")]
        if alive and (out / "tiles").exists() and list_slides(out):
            killed = alive[0]
            os.kill(killed["Pid"], signal.SIGKILL)
        time.sleep(0.02)
    assert killed is not None, "the job ended before the actor could be killed; make it longer"
    done_at_kill = list_slides(out)
    assert len(done_at_kill) < 4, "the kill must land mid-job"
    job.join(timeout=600)
    assert codes == [0]

    after = {a["ActorID"]: a for a in encoder_actors()}
    assert after[killed["ActorID"]]["NumRestarts"] >= 1, "Ray Data restarted the killed actor"
    rows = manifest_rows(out)
    assert set(rows) == {"s0", "s1", "s2", "s3"} and {r["status"] for r in rows.values()} == {"ok"}
    for sid, image in images.items():
        path = slide_file(out, sid)
        verify_grid_file(path)
        table = pq.read_table(path, columns=["row", "col"])
        cells = set(zip(table.column("row").to_pylist(), table.column("col").to_pylist(), strict=True))
        assert table.num_rows == len(ALL_CELLS) == len(cells), f"{sid}: a tile lost or written twice"
        grid, mask = load_grid(out, sid)
        assert mask.sum() == len(ALL_CELLS)
        np.testing.assert_allclose(grid, random_encoder_grid(image), atol=2e-2, rtol=1e-2, err_msg=sid)


def test_killed_job_leaves_only_complete_grids_and_resumes(cohort, tmp_path, ray_session):
    folder, _ = cohort
    out = tmp_path / "grids"
    address = ray_session.get_runtime_context().gcs_address
    args = ["compress", "--slides", str(folder), "--encoder", "random", "--out", str(out), "--batch-size", "8",
            "--address", address] + [x for s in SMALL_TISSUE for x in ("--set", s)]
    # The driver runs as its own process on the shared Ray instance, so it can be SIGKILLed.
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would stall the driver
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "nic.cli.main", *args], stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "tiles").exists() and list_slides(out):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it could be killed: {log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    complete = list_slides(out)
    assert 1 <= len(complete) < 4
    for sid in complete:
        verify_grid_file(slide_file(out, sid))  # whatever is there is whole
    if (out / "slides.parquet").exists():  # an early manifest lists only finished slides
        assert {r["status"] for r in manifest_rows(out).values()} <= {"ok"}

    assert main(args) == 0  # in this process: connects to the same Ray instance
    rows = manifest_rows(out)
    assert set(rows) == {"s0", "s1", "s2", "s3"}
    assert {sid for sid, r in rows.items() if r["status"] == "skipped"} == set(complete)
    assert {sid for sid, r in rows.items() if r["status"] == "ok"} == {"s0", "s1", "s2", "s3"} - set(complete)
    for sid in rows:
        assert pq.ParquetFile(slide_file(out, sid)).metadata.num_rows == 60
