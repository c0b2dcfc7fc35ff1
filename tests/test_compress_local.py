"""`nic compress` without Ray (an embedded run: no address, no Ray running in the process): one
encoder in this process (nic.compress.local) writes the Ray path's grids and rows, resumes as it
does, and reports bad slides the same way.

Which path runs is decided by nic.compress.stage._use_ray. The test that nothing of Ray starts runs
`nic compress` in a fresh process without RAY_ADDRESS, since this session may have started Ray for
other tests (and then run_compress rightly uses it); the others choose the local path in this
process by patching that rule, as tests/test_tile_batches.py does for tile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import nic.compress.stage as compress_stage
from compress_support import manifest_rows
from nic.cli.main import main
from nic.compress.actors import EncoderActor

REPO = Path(__file__).resolve().parent.parent
GOOD = ("he_a", "he_b")
#: The bad real fixtures and what each is (tests/test_tile_local.py finds the same with nic tile).
BAD = {"small": "too_small", "unreadable": "unreadable", "unopenable": "unopenable", "boxes": "bad_mpp"}


@pytest.fixture(scope="module")
def slides(shared_slides, tmp_path_factory) -> Path:
    """The real H&E slide under two ids (so a batch can hold tiles of two slides) beside the four
    bad fixtures: a collection as users have them."""
    folder = tmp_path_factory.mktemp("local") / "slides"
    folder.mkdir()
    for sid in GOOD:
        (folder / f"{sid}.svs").symlink_to(shared_slides / "small_HE.svs")
    for name in ("small.svs", "unreadable.svs", "unopenable.tiff", "boxes.tiff"):
        (folder / name).symlink_to(shared_slides / name)
    return folder


def compress(slides: Path, out: Path, encoder: str = "mean-rgb", *extra: str) -> list[str]:
    return ["compress", "--slides", str(slides), "--encoder", encoder, "--out", str(out), *extra]


def stats(out: Path) -> dict:
    return json.loads((out / compress_stage.RUN_STATS).read_text())


def without_seconds(rows: dict[str, dict]) -> dict[str, dict]:
    return {sid: {k: v for k, v in row.items() if k != "seconds"} for sid, row in rows.items()}


def assert_every_slide_answered(rows: dict[str, dict], good_status: str = "ok") -> None:
    assert {sid: rows[sid]["status"] for sid in GOOD} == dict.fromkeys(GOOD, good_status)
    assert {sid: (rows[sid]["status"], rows[sid]["error_kind"]) for sid in BAD} == {
        sid: ("failed", kind) for sid, kind in BAD.items()}


#: Runs nic compress twice in a fresh process (argv: out folder, then the command's arguments),
#: keeping the first run's manifest, and says whether Ray was ever imported.
TWICE = """
import json, shutil, sys
from pathlib import Path
from nic.cli.main import main
out = Path(sys.argv[1])
codes = [main(sys.argv[2:])]
shutil.copy(out / "slides.parquet", out.parent / "first.parquet")
shutil.copy(out / "compress_run.json", out.parent / "first_run.json")
codes.append(main(sys.argv[2:]))
ray = sys.modules.get("ray")
print(json.dumps({"codes": codes, "ray_imported": ray is not None}))
"""


def test_an_embedded_run_starts_no_ray_and_its_rerun_skips_every_complete_slide(slides, tmp_path):
    out = tmp_path / "grids"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "platform"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", TWICE, str(out), *compress(slides, out, "mean-rgb")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0], "ray_imported": False}, proc.stderr[-3000:]
    assert "local run (no Ray)" in proc.stderr

    first = {r["slide_id"]: r for r in pq.read_table(tmp_path / "first.parquet").to_pylist()}
    assert_every_slide_answered(first)
    run = json.loads((tmp_path / "first_run.json").read_text())
    assert run["pool"]["mode"] == run["cluster"]["mode"] == "local" and run["retry"] is None
    assert run["slides"] == len(GOOD) + len(BAD)
    assert run["tile_encodings"] == sum(first[sid]["tiles"] for sid in GOOD) > 0
    # The re-run skips both complete slides and tries the bad ones again, failing them the same way.
    again = manifest_rows(out)
    assert_every_slide_answered(again, good_status="skipped")
    assert all(again[sid]["reason"].startswith("already complete") for sid in GOOD)  # (he_b: and whose file)
    assert {sid: again[sid]["reason"] for sid in BAD} == {sid: first[sid]["reason"] for sid in BAD}
    assert stats(out)["slides"] == len(BAD) and stats(out)["tile_encodings"] == 0


@pytest.mark.parametrize(("encoder", "extra", "both_ways"), [("mean-rgb", ("--dihedral",), False), ("random", (), True)])
def test_local_grids_and_rows_are_the_ray_paths(slides, tmp_path, monkeypatch, ray_session, encoder, extra,
                                                both_ways):
    """The same slides and encoder on both paths: the same manifest rows (but run times) and the
    same grid files, embeddings bit for bit, even for the neural `random` encoder in float32, whose
    values can depend on the batch a tile is in: the local run cuts the batches Ray Data cuts
    (nic.compress.local.ray_batches; here the first batch of 256 tiles holds boxes' error row, he_a
    and the start of he_b, as on Ray). A local re-run takes Ray's grids as complete, and (once, as
    it costs a Ray pipeline) a re-run on Ray the local grids."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    assert main(compress(slides, on_ray, encoder, *extra)) == 0
    assert "mode" not in stats(on_ray)["pool"]  # Ray's PoolPlan: this session's Ray instance ran it
    monkeypatch.setattr(compress_stage, "_use_ray", lambda config: False)
    assert main(compress(slides, local, encoder, *extra)) == 0
    assert stats(local)["pool"]["mode"] == "local"

    ray_rows, local_rows = manifest_rows(on_ray), manifest_rows(local)
    assert_every_slide_answered(local_rows)
    assert without_seconds(local_rows) == without_seconds(ray_rows)
    assert stats(local)["tile_encodings"] == stats(on_ray)["tile_encodings"] > 0
    for sid in GOOD:
        grid = ray_rows[sid]["file"]
        assert pq.read_table(local / grid).equals(pq.read_table(on_ray / grid), check_metadata=True), sid
    assert not (local / "tiles" / "slide_id=small").exists()  # a failed slide leaves no grid

    assert main(compress(slides, on_ray, encoder, *extra)) == 0  # locally, over Ray's grids
    assert_every_slide_answered(manifest_rows(on_ray), good_status="skipped")
    if both_ways:
        monkeypatch.setattr(compress_stage, "_use_ray", lambda config: True)
        assert main(compress(slides, local, encoder, *extra)) == 0  # on Ray, over the local grids
        assert_every_slide_answered(manifest_rows(local), good_status="skipped")


