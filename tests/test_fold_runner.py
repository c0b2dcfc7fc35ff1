"""Single-worker folds without Ray Train (issue 16 item 3), Ray-free: the CheckpointStore a
FoldRunner keeps its checkpoints in (a local folder or an object store), and a fold interrupted
mid-training that resumes from its last epoch and ends exactly as an uninterrupted one.

tests/test_downstream_train.py runs the same through `nic train-downstream` on Ray and checks
that the folds learn and predict what a Ray Train run per fold does."""

from __future__ import annotations

import pandas as pd
import pytest

from downstream_helpers import assert_same_weights, make_cohort
from nic.train.common import STORE_DIR, CheckpointStore
from nic.train.downstream_loop import FoldRunner, FoldSpec


def _checkpoint(folder, **files: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_store_keeps_the_latest_checkpoint(where, tmp_path, request):
    storage = str(tmp_path / "ray") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/ray"
    store = CheckpointStore(storage, "run-fold0", marker="state.pt")
    assert store.fetch(tmp_path / "none") is False  # nothing saved yet: no checkpoint, nothing copied
    assert not (tmp_path / "none").exists()

    store.save(_checkpoint(tmp_path / "a", **{"state.pt": b"epoch 1", "model.pt": b"weights 1"}))
    store.save(_checkpoint(tmp_path / "b", **{"state.pt": b"epoch 2", "model.pt": b"weights 2"}))
    assert store.fetch(tmp_path / "got") is True
    assert {p.name: p.read_bytes() for p in (tmp_path / "got").iterdir()} == {
        "state.pt": b"epoch 2", "model.pt": b"weights 2"}
    if where == "local":  # beside where Ray Train keeps the run, no temporaries left
        folder = tmp_path / "ray" / "run-fold0" / STORE_DIR
        assert sorted(p.name for p in folder.iterdir()) == ["model.pt", "state.pt"]

    with pytest.raises(ValueError, match="needs its state.pt"):  # the marker is what makes it a checkpoint
        store.save(_checkpoint(tmp_path / "c", **{"model.pt": b"weights 3"}))


class _Interrupted(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


class _StopAt:
    """A progress queue that interrupts the fold when it announces `line` (before that epoch's
    checkpoint is saved, as a kill would land)."""

    def __init__(self, line: str) -> None:
        self.line = line

    def put_nowait(self, line: str) -> None:
        if self.line in line:
            raise _Interrupted(line)


def test_an_interrupted_fold_resumes_from_its_last_epoch_and_ends_as_an_uninterrupted_one(tmp_path, capsys):
    grids, labels_csv = make_cohort(tmp_path / "cohort", n=16, channels=4, size=(6, 8), seed=4)
    labels = pd.read_csv(labels_csv)
    ids, target = labels["slide_id"].tolist(), labels["label"].tolist()
    spec = FoldSpec(fold=3, grids=str(grids), kind="binary", model="nic-cnn", pool="max", strided=1, in_channels=4,
                    outputs=1, crop_size=8, train_ids=ids[:10], train_targets={"target": target[:10]},
                    val_ids=ids[10:13], val_targets={"target": target[10:13]}, epochs=4, patience=10,
                    crops_per_slide=2, batch_size=4, lr=1e-3, seed=7, eval_ids=ids[13:], eval_splits=["cv"] * 3,
                    tta_crops=2, classes=["0", "1"]).to_dict()
    storage = str(tmp_path / "ray")

    straight = FoldRunner().run(spec, storage, "straight-fold3")
    with pytest.raises(_Interrupted):
        FoldRunner().run(spec, storage, "killed-fold3", progress=_StopAt("epoch 3/4"))
    capsys.readouterr()
    resumed = FoldRunner().run(spec, storage, "killed-fold3")
    assert "fold 3: resuming after epoch 2" in capsys.readouterr().err

    def untimed(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert [h["epoch"] for h in resumed["state"]["history"]] == [1, 2, 3, 4]
    assert untimed(resumed["state"]["history"]) == untimed(straight["state"]["history"])
    pd.testing.assert_frame_equal(resumed["predictions"], straight["predictions"])
    assert resumed["predictions"]["slide_id"].tolist() == ids[13:]
    assert_same_weights(straight["model"], resumed["model"])

    # Evaluated: a third run only reads the result back (no epoch trained).
    again = FoldRunner().run(spec, storage, "killed-fold3")
    assert "epoch 1/4" not in capsys.readouterr().err
    pd.testing.assert_frame_equal(again["predictions"], resumed["predictions"])
    assert again["model"] == resumed["model"]
