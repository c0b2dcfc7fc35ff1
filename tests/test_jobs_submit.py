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


# The demo pipeline config, shrunk to a tiny study by --set (the same overrides a user would type).
TINY_DEMO = [
    "synth.slides=8", "synth.size=1600", "synth.min_size=1200", "synth.seed=3", "synth.patches.train=160",
    "synth.patches.val=40", "synth.patches.tasks=[tissue_type, tumour]",
    "encoders=[{name: mtl, kind: mtl}, {name: mean-rgb, kind: mean-rgb}]", "encoder.epochs=1",
    "encoder.embedding_dim=16", "encoder.num_workers=1", "encoder.max_val_samples_per_task=40",
    "downstream.folds=2", "downstream.epochs=2", "downstream.batch_size=4", "downstream.bootstrap=20",
    "downstream.tta_crops=1", "targets=[{name: growth, kind: binary, target: growth_pattern}]", "report_slides=1",
]


@pytest.mark.heavy
@pytest.mark.integration
def test_pipeline_job_runs_the_demo_config_on_the_head(ray_head, tmp_path):
    """`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo/pipeline.yaml`:
    the whole study as one job on a token-authenticated head, the report where `out` says."""
    out = tmp_path / "study"
    args = ["python", "jobs/pipeline.py", "--config", "configs/demo/pipeline.yaml", "--set", f"out={out}"]
    for item in TINY_DEMO:
        args += ["--set", item]
    result = submit(ray_head, *args)
    logs = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, logs
    assert "succeeded" in result.stdout, logs
    assert "[pipeline] report:" in result.stdout, logs  # the job's progress reaches the submitter
    report = (out / "report.md").read_text()
    assert "## Slide-level models" in report and "| mtl |" in report and "| mean-rgb |" in report
    for encoder in ("mtl", "mean-rgb"):
        metrics = out / "models" / encoder / "growth" / "metrics.json"
        assert metrics.exists(), f"{metrics} missing"
    manifest = pq.read_table(out / "grids" / "mtl" / "slides.parquet").to_pylist()
    assert len(manifest) == 8 and {r["status"] for r in manifest} == {"ok"}