def test_an_encoder_that_fails_fails_every_unfinished_slide_as_on_ray(slides, tmp_path, monkeypatch):
    """An error of the encoder itself ends the pass; every slide it leaves unfinished gets the
    reason the Ray path gives when its pipeline fails, and the manifest still has every input."""
    monkeypatch.setattr(compress_stage, "_use_ray", lambda config: False)

    def broken(self, pixels, with_heads):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(EncoderActor, "_forward", broken)
    out = tmp_path / "grids"
    assert main(compress(slides, out)) == 1  # no slide succeeded
    rows = manifest_rows(out)
    assert set(rows) == set(GOOD) | set(BAD) and {r["status"] for r in rows.values()} == {"failed"}
    for sid in GOOD:
        assert rows[sid]["error_kind"] == "crash"
        assert ("the encoder pipeline failed before this slide was done: RuntimeError: the model broke"
                in rows[sid]["reason"]), rows[sid]["reason"]
    assert not list(out.glob("tiles/*/*.parquet"))


def test_ctrl_c_keeps_finished_slides_on_record_and_the_rerun_resumes(slides, tmp_path, monkeypatch):
    """Ctrl-C while he_b is being encoded: he_a (its batches all come before he_b's) is in the
    saved manifest and its grid stays; the re-run skips it and encodes the rest."""
    monkeypatch.setattr(compress_stage, "_use_ray", lambda config: False)
    encode = EncoderActor.__call__

    def interrupted_at_he_b(self, batch):
        if "he_b" in set(batch["slide_id"]):
            raise KeyboardInterrupt
        return encode(self, batch)

    monkeypatch.setattr(EncoderActor, "__call__", interrupted_at_he_b)
    out = tmp_path / "grids"
    # batches of 32 tiles: he_a has more, so none of its batches holds he_b's tiles
    assert main(compress(slides, out, "mean-rgb", "--batch-size", "32")) == 130
    rows = manifest_rows(out)
    assert rows["he_a"]["status"] == "ok" and "he_b" not in rows
    monkeypatch.setattr(EncoderActor, "__call__", encode)
    assert main(compress(slides, out, "mean-rgb", "--batch-size", "32")) == 0
    rows = manifest_rows(out)
    assert (rows["he_a"]["status"], rows["he_b"]["status"]) == ("skipped", "ok")
    assert rows["he_a"]["tiles"] == rows["he_b"]["tiles"]
