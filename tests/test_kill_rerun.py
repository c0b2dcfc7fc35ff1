"""Killed and re-run, for every stage (issue 14): SIGKILL the driver of `nic <stage>` at a random
moment of its work, run the same command again, and the outputs equal those of a clean run.

Each test runs the stage three times on one small input:

1. clean, in this process on the session's Ray instance (the reference, and how long the work takes);
2. as its own process (`python -m nic.cli.main ...`) with its own embedded Ray instance, killed with
   SIGKILL at a moment drawn from a seeded RNG: once the stage has visibly started working (a
   progress line or its first output file), after a random fraction of the clean run's duration;
3. the same command again, in this process, to completion (exit 0).

Then 3's outputs must equal 1's: the same manifest (but for run times, and `skipped` where the
first run had finished a slide), the same grids, tile tables and slides, and the same metrics
where the seed fixes them; every input exactly once, no tile row twice.

Why the whole process group is killed: a driver started with start_new_session=True leads its own
process group, and the embedded Ray instance it starts (GCS, raylet, agents, workers) lives in that
group. Killing only the driver would leave it to Ray's own fate-sharing to stop the rest, and a
worker busy in a task can outlive its driver for a while, still writing into the output folder
while the re-run starts. A real `kill -9` of a job (an OOM killer, a pre-empted node, a closed
terminal) takes the whole group too. Every process of that Ray instance (found by its RAY_TMPDIR,
which no other Ray on this machine shares) must be gone afterwards: the test kills and reports any
survivor, so no process of the killed run outlives its test.

NIC_KILL_SEED=<int> draws other kill moments (to hunt for bugs at other moments).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from nic.cli.main import main

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

REPO = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("NIC_KILL_SEED", "14"))
RAY_START_FAILED = "timed out during startup"
STARTUP_TIMEOUT_S = 300  # a cold embedded Ray on a loaded 2-CPU machine takes tens of seconds


# ------------------------------------------------------------------------------------------ the kill


@dataclass
class Killed:
    log: str
    after_s: float  # seconds between the start signal and the kill
    survivors: list[str]  # processes of the killed Ray instance that outlived the group kill


def _ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """Every live process of the Ray instance whose RAY_TMPDIR is `ray_tmp` (workers rename their
    command line to ray::..., but their environment still names the temp dir)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("RAY_TMPDIR") == ray_tmp and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_midway(args: list[str], log_path: Path, started: Callable[[], bool], work_s: float,
                salt: int) -> Killed:
    """Run `nic *args` as its own process group with its own embedded Ray; once `started()` holds,
    wait a random fraction of `work_s` (seeded by NIC_KILL_SEED and `salt`), then SIGKILL the group."""
    rng = np.random.default_rng([SEED, salt])
    delay = float(rng.uniform(0.05, 0.9)) * work_s
    ray_tmp = tempfile.mkdtemp(prefix="nk", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, NIC_OBJECT_STORE_BYTES=str(300_000_000),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "platform"), env.get("PYTHONPATH")])))
    with open(log_path, "w") as sink:  # a file, not a pipe: a full pipe would stall the driver
        proc = subprocess.Popen([sys.executable, "-m", "nic.cli.main", *args], env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while proc.poll() is None and not started():
            assert time.monotonic() < deadline, f"the stage never started: {log_path.read_text()[-3000:]}"
            time.sleep(0.02)
        assert proc.poll() is None, f"the stage ended before it could be killed: {log_path.read_text()[-3000:]}"
        signalled = time.monotonic()
        while proc.poll() is None and time.monotonic() - signalled < delay:
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"the stage ended {time.monotonic() - signalled:.1f} s after it started, before the kill at "
            f"{delay:.1f} s (clean run: {work_s:.1f} s): {log_path.read_text()[-3000:]}")
        os.killpg(proc.pid, signal.SIGKILL)
        after = time.monotonic() - signalled
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        survivors = _reap(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return Killed(log=log_path.read_text(), after_s=after, survivors=survivors)


def _reap(ray_tmp: str) -> list[str]:
    """Kill whatever of the killed run's Ray instance is still alive; describe what was."""
    time.sleep(0.5)
    survivors = []
    for _ in range(20):
        alive = _ray_processes(ray_tmp)
        if not alive:
            break
        for proc in alive:
            try:
                survivors.append(f"{proc.pid} {' '.join(proc.cmdline()).strip()[:120]}")
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
    assert not _ray_processes(ray_tmp), "processes of the killed Ray instance survive SIGKILL"
    return survivors


def timed_work(args: list[str], started: Callable[[], bool]) -> float:
    """Run `nic *args` here to completion; seconds from the moment `started()` first held (polled
    by a thread) to the end: how long the work a kill should land in takes."""
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not seen:
            if started():
                seen.append(time.monotonic())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    begin = time.monotonic()
    watcher.start()
    try:
        assert main(args) == 0
    finally:
        done.set()
        watcher.join()
    return time.monotonic() - (seen[0] if seen else begin)


def kill_and_rerun(args_for: Callable[[Path], list[str]], tmp_path: Path, started: Callable[[Path], bool],
                   salt: int) -> tuple[Path, Path, Killed]:
    """A clean run into tmp/clean/out; a killed run, then the same command again, into tmp/killed/out.
    Outputs are in a folder named alike in both, since some record their folder's name."""
    clean, killed = tmp_path / "clean" / "out", tmp_path / "killed" / "out"
    work_s = timed_work(args_for(clean), lambda: started(clean))
    for attempt in (1, 2):
        try:
            outcome = kill_midway(args_for(killed), tmp_path / "killed.log", lambda: started(killed), work_s, salt)
            break
        except AssertionError as exc:
            # A fresh embedded Ray can fail to start on an overloaded machine ("timed out during
            # startup"): that says nothing about the stage, so the kill is tried once more.
            if attempt == 2 or RAY_START_FAILED not in str(exc):
                raise
            print(f"the killed run's Ray did not start; trying once more: {str(exc)[-300:]}", file=sys.stderr)
    print(f"killed {outcome.after_s:.1f} s into the work (clean run: {work_s:.1f} s); Ray processes left by "
          f"the group kill: {outcome.survivors or 'none'}", file=sys.stderr)
    assert main(args_for(killed)) == 0, outcome.log[-3000:]
    return clean, killed, outcome


# ------------------------------------------------------------------------------------------ comparisons

DONE = {"ok", "skipped"}


def manifest_frame(path: Path, ignore: tuple[str, ...] = ("seconds",)) -> pd.DataFrame:
    """A manifest with every input exactly once, 'skipped' (done by the killed run) read as 'ok'."""
    frame = pq.read_table(path).to_pandas()
    assert not frame["slide_id"].duplicated().any(), f"{path}: an input appears twice"
    done = frame["status"].isin(DONE)
    frame.loc[done, "status"] = "ok"
    frame.loc[done, "reason"] = ""
    return frame.drop(columns=list(ignore)).sort_values("slide_id").reset_index(drop=True)


def assert_same_manifest(clean: Path, rerun: Path, ignore: tuple[str, ...] = ("seconds",)) -> None:
    pd.testing.assert_frame_equal(manifest_frame(rerun, ignore), manifest_frame(clean, ignore))


def assert_same_parquet(clean: Path, rerun: Path) -> None:
    a, b = pq.read_table(clean), pq.read_table(rerun)
    assert b.equals(a, check_metadata=True), f"{rerun} differs from {clean}"


def assert_same_bytes(clean: Path, rerun: Path) -> None:
    assert clean.read_bytes() == rerun.read_bytes(), f"{rerun} differs from {clean}"


def files(root: Path, pattern: str) -> list[str]:
    """Relative paths of the files under root matching pattern (temporaries excluded)."""
    return sorted(str(p.relative_to(root)) for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))


