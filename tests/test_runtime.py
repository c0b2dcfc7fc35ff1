"""nic.runtime: the embedded Ray instance is embedded, whatever an earlier `ray start` left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_CONNECT = (
    "from nic.config.base import RayOptions\n"
    "from nic.runtime import connect\n"
    "info = connect(RayOptions(num_cpus=1, num_gpus=0))\n"
    "print('CPUS', info.num_cpus)\n"
)


@pytest.mark.ray  # starts an embedded Ray instance in a subprocess
def test_embedded_start_ignores_a_stale_cluster_address():
    """A `ray start` head that died leaves its address in <tmp>/ray/ray_current_cluster; plain
    ray.init() would try to join it and refuse num_cpus. The embedded instance must start anyway."""
    with tempfile.TemporaryDirectory(prefix="nicrt", dir="/tmp") as tmp:  # short: Ray's socket paths
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # nothing listens there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(REPO / "platform"), NIC_OBJECT_STORE_BYTES=str(200_000_000))
        done = subprocess.run([sys.executable, "-c", _CONNECT], env=env, capture_output=True, text=True,
                              timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CPUS 1.0" in done.stdout


def test_train_polling_is_shortened_unless_the_user_set_it(monkeypatch):
    """Every ray.train.report waits for the controller's next poll (2 s by Ray's default): nic
    shortens it for the trainers it starts, and leaves a user's own setting alone."""
    from nic.train.common import TRAIN_POLL_INTERVAL_S, configure_train_polling

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    configure_train_polling()
    assert float(os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) == TRAIN_POLL_INTERVAL_S < 2.0
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    configure_train_polling()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"


_EMBEDDED_ENV = (
    "import os, sys\n"
    "import ray\n"
    "from nic.config.base import RayOptions\n"
    "from nic.runtime import connect\n"
    "connect(RayOptions(num_cpus=1, num_gpus=0))\n"
    "print('DATA_IMPORTED', 'ray.data' in sys.modules)\n"
    "print('JOB_ENV', ray.get_runtime_context().get_runtime_env_string())\n"
    "print('DRIVER_PATH', os.environ.get('PYTHONPATH'))\n"
    "worker = ray.get(ray.remote(lambda: (os.environ.get('PYTHONPATH'), __import__('nic').__file__)).remote())\n"
    "print('WORKER_PATH', worker[0])\n"
    "print('WORKER_NIC', worker[1])\n"
)


@pytest.mark.ray  # starts an embedded Ray instance in a subprocess
def test_embedded_workers_import_this_nic_without_a_job_runtime_env():
    """An embedded instance's workers get platform/ on PYTHONPATH from the driver's environment
    while ray.init starts the raylet, not from a job runtime_env (which would leave the workers
    Ray prestarts unusable); the driver's own environment is put back, and connect leaves Ray Data
    unimported for the stages that do not use it."""
    with tempfile.TemporaryDirectory(prefix="nicrt", dir="/tmp") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        env.update(RAY_TMPDIR=tmp, NIC_OBJECT_STORE_BYTES=str(200_000_000))
        # platform/ on sys.path by the script itself, as a source checkout's jobs/*.py do
        script = f"import sys; sys.path.insert(0, {str(REPO / 'platform')!r})\n" + _EMBEDDED_ENV
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["DATA_IMPORTED"] == "False"
    assert lines["JOB_ENV"] in ("{}", "")
    assert lines["DRIVER_PATH"] == "None"  # restored: it had none
    assert lines["WORKER_PATH"].split(os.pathsep)[0] == str(REPO / "platform")
    assert Path(lines["WORKER_NIC"]).resolve() == (REPO / "platform" / "nic" / "__init__.py").resolve()


@pytest.mark.parametrize("before", [None, "/somewhere/else"])
def test_embedded_worker_env_is_set_for_the_start_only(monkeypatch, before):
    from nic.runtime import _PLATFORM_DIR, _embedded_worker_env

    if before is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", before)
    with _embedded_worker_env():
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(_PLATFORM_DIR)] + ([before] if before else [])
    assert os.environ.get("PYTHONPATH") == before


_GPU_COUNT = (
    "import sys\n"
    "import nic.runtime as rt\n"
    "rt._GPU_DEVICE_FILES = tuple(sys.argv[1:])\n"
    "print(rt.local_gpu_count(), 'torch' in sys.modules)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the device-file test is Linux's")
def test_gpu_count_imports_torch_only_where_a_gpu_driver_is_installed(tmp_path):
    """Counting GPUs for an embedded start must not import torch (seconds) on a machine without
    any GPU driver; where a driver's device file exists, torch is asked as before."""

    def count(*files: str) -> str:
        done = subprocess.run([sys.executable, "-c", _GPU_COUNT, *files], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    assert count(str(tmp_path / "no-driver")) == "0 False"
    driver = tmp_path / "nvidiactl"
    driver.touch()
    gpus, imported = count(str(driver)).split()
    assert imported == "True" and int(gpus) >= 0


def test_quiet_ray_data_follows_the_last_connect(monkeypatch):
    """connect no longer imports Ray Data; the stage that builds a Dataset calls quiet_ray_data,
    which must apply `verbose` as the last connect was given it."""
    from ray.data import DataContext

    import nic.runtime as rt

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    try:
        monkeypatch.setattr(rt, "_VERBOSE", True)
        rt.quiet_ray_data()
        assert ctx.enable_progress_bars and ctx.print_on_execution_start
        monkeypatch.setattr(rt, "_VERBOSE", False)
        rt.quiet_ray_data()
        assert not ctx.enable_progress_bars and not ctx.print_on_execution_start
        rt.quiet_ray_data(verbose=True)
        assert ctx.enable_progress_bars
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
