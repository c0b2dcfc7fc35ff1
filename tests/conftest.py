"""Shared fixtures: the real slide fixtures from ../shared/data and one local Ray instance per session."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_SLIDES = REPO.parent / "shared" / "data" / "slides"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Object-store tests talk to a local S3 server (moto) on a port chosen now, and keep their mirror
# in a folder of this session: set before the session's one Ray instance starts, so every Ray
# worker inherits the endpoint, the credentials and the mirror root, as the nodes of a real
# cluster would from their environment.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update({
    "AWS_ENDPOINT_URL": S3_ENDPOINT, "AWS_ACCESS_KEY_ID": "nic-test", "AWS_SECRET_ACCESS_KEY": "nic-test",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    "NIC_MIRROR": tempfile.mkdtemp(prefix="nic-mirror-"),
})


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """Folder of the real slide fixtures (small_HE.svs, small.svs, unreadable.svs, unopenable.tiff, boxes.tiff)."""
    if not SHARED_SLIDES.exists():
        pytest.fail(f"real slide fixtures not found at {SHARED_SLIDES}: ../shared must sit beside the repo")
    return SHARED_SLIDES


@pytest.fixture(scope="session")
def real_slide(shared_slides: Path) -> Path:
    return shared_slides / "small_HE.svs"


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray instance for the whole test session (2 CPUs here; starting Ray costs seconds)."""
    import ray

    from nic.config.base import RayOptions
    from nic.runtime import connect

    os.environ.pop("RAY_ADDRESS", None)
    # A small object store: tests move little data, and several test sessions may share this machine.
    os.environ.setdefault("NIC_OBJECT_STORE_BYTES", str(1_500_000_000))
    connect(RayOptions(num_cpus=max(2, os.cpu_count() or 2), num_gpus=0))
    yield ray
    ray.shutdown()


LEAK_GRACE_S = 30.0  # Ray's placement-group cleaner polls a dead controller every few seconds


def _ray_objects() -> tuple[dict[str, str], dict[str, str]]:
    """Alive non-detached actors {id: description} and created placement groups {id: description}
    of the session's Ray instance, from the GCS tables (the state API needs the dashboard, which
    an embedded instance does not start). Detached actors are Ray's own singletons (Ray Data's
    stats actor, Train's placement-group cleaner); nic creates none."""
    import ray._private.state as ray_state
    from ray.util.placement_group import placement_group_table

    actors = {k: f"actor {a['ActorClassName']} (pid {a['Pid']})" for k, a in ray_state.actors().items()
              if a["State"] == "ALIVE" and not a["IsDetached"]}
    groups = {k: f"placement group {g.get('name') or k[:12]} (bundles {list((g.get('bundles') or {}).values())})"
              for k, g in placement_group_table().items() if g["state"] == "CREATED"}
    return actors, groups


@pytest.fixture(autouse=True)
def ray_leak_guard(request):
    """After every test that uses the session's Ray instance: nothing the test started (actors such
    as Train controllers and workers, Ray Data actor pools, placement groups) is still alive. A leak
    here is what once made a later 2-worker Train run wait for ever for CPUs held by an earlier one."""
    if "ray_session" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("ray_session")
    before_actors, before_groups = _ray_objects()
    yield
    import time

    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        actors, groups = _ray_objects()
        leaked = [d for k, d in actors.items() if k not in before_actors]
        leaked += [d for k, d in groups.items() if k not in before_groups]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if leaked:
        pytest.fail(f"{request.node.nodeid} left Ray objects alive {LEAK_GRACE_S:.0f} s after it ended: "
                    + "; ".join(leaked), pytrace=False)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory, ray_session) -> Path:
    """A small synthetic cohort made once per session with `nic synth` (8 slides, 2 patch tasks)."""
    from nic.cli.main import main

    out = tmp_path_factory.mktemp("tiny") / "cohort"
    code = main(["synth", "--out", str(out), "--slides", "8", "--size", "1600", "--seed", "5",
                 "--set", "min_size=1200", "--set", "patches.train=160", "--set", "patches.val=40",
                 "--set", "patches.tasks=[tissue_type, tumour]"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto) at S3_ENDPOINT for the whole session; yields the endpoint."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise

    from s3_requests import install

    host, port = S3_ENDPOINT.rsplit(":", 1)
    server = ThreadedMotoServer(ip_address=host.split("//")[1], port=int(port), verbose=False)
    server.start()
    _S3["log"] = install(server)  # every request, for tests that count what a stage downloads
    yield S3_ENDPOINT
    server.stop()


_S3: dict = {}


@pytest.fixture
def s3_requests(s3_server):
    """The local S3 server's request log (tests/s3_requests.py), emptied for this test."""
    log = _S3["log"]
    log.clear()
    return log


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket for one test; yields its URI (s3://name)."""
    import uuid

    import pyarrow.fs as pafs

    name = f"nic-{uuid.uuid4().hex[:10]}"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
    fs.create_dir(name)
    return f"s3://{name}"


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["NIC_MIRROR"], ignore_errors=True)