def without(obj, keys: set[str]):
    """A JSON value without the given keys at any depth (run times, absolute paths)."""
    if isinstance(obj, dict):
        return {k: without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [without(v, keys) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ tile


@pytest.mark.timeout(600)
def test_tile_killed_and_rerun(tiny_cohort, tmp_path):
    slides = tiny_cohort / "slides"

    def args(out: Path) -> list[str]:
        return ["tile", "--slides", str(slides), "--out", str(out), "--thumbnail-px", "128", "--num-cpus", "2"]

    def started(out: Path) -> bool:  # the first slide's overview is written: slides are being tiled
        return bool(files(out, "thumbnails/*.png"))

    clean, killed, _ = kill_and_rerun(args, tmp_path, started, salt=1)
    assert_same_manifest(clean / "slides.parquet", killed / "slides.parquet")
    assert len(pq.read_table(killed / "slides.parquet")) == len(files(slides, "*.tiff")) == 8
    assert files(killed, "tiles/*") == files(clean, "tiles/*") and len(files(clean, "tiles/*")) == 8
    for name in files(clean, "tiles/*"):
        assert_same_parquet(clean / name, killed / name)
        table = pq.read_table(killed / name, columns=["row", "col"]).to_pandas()
        assert not table.duplicated().any(), f"{name}: a tile row twice"
    assert files(killed, "thumbnails/*") == files(clean, "thumbnails/*")
    for name in files(clean, "thumbnails/*"):
        assert_same_bytes(clean / name, killed / name)
    assert not list(killed.rglob("*.tmp")), "a temporary of the killed run is left"


# ------------------------------------------------------------------------------------------ synth

SYNTH = ["--slides", "3", "--size", "1100", "--min-size", "800", "--seed", "3",
         "--set", "patches.train=24", "--set", "patches.val=12", "--set", "patches.chunk_canvases=1"]


def synth_digests(root: Path) -> dict[str, bytes]:
    """Every file of a cohort but those that legitimately differ: run times, the output path, the run's log (synth.log)."""
    def varies(p: Path) -> bool:
        return (p.name in ("cohort.json", "config.yaml", "synth.log")
                or (p.parent.name == "slides" and p.suffix == ".json"))

    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not varies(p)}


@pytest.mark.timeout(600)
def test_synth_killed_and_rerun(tmp_path):
    def args(out: Path) -> list[str]:
        return ["synth", "--out", str(out), *SYNTH, "--num-cpus", "2"]

    def started(out: Path) -> bool:  # a slide or patch chunk is being written
        return (out / "slides").exists() or (out / "patches").exists()

    clean, killed, _ = kill_and_rerun(args, tmp_path, started, salt=2)
    a, b = synth_digests(clean), synth_digests(killed)
    assert sorted(b) == sorted(a)
    assert [k for k in a if a[k] != b[k]] == []
    cohorts = [json.loads((root / "cohort.json").read_text()) for root in (clean, killed)]
    for cohort in cohorts:
        for slide in cohort["slides"]:
            assert slide["status"] in DONE
            slide.pop("seconds")
            slide["status"], slide["reason"] = "ok", ""
        for task in cohort["patch_tasks"]:
            assert task["status"] in DONE
            task["status"], task["reason"] = "ok", ""
            task.pop("train", None), task.pop("val", None)
    assert cohorts[1] == cohorts[0]
    for sidecar in files(clean, "slides/*.json"):
        assert without(json.loads((killed / sidecar).read_text()), {"seconds"}) == \
            without(json.loads((clean / sidecar).read_text()), {"seconds"})


# ------------------------------------------------------------------------------------------ train-encoder


def assert_same_state(clean: Path, rerun: Path) -> None:
    """Two torch files hold the same tensors (bit for bit) under the same names."""
    import torch

    a, b = torch.load(clean, map_location="cpu"), torch.load(rerun, map_location="cpu")
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert sorted(flat_b) == sorted(flat_a), f"{rerun}: other entries than {clean}"
    differ = [k for k in flat_a if not _equal(flat_a[k], flat_b[k])]
    assert not differ, f"{rerun} differs from {clean} in {differ[:10]}"


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def assert_same_encoder(clean: Path, rerun: Path) -> None:
    outputs = [f for f in files(clean, "*")]
    assert files(rerun, "*") == outputs
    for name in outputs:
        if name.endswith(".pt"):
            assert_same_state(clean / name, rerun / name)
    info = [without(json.loads((root / "encoder.json").read_text()), {"created"}) for root in (clean, rerun)]
    assert info[1] == info[0]
    history = [without(json.loads((root / "history.json").read_text()), {"seconds"}) for root in (clean, rerun)]
    assert history[1] == history[0]


@pytest.mark.timeout(600)
def test_train_encoder_killed_and_rerun(tiny_cohort, tmp_path):
    def args(out: Path) -> list[str]:
        return ["train-encoder", "--tasks", str(tiny_cohort / "tasks.yaml"), "--kind", "mtl", "--out", str(out),
                "--epochs", "3", "--embedding-dim", "8", "--batch-size", "32", "--num-workers", "1",
                "--set", "max_val_samples_per_task=40", "--set", "patience=3", "--num-cpus", "2"]

    def started(out: Path) -> bool:  # the Ray Train run is starting (its storage folder is made first)
        return (out / "checkpoints").exists()

    clean, killed, _ = kill_and_rerun(args, tmp_path, started, salt=3)
    assert_same_encoder(clean, killed)


# ------------------------------------------------------------------------------------------ compress


def assert_same_grids(clean: Path, rerun: Path) -> None:
    assert_same_manifest(clean / "slides.parquet", rerun / "slides.parquet")
    grids = files(clean, "tiles/*/*.parquet")
    assert files(rerun, "tiles/*/*.parquet") == grids and grids
    for name in grids:
        assert_same_parquet(clean / name, rerun / name)
        cells = pq.read_table(rerun / name, columns=["row", "col", "transform"]).to_pandas()
        assert not cells.duplicated().any(), f"{name}: a tile row twice"
    assert not list(rerun.rglob("*.tmp")), "a temporary of the killed run is left"


@pytest.mark.timeout(600)
def test_compress_killed_and_rerun(tiny_cohort, tmp_path):
    slides = tiny_cohort / "slides"

    def args(out: Path) -> list[str]:
        return ["compress", "--slides", str(slides), "--encoder", "random", "--out", str(out), "--batch-size", "16",
                "--num-cpus", "2"]

    def started(out: Path) -> bool:  # the first grid is being written: tiles are being encoded
        return (out / "tiles").exists() or (out / ".staging").exists()

    clean, killed, _ = kill_and_rerun(args, tmp_path, started, salt=4)
    assert_same_grids(clean, killed)
    assert len(pq.read_table(killed / "slides.parquet")) == len(files(slides, "*.tiff")) == 8
    for sid in pq.read_table(killed / "slides.parquet").column("slide_id").to_pylist():  # tiles = the grid's rows
        meta = pq.read_table(killed / "slides.parquet").to_pandas().set_index("slide_id").loc[sid]
        assert pq.ParquetFile(killed / meta["file"]).metadata.num_rows == meta["tiles"]


# ------------------------------------------------------------------------------------------ train-downstream


def assert_same_model(clean: Path, rerun: Path) -> None:
    timing = {"seconds", "eval_seconds"}
    metrics = [without(json.loads((root / "metrics.json").read_text()), timing) for root in (clean, rerun)]
    assert metrics[1] == metrics[0]
    for name in ("predictions.parquet", "probe_predictions.parquet", "splits.parquet"):
        if (clean / name).exists():
            assert_same_parquet(clean / name, rerun / name)
    folds = files(clean, "folds/*/*")
    assert files(rerun, "folds/*/*") == folds and folds
    for name in folds:
        if name.endswith(".json"):
            assert without(json.loads((rerun / name).read_text()), timing) == \
                without(json.loads((clean / name).read_text()), timing), name
        elif name.endswith(".parquet"):
            assert_same_parquet(clean / name, rerun / name)
        elif name.endswith(".pt"):
            assert_same_state(clean / name, rerun / name)


@pytest.mark.timeout(600)
def test_train_downstream_killed_and_rerun(tmp_path):
    from downstream_helpers import make_cohort

    grids, labels = make_cohort(tmp_path / "cohort", n=16, channels=8, size=(8, 12), seed=2)

    def args(out: Path) -> list[str]:
        return ["train-downstream", "--grids", str(grids), "--labels", str(labels), "--kind", "binary",
                "--target", "label", "--out", str(out), "--folds", "2", "--epochs", "4", "--batch-size", "4",
                "--set", "val_fraction=0.0", "--set", "tta_crops=1", "--set", "bootstrap=20",
                "--num-cpus", "2"]

    def started(out: Path) -> bool:  # a fold's Ray Train run is starting
        return (out / "ray").exists()

    clean, killed, _ = kill_and_rerun(args, tmp_path, started, salt=5)
    assert_same_model(clean, killed)


# ------------------------------------------------------------------------------------------ tune


def trial_rows(out: Path) -> pd.DataFrame:
    """trials.parquet by task subset, without the trial ids (a new search draws new ones)."""
    frame = pd.read_parquet(out / "trials.parquet")
    assert not frame["tasks"].duplicated().any(), "a task subset tried twice"
    for trial in frame["trial_id"]:
        assert (out / "trials" / trial / "model" / "metrics.json").exists(), f"trial {trial} has no model"
    return frame.drop(columns=["trial_id"]).sort_values("tasks").reset_index(drop=True)


@pytest.mark.heavy
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_tune_killed_and_rerun(tiny_cohort, tmp_path):
    from study_configs import tiny_search, write_config

    def args(out: Path) -> list[str]:
        config = tiny_search(str(tiny_cohort / "tasks.yaml"), str(tiny_cohort / "slides"),
                             str(tiny_cohort / "labels.csv"), str(out),
                             space={"encoder_lr": [2e-3], "downstream_lr": [1e-3]})
        out.parent.mkdir(parents=True, exist_ok=True)
        return ["tune", "--config", str(write_config(config, out.parent / "tune.yaml")), "--num-cpus", "2"]

    def started(out: Path) -> bool:  # the search has started (Tune makes its experiment folder first)
        return (out / "ray").exists()

    clean, killed, _ = kill_and_rerun(args, tmp_path, started, salt=6)
    pd.testing.assert_frame_equal(trial_rows(killed), trial_rows(clean))
    for name in ("summary.yaml", "tasks_vs_metric.png"):
        assert_same_bytes(clean / name, killed / name)
    best = [yaml.safe_load((root / "best_config.yaml").read_text()) for root in (clean, killed)]
    assert without(best[1], {"trial_id"}) == without(best[0], {"trial_id"})


# ------------------------------------------------------------------------------------------ pipeline


def report_text(root: Path) -> str:
    """report.md without what legitimately differs: the date, the output folder, run times."""
    text = (root / "report.md").read_text().replace(str(root), "<out>")
    text = re.sub(r"Made by `nic pipeline` on [0-9: -]+;", "Made by `nic pipeline`;", text)
    return re.sub(r"\b\d+(\.\d+)? (s|min)\b", "<time>", text)


@pytest.mark.heavy
@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_pipeline_killed_and_rerun(tmp_path):
    from study_configs import GROWTH, tiny_study, write_config

    def args(out: Path) -> list[str]:
        config = tiny_study(str(out), targets=[GROWTH])
        config["encoders"] = [{"name": "mtl", "kind": "mtl"}]
        out.parent.mkdir(parents=True, exist_ok=True)
        return ["pipeline", "--config", str(write_config(config, out.parent / "pipeline.yaml")), "--num-cpus", "2"]

    def started(out: Path) -> bool:  # the cohort is being generated: the first step is working
        return (out / "cohort" / "slides").exists()

    clean, killed, _ = kill_and_rerun(args, tmp_path, started, salt=7)
    assert report_text(killed) == report_text(clean)
    pictures = files(clean, "report/*")
    assert files(killed, "report/*") == pictures and pictures
    for name in pictures:
        assert_same_bytes(clean / name, killed / name)
    a, b = synth_digests(clean / "cohort"), synth_digests(killed / "cohort")
    assert sorted(b) == sorted(a) and [k for k in a if a[k] != b[k]] == []
    assert_same_encoder(clean / "encoders" / "mtl", killed / "encoders" / "mtl")
    assert_same_grids(clean / "grids" / "mtl", killed / "grids" / "mtl")
    assert_same_model(clean / "models" / "mtl" / "growth", killed / "models" / "mtl" / "growth")
