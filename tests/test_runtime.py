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
