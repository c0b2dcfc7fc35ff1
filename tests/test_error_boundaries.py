"""Where a file's content is judged bad (a clear error, exit 2, or "unreadable, so not complete"),
only the parse is: a damaged lock, encoder.json, heads.pt, run.json or metrics.json still gives
its message, and an error raised by nic's own code after the parse keeps its type and traceback
instead of being reported as bad input (issue 17 item 6). No Ray, no training."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from nic.locks import DEFAULT_STALE_S, LOCK_NAME, LockedError, _load, out_lock, stale_after_s

# -- the output folder's lock ----------------------------------------------------------------------


def test_a_lock_file_that_is_not_text_is_unreadable_not_a_crash(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    lock = folder / LOCK_NAME
    lock.write_bytes(b'{"token": "\xc3\x28"}')  # not UTF-8
    holder, age = _load(lock)
    assert holder == {} and age >= 0
    with pytest.raises(LockedError, match="unreadable"):  # fresh: it may be a run writing it
        with out_lock(folder):
            pass
    os.utime(lock, (time.time() - 3600,) * 2)
    with out_lock(folder):  # old: taken over like any unreadable lock
        pass
    assert "the lock file is unreadable and 3600 s old" in capsys.readouterr().err


def test_a_lock_file_cut_short_is_unreadable(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text('{"tok')
    assert _load(lock)[0] == {}
    assert _load(tmp_path / "missing.json") is None


def test_stale_after_s_reads_its_variable(monkeypatch):
    monkeypatch.setenv("NIC_LOCK_STALE_S", "soon")
    assert stale_after_s() == DEFAULT_STALE_S
    monkeypatch.setenv("NIC_LOCK_STALE_S", "0.1")
    assert stale_after_s() == 1.0
    monkeypatch.setenv("NIC_LOCK_STALE_S", "30")
    assert stale_after_s() == 30.0


# -- encoder.json and heads.pt -----------------------------------------------------------------------


def test_a_damaged_encoder_json_is_named(tmp_path):
    from nic.encoders.artifact import read_info

    folder = tmp_path / "enc"
    folder.mkdir()
    for content in (b'{"name": "x", ', b"\xff\xfe\xfa not text", b'{"name": "x"}'):
        (folder / "encoder.json").write_bytes(content)
        with pytest.raises(ValueError, match="not a valid encoder.json"):
            read_info(folder)


def test_an_error_of_the_code_reading_encoder_json_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    import nic.encoders.artifact as artifact

    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "encoder.json").write_text("{}")

    class Broken:
        @classmethod
        def model_validate_json(cls, text):
            raise ValueError("a bug, not the file")

    monkeypatch.setattr(artifact, "EncoderInfo", Broken)
    with pytest.raises(ValueError, match="a bug") as err:
        artifact.read_info(folder)
    assert "not a valid encoder.json" not in str(err.value)


def _mtl_folder_without_head_weights(out):
    """An MTL encoder whose heads.pt names its tasks but holds no head weights."""
    from nic.encoders.artifact import EncoderInfo, save_encoder
    from nic.encoders.encoder import build_encoder
    from nic.encoders.objectives import TaskHeadSpec

    encoder = build_encoder("reference", 16, 128, seed=3)
    task = TaskHeadSpec("tumour", "binary", 1, classes=["normal", "tumour"])
    info = EncoderInfo(name="mtl", kind="mtl", architecture="reference", embedding_dim=16, tile_px=128,
                       tasks=[task.to_dict()], content_hash="")
    save_encoder(encoder, out, info, extra_state={"tasks": [task.to_dict()], "head_hidden": 0})
    return out


def test_heads_without_weights_are_unavailable_and_a_bug_building_heads_is_not(tmp_path, monkeypatch):
    import nic.encoders.head_maps as head_maps

    folder = _mtl_folder_without_head_weights(tmp_path / "mtl")
    with pytest.raises(head_maps.HeadsUnavailable, match="not the task heads of encoder 'mtl'"):
        head_maps.load_head_mapper(folder)

    def broken(*args, **kwargs):
        raise TypeError("a bug in building a head")

    monkeypatch.setattr(head_maps, "_make_head", broken)
    with pytest.raises(TypeError, match="a bug in building a head"):
        head_maps.load_head_mapper(folder)


# -- train-downstream's run.json and metrics.json ----------------------------------------------------


def test_run_json_is_written_as_before(tmp_path):
    from nic.train.downstream_stage import _prepare_out

    parts = {"settings": "s1", "encoder_hash": "e1", "labels": "l1", "labels_file": "labels.csv"}
    _prepare_out(SimpleNamespace(out=tmp_path / "a", overwrite=False), "h1", tmp_path / "ray", "a", parts)
    expected = {"parts": parts, "run_hash": "h1", "stage": "train-downstream"}
    assert (tmp_path / "a" / "run.json").read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    _prepare_out(SimpleNamespace(out=tmp_path / "b", overwrite=False), "h2", tmp_path / "ray", "b")
    expected = {"run_hash": "h2", "stage": "train-downstream"}  # without parts: none recorded
    assert (tmp_path / "b" / "run.json").read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"


def test_run_json_refusals(tmp_path):
    from nic.train.downstream_stage import RunMismatchError, _prepare_out

    out = tmp_path / "model"
    out.mkdir()
    config = SimpleNamespace(out=out, overwrite=False)
    (out / "run.json").write_text('{"run_hash": ')
    with pytest.raises(RunMismatchError, match="line 1 column"):
        _prepare_out(config, "h1", tmp_path / "ray", "model")
    (out / "run.json").write_text(json.dumps({"run_hash": "h0", "stage": "train-downstream"}))
    with pytest.raises(RunMismatchError, match="holds a run made with different settings"):
        _prepare_out(config, "h1", tmp_path / "ray", "model")
    _prepare_out(config, "h0", tmp_path / "ray", "model")  # the same run: taken
    assert json.loads((out / "run.json").read_text()) == {"run_hash": "h0", "stage": "train-downstream"}


def test_probe_line_of_a_probe_entry():
    from nic.train.downstream_stage import _probe_line

    metric = {"value": 0.7, "ci_low": None, "ci_high": None, "n": 10}
    entry = {"model": "cox", "features": "f", "seconds": 1.0,
             "cv": {"metrics": {"c_index": metric}, "slides": 10, "logrank_p": 0.0123}}
    assert _probe_line(entry, "c_index") == ("linear probe (cox on the f): cross-validation c_index = 0.700, "
                                             "log-rank p = 0.0123 [1.0 s]")
    entry["cv"]["logrank_p"] = None
    assert "log-rank" not in _probe_line(entry, "c_index")


def test_final_metric_of_a_missing_damaged_or_partial_metrics_json(tmp_path, monkeypatch):
    import nic.tune.trial as trial

    path = tmp_path / "metrics.json"
    assert trial._final_metric(path) is None  # missing
    for text in ("{not json", "[1, 2]", '"text"', "{}", '{"primary_metric": "spearman"}',
                 '{"primary_metric": ["x"], "cv": {"metrics": {}}}',
                 '{"primary_metric": "spearman", "cv": {"metrics": {"spearman": [0.5]}}}'):
        path.write_text(text)
        assert trial._final_metric(path) is None and trial._final_metric(path, "probe") is None, text
    metrics = {"primary_metric": "spearman", "cv": {"metrics": {"spearman": {"value": 0.7}}},
               "probe": {"cv": {"metrics": {"spearman": {"value": 0.61}}}}}
    path.write_text(json.dumps(metrics))
    assert trial._final_metric(path) == 0.7 and trial._final_metric(path, "probe") == 0.61
    path.write_bytes(b"\xff\xfe\xfa")
    assert trial._final_metric(path) is None

    def broken(*args):
        raise TypeError("a bug after the parse")

    path.write_text(json.dumps(metrics))
    monkeypatch.setattr(trial, "_lookup", broken)
    with pytest.raises(TypeError, match="a bug after the parse"):
        trial._final_metric(path)
