"""`ray job submit --working-dir . -- python jobs/<stage>.py ...` against a real `ray start --head`,
with token authentication on (the token reaches both the head and the job client by env var)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head (not the tests' embedded instance) with token auth and a dashboard."""
    token = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    # The head runs job drivers with `python` from its PATH: this venv, as on a cluster node where
    # the project is installed.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # Every port explicit: another Ray on this machine (the tests' embedded instance) holds the
    # defaults, and a dashboard agent that cannot bind leaves the job API without an agent.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    start = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", *ports,
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}",
             "--disable-usage-stats"]
    # --block keeps the head in this process group, so teardown stops this head only: `ray stop`
    # would also kill every other Ray on the machine (the tests' embedded instance included).
    head = subprocess.Popen([*start, "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_api(address, env)
        yield {"env": env, "address": address, "token": token}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_job_api(address: str, env: dict, timeout_s: float = 400) -> None:
    """`ray start` returns before the dashboard's job agent accepts submissions."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                               env=env, capture_output=True, text=True, timeout=300)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"job API at {address} not ready: {probe.stderr[-2000:]}")
        time.sleep(2)


def submit(head: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
           "--", *args]
    return subprocess.run(cmd, env=env or head["env"], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_tile_job_runs_on_a_head_with_token_auth(ray_head, shared_slides, tmp_path):
    out = tmp_path / "tiles"
    result = submit(ray_head, "python", "jobs/tile.py", "--slides", str(shared_slides / "small_HE.svs"),
                    str(shared_slides / "small.svs"), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    rows = {r["slide_id"]: r for r in pq.read_table(out / "slides.parquet").to_pylist()}
    assert rows["small_HE"]["status"] == "ok" and rows["small_HE"]["tiles"] > 0
    assert rows["small"]["status"] == "failed"


def test_job_client_without_the_token_is_refused(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN"] = "not-the-token"
    started = time.monotonic()
    result = submit(ray_head, "python", "-c", "print('should not run')", env=env)
    assert result.returncode != 0
    assert "should not run" not in result.stdout
    assert time.monotonic() - started < 600
