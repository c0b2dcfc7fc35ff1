"""Shared fixtures: the real slide fixtures from ../shared/data and one local Ray instance per session.

Every test that uses Ray is marked `ray` at collection (`pytest_collection_modifyitems`): those
that use a fixture starting Ray (`RAY_FIXTURES`, directly or through another fixture such as
`tiny_cohort`), those in a test module that imports ray at its top level, and those marked by
hand (a test that starts Ray in a subprocess). So `pytest -m "not ray"` runs the Ray-free tests
without starting Ray; in such a run `ray.init` refuses, so a test that would start Ray unmarked
fails naming itself instead of starting it (`no_ray_unless_marked`).
"""

from __future__ import annotations

import ast
import functools
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


#: Fixtures that start a Ray instance (the session's, or a cluster of its own): a test using one,
#: directly or through other fixtures, is marked `ray`.
RAY_FIXTURES = frozenset({"ray_session", "ray_head"})


@functools.cache
def _module_imports_ray(path: Path) -> bool:
    """The test module imports ray at its top level (`import ray...`, `from ray... import`)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray" and not node.level:
            return True
    return False


def uses_ray(item: pytest.Item) -> bool:
    """Whether a collected test uses Ray: marked `ray`, a Ray fixture in its fixture closure, or a
    module importing ray."""
    if item.get_closest_marker("ray") is not None:
        return True
    if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    path = getattr(item, "path", None)
    return path is not None and path.suffix == ".py" and _module_imports_ray(Path(path))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("ray") is None and uses_ray(item):
            item.add_marker(pytest.mark.ray)


def _ray_deselected(config) -> bool:
    """The run leaves out the `ray` tests (`-m "not ray"`, `-m "not ray and not slow"`, ...): a
    test marked `ray` alone would not be selected by the mark expression."""
    expr = config.getoption("markexpr", default="") or ""
    if not expr.strip():
        return False
    try:
        from _pytest.mark.expression import Expression

        return not Expression.compile(expr).evaluate(lambda name, **_: name == "ray")
    except Exception:  # a private pytest API: fall back to the common spelling
        return "not ray" in expr


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def no_ray_unless_marked(request):
    """In a run without the `ray` tests, `ray.init` (what every path to a Ray instance calls, Ray
    Data's and Train's automatic start included) refuses: a test that would start Ray is not
    marked `ray` (add `@pytest.mark.ray`, or a fixture from RAY_FIXTURES), and fails saying so."""
    if not _ray_deselected(request.config) or request.node.get_closest_marker("ray") is not None:
        yield
        return
    import ray
    import ray._private.worker as ray_worker

    tried: list[str] = []
    message = (f"{request.node.nodeid} starts Ray but is not marked `ray`: mark it (@pytest.mark.ray) or "
               "use a fixture of conftest.RAY_FIXTURES, so that `pytest -m 'not ray'` never starts Ray")

    def refuse(*args, **kwargs):
        tried.append(message)
        raise RuntimeError(message)

    saved = ray.init, ray_worker.init
    ray.init = ray_worker.init = refuse
    try:
        yield
    finally:
        ray.init, ray_worker.init = saved
    if tried and not request.node.stash.get(_CALL_FAILED, False):  # the test swallowed the refusal
        pytest.fail(message, pytrace=False)


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
    import sys

    shutil.rmtree(os.environ["NIC_MIRROR"], ignore_errors=True)
    ray = sys.modules.get("ray")
    if _ray_deselected(session.config) and ray is not None and ray.is_initialized():
        print("\nconftest: Ray was started in a run without the `ray` tests", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
