"""One run per output folder (nic.locks): a second run refuses naming the first (exit code 75), a
lock left by a dead run is taken over, and a process may nest locks (the pipeline and its stages).
No Ray: every stage refuses before it starts anything, and the take-over run has no slide to tile."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nic.cli.main import main
from nic.locks import EXIT_LOCKED, LOCK_NAME, LockedError, _identity, _pid_start, out_lock

STAGE_ARGS = {
    "tile": ["--slides", "x.svs"],
    "synth": [],
    "train-encoder": ["--kind", "mean-rgb"],
    "compress": ["--slides", "x.svs", "--encoder", "mean-rgb"],
    "train-downstream": ["--grids", "g", "--labels", "l.csv", "--kind", "binary", "--target", "y"],
    "tune": ["--tasks", "t.yaml", "--slides", "s", "--labels", "l.csv", "--kind", "binary", "--target", "y"],
    "pipeline": ["--set", "synth.slides=2"],
}


def _write_lock(folder: Path, pid: int, host: str | None = None, age_s: float = 0.0, **extra) -> Path:
    """A lock file as another run would have written it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {**_identity(), "token": f"t{pid}", "pid": pid, "pid_start": _pid_start(pid), "user": "someone",
              "started": "2026-12-01 09:00:00 +0000", "started_unix": time.time() - 3600, "stage": "compress",
              "command": "nic compress --slides cohort/ --out grids", **extra}
    if host is not None:
        record["host"] = host
    path = folder / LOCK_NAME
    path.write_text(json.dumps(record))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture()
def sleeper():
    """A live process of someone else's (its pid stands for another run's)."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_second_run_refuses_naming_the_first_then_takes_over_when_it_died(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom nic.locks import out_lock\n"
         f"with out_lock({str(out)!r}, 'tile'):\n    print('held', flush=True)\n    time.sleep(120)\n",
         "--first-run"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["tile", "--slides", str(tmp_path / "missing.svs"), "--out", str(out)]
        assert main(args) == EXIT_LOCKED
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err, err
        assert "is in use by another run: nic tile" in err and "started 20" in err and "--first-run" in err
        assert not (out / "slides.parquet").exists(), "the refused run wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    # The first run was killed: its lock stays, with a pid that no longer runs -> taken over.
    assert (out / LOCK_NAME).exists()
    assert main(args) == 1  # the run itself goes ahead (its one input is missing: no slide succeeded)
    err = capsys.readouterr().err
    assert f"taking over the lock on {out}: pid {holder.pid} no longer runs" in err, err
    assert (out / "slides.parquet").exists() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_every_stage_refuses_a_folder_held_by_a_live_process(stage, sleeper, tmp_path, capsys):
    out = tmp_path / "out"
    _write_lock(out, sleeper.pid)
    assert main([stage, *STAGE_ARGS[stage], "--out", str(out)]) == EXIT_LOCKED
    err = capsys.readouterr().err
    assert f"nic {stage}: {out} is in use by another run" in err
    assert f"pid {sleeper.pid}" in err and "nic compress --slides cohort/ --out grids" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "nothing was written beside the lock"


def test_dead_pid_reused_pid_and_unreadable_locks(sleeper, tmp_path, capsys):
    folder = tmp_path / "out"
    _write_lock(folder, sleeper.pid)
    with pytest.raises(LockedError, match=f"pid {sleeper.pid}"):
        with out_lock(folder):
            pass
    # the pid runs, but it is another process than the one that took the lock (pid reuse)
    _write_lock(folder, sleeper.pid, pid_start=(_pid_start(sleeper.pid) or 0) + 1)
    with out_lock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "is now another process" in capsys.readouterr().err
    # the process is gone
    sleeper.kill()
    sleeper.wait()
    _write_lock(folder, sleeper.pid)
    with out_lock(folder):
        pass
    assert f"pid {sleeper.pid} no longer runs" in capsys.readouterr().err
    # a lock file cut short (its writer died while writing it): held while fresh, taken over when old
    (folder / LOCK_NAME).write_text('{"tok')
    with pytest.raises(LockedError, match="unreadable"):
        with out_lock(folder):
            pass
    os.utime(folder / LOCK_NAME, (time.time() - 3600,) * 2)
    with out_lock(folder):
        pass
    assert "the lock file is unreadable and 3600 s old" in capsys.readouterr().err
    assert not (folder / LOCK_NAME).exists()


def test_other_host_lock_is_held_while_its_heartbeat_is_fresh(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    _write_lock(folder, 1, host="node-7", age_s=5)  # pid 1 means nothing on another host
    with pytest.raises(LockedError, match="on host node-7"):
        with out_lock(folder):
            pass
    _write_lock(folder, 1, host="node-7", age_s=600)
    with out_lock(folder):
        pass
    assert "its heartbeat is 600 s old (more than 60 s) and it runs on another host" in capsys.readouterr().err
    # the timeout is configurable, and a live holder's heartbeat keeps its lock fresh
    monkeypatch.setenv("NIC_LOCK_STALE_S", "1.2")
    with out_lock(folder) as lock:
        os.utime(lock, (time.time() - 100,) * 2)
        time.sleep(0.6)  # heartbeat every stale/6 s, at least 0.2 s
        assert time.time() - lock.stat().st_mtime < 1.0


def test_locks_nest_in_one_process_and_uri_outs_lock_their_mirror(sleeper, tmp_path, capsys):
    root = tmp_path / "study"
    with out_lock(root, "pipeline") as lock:
        with out_lock(root / "grids" / "mtl", "compress") as inner:  # a stage in a sub-folder
            assert inner != lock and inner.exists()
        with out_lock(root, "synth"):  # a stage whose out is the pipeline's own folder
            pass
        assert lock.exists(), "the outer lock outlives the nested one"
    assert not lock.exists()
    assert not (tmp_path / "never").exists()
    with out_lock(tmp_path / "never"):  # a folder made for the lock and left empty is removed
        pass
    assert not (tmp_path / "never").exists()

    from nic.storage import mirror_path

    uri = "s3://nic-lock-test/grids"
    _write_lock(mirror_path(uri), sleeper.pid)
    assert main(["tile", "--slides", "x.svs", "--out", uri]) == EXIT_LOCKED
    assert f"{uri} is in use by another run" in capsys.readouterr().err
