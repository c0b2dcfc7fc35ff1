"""A Train run can neither wait for ever for resources nor outlive its stage (issue 14).

- asking for more than the whole cluster has fails at once, with exit code 3 from the command line;
- asking for resources another run holds fails after ray.resource_timeout_s, naming the holder;
- aborting a running fit (what a stage does on Ctrl-C, on a sibling fold's failure, or when a Tune
  trial is stopped) kills its controller, its workers and their placement group: the session's
  leak guard (tests/conftest.py) fails the test if anything of it is still alive afterwards.
"""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest

from downstream_helpers import make_cohort
from nic.cli.main import main as nic_main
from nic.train.downstream_loop import FoldSpec, fit_fold
from nic.train.trainer import EXIT_RESOURCES, ResourceError, abort_running_trainers, running_trainers

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n=12, channels=4, size=(6, 8), seed=3)


def _spec(cohort, epochs: int = 2) -> FoldSpec:
    grids, labels_csv = cohort
    labels = pd.read_csv(labels_csv)
    ids = labels["slide_id"].tolist()
    return FoldSpec(fold=0, grids=str(grids), kind="binary", model="attention-mil", in_channels=4, outputs=1,
                    crop_size=8, train_ids=ids[:8], train_targets={"target": labels["label"].tolist()[:8]},
                    epochs=epochs, batch_size=4, eval_ids=ids[8:], eval_splits=["cv"] * 4, tta_crops=1,
                    classes=["0", "1"])


def test_more_workers_than_the_cluster_has_fails_at_once_with_exit_3(ray_session, cohort, tmp_path, capsys):
    grids, labels_csv = cohort
    started = time.monotonic()
    code = nic_main(["train-downstream", "--grids", str(grids), "--labels", str(labels_csv), "--kind", "binary",
                     "--set", "target=label", "--out", str(tmp_path / "m"), "--set", "folds=2",
                     "--set", "num_workers=4", "--set", "probe=false"])
    err = capsys.readouterr().err
    assert code == EXIT_RESOURCES == 3, err
    assert "4 worker(s) x 1 CPU requested, but the whole Ray cluster has 2 CPU" in err
    assert time.monotonic() - started < 60


def test_resources_held_by_another_run_fail_after_the_timeout_naming_the_holder(ray_session, cohort, tmp_path):
    from ray.util.placement_group import placement_group, remove_placement_group

    holder = placement_group([{"CPU": 2.0}], name="someone-elses-run")
    ray_session.get(holder.ready(), timeout=60)
    try:
        started = time.monotonic()
        with pytest.raises(ResourceError) as caught:
            fit_fold(_spec(cohort), tmp_path / "ray", "held", num_workers=1, resource_timeout_s=3)
        waited = time.monotonic() - started
    finally:
        remove_placement_group(holder)
    text = str(caught.value)
    assert "1 worker(s) x 1 CPU requested, 0 CPU free of 2 CPU after waiting 3 s" in text
    assert "someone-elses-run" in text  # the holder is named
    assert 3 <= waited < 30


def test_an_aborted_fit_leaves_no_controller_workers_or_placement_group(ray_session, cohort, tmp_path):
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fit_fold(_spec(cohort, epochs=10_000), tmp_path / "ray", "aborted", num_workers=1)
        except BaseException as exc:  # noqa: BLE001 - the abort's error is the expected outcome
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while running_trainers() == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_trainers() == 1
    time.sleep(5)  # let the workers start and train
    assert abort_running_trainers() == 1
    thread.join(timeout=60)
    assert not thread.is_alive(), "fit() did not return after its controller was killed"
    assert "error" in outcome and "result" not in outcome
    assert running_trainers() == 0
    # ray_leak_guard then checks that the controller, its worker and its placement group are gone.


def test_an_aborted_fold_runner_pool_leaves_no_actor(ray_session, cohort, tmp_path):
    """Shared fold runners (single-worker folds): a runner too large for the cluster fails at once,
    and aborting the process's runs kills a runner mid-fold (its caller's get fails, the pool takes
    no more work); the leak guard then checks that no runner is left."""
    import ray

    from nic.train.downstream_loop import FoldRunner
    from nic.train.trainer import WorkerPool

    with WorkerPool(FoldRunner, {"CPU": 64.0}, 3.0, False) as too_big:
        started = time.monotonic()
        with pytest.raises(ResourceError, match="1 worker\\(s\\) x 64 CPU requested, but the whole Ray cluster has"):
            too_big.acquire("fold 0")
        assert time.monotonic() - started < 10

    pool = WorkerPool(FoldRunner, {"CPU": 1.0}, 60.0, False)
    runner = pool.acquire("fold 0")
    training = runner.run.remote(_spec(cohort, epochs=10_000).to_dict(), str(tmp_path / "ray"), "aborted-fold0")
    time.sleep(3)  # let it train
    assert abort_running_trainers() == 1  # the pool's one runner
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(training, timeout=60)
    assert pool.closed
    with pytest.raises(RuntimeError, match="stopped"):
        pool.acquire("fold 1")
