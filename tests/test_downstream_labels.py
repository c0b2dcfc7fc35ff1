"""Every label problem gives a clear error listing the offending rows; grids without labels are reported."""

from __future__ import annotations

import pandas as pd
import pytest

from nic.downstream.labels import LabelError, load_labels

BASE = [
    {"slide_id": "a", "patient_id": "p1", "label": 0, "grade": "low", "score": 1.5, "time": 3.0, "event": 1},
    {"slide_id": "b", "patient_id": "p1", "label": 1, "grade": "high", "score": 2.5, "time": 5.0, "event": 0},
    {"slide_id": "c", "patient_id": "p2", "label": 0, "grade": "mid", "score": 0.5, "time": 1.0, "event": 1},
    {"slide_id": "d", "patient_id": "p3", "label": 1, "grade": "high", "score": 4.0, "time": 2.0, "event": 1},
    {"slide_id": "e", "patient_id": "p4", "label": 0, "grade": "low", "score": 3.0, "time": 7.5, "event": 0},
    {"slide_id": "f", "patient_id": "p5", "label": 1, "grade": "mid", "score": 2.0, "time": 4.0, "event": 1},
]


def _write(tmp_path, rows, name="labels.csv"):
    path = tmp_path / name
    frame = pd.DataFrame(rows)
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def _edit(**changes):
    rows = [dict(r) for r in BASE]
    for slide, values in changes.items():
        next(r for r in rows if r["slide_id"] == slide).update(values)
    return rows


def test_valid_tables_of_every_kind(tmp_path):
    path = _write(tmp_path, BASE)
    b = load_labels(path, "binary", target="label")
    assert b.frame["target"].tolist() == [0, 1, 0, 1, 0, 1] and b.classes == ["0", "1"]
    assert b.has_patients and b.frame["patient_id"].nunique() == 5
    m = load_labels(path, "multiclass", target="grade")
    assert m.classes == ["high", "low", "mid"] and m.num_outputs == 3
    r = load_labels(path, "regression", target="score")
    assert r.frame["target"].tolist() == [1.5, 2.5, 0.5, 4.0, 3.0, 2.0]
    s = load_labels(_write(tmp_path, BASE, "labels.parquet"), "survival")
    assert s.frame["event"].tolist() == [1, 0, 1, 1, 0, 1] and s.summary()["events"] == 4


def test_slides_without_grids_are_listed_or_dropped(tmp_path):
    path = _write(tmp_path, BASE)
    grids = ["a", "b", "c", "e", "f", "zz"]
    with pytest.raises(LabelError) as err:
        load_labels(path, "binary", target="label", available_slides=grids)
    msg = str(err.value)
    assert "1 labelled slide(s) have no grid" in msg and "row 4 (slide_id 'd')" in msg
    assert "missing_grids: drop" in msg
    dropped = load_labels(path, "binary", target="label", available_slides=grids, missing_grids="drop")
    assert dropped.dropped_without_grid == ["d"] and "d" not in dropped.slide_ids


def test_grids_without_labels_are_reported_not_errors(tmp_path):
    labels = load_labels(_write(tmp_path, BASE), "binary", target="label",
                         available_slides=["a", "b", "c", "d", "e", "f", "x1", "x2"])
    assert labels.unlabelled_grids == ["x1", "x2"]
    assert labels.summary()["unlabelled_grids"] == 2


def test_missing_and_nan_targets_are_listed(tmp_path):
    rows = _edit(b={"label": None}, e={"label": float("nan")})
    with pytest.raises(LabelError) as err:
        load_labels(_write(tmp_path, rows), "binary", target="label")
    assert "missing or NaN 'label'" in str(err.value)
    assert "row 2 (slide_id 'b')" in str(err.value) and "row 5 (slide_id 'e')" in str(err.value)
    rows = _edit(c={"score": "n/a"}, f={"score": None})
    with pytest.raises(LabelError, match=r"non-numeric 'score': row 3 \(slide_id 'c'\), row 6 \(slide_id 'f'\)"):
        load_labels(_write(tmp_path, rows), "regression", target="score")


def test_negative_or_zero_times_are_listed(tmp_path):
    rows = _edit(a={"time": 0}, d={"time": -2.0})
    with pytest.raises(LabelError) as err:
        load_labels(_write(tmp_path, rows), "survival")
    assert "negative or zero 'time'" in str(err.value)
    assert "row 1 (slide_id 'a')" in str(err.value) and "row 4 (slide_id 'd')" in str(err.value)


def test_events_not_0_or_1_are_listed(tmp_path):
    rows = _edit(b={"event": 2}, c={"event": None})
    with pytest.raises(LabelError) as err:
        load_labels(_write(tmp_path, rows), "survival")
    assert "'event' must be 0 (censored) or 1 (event)" in str(err.value)
    assert "row 2 (slide_id 'b')" in str(err.value) and "row 3 (slide_id 'c')" in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    rows = _edit(a={"time": -1}, b={"event": 5})
    with pytest.raises(LabelError) as err:
        load_labels(_write(tmp_path, rows), "survival")
    assert len(err.value.problems) == 2


def test_class_with_too_few_slides(tmp_path):
    rows = _edit(b={"grade": "rare"})
    with pytest.raises(LabelError) as err:
        load_labels(_write(tmp_path, rows), "multiclass", target="grade", min_per_class=2)
    assert "class 'rare' of 'grade' has 1 slide(s)" in str(err.value) and "row 2 ('b')" in str(err.value)
    # After matching with the grid store: only 2 positives keep a grid, 3 folds need 3.
    with pytest.raises(LabelError, match="class '1' of 'label' has 2 slide"):
        load_labels(_write(tmp_path, BASE), "binary", target="label", min_per_class=3,
                    available_slides=["a", "b", "c", "d", "e"], missing_grids="drop")
    with pytest.raises(LabelError, match="only 1 event"):
        load_labels(_write(tmp_path, _edit(a={"event": 0}, c={"event": 0}, d={"event": 0})), "survival",
                    min_per_class=2)


def test_table_level_problems(tmp_path):
    with pytest.raises(LabelError, match="missing column"):
        load_labels(_write(tmp_path, BASE), "binary", target="nope")
    with pytest.raises(LabelError, match="duplicated slide ids"):
        load_labels(_write(tmp_path, BASE + [dict(BASE[0])]), "binary", target="label")
    with pytest.raises(LabelError, match="file not found"):
        load_labels(tmp_path / "absent.csv", "binary", target="label")
    with pytest.raises(LabelError, match="binary target 'grade' has 3 distinct values"):
        load_labels(_write(tmp_path, BASE), "binary", target="grade")
    with pytest.raises(LabelError, match="needs a target column"):
        load_labels(_write(tmp_path, BASE), "regression")
    (tmp_path / "labels.xlsx").write_text("x")
    with pytest.raises(LabelError, match="unsupported extension"):
        load_labels(tmp_path / "labels.xlsx", "binary", target="label")
    with pytest.raises(LabelError) as err:
        load_labels(_write(tmp_path, _edit(a={"label": None})), "binary", target="label")
    assert str(err.value).startswith(f"labels table {tmp_path / 'labels.csv'}:")  # errors name the file


def test_ids_keep_leading_zeros_and_custom_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("case,patient,y\n007,0001,1\n008,0001,0\n010,0002,1\n011,0003,0\n")
    labels = load_labels(path, "binary", target="y", slide_column="case", patient_column="patient",
                         available_slides=["007", "008", "010", "011"])
    assert labels.slide_ids == ["007", "008", "010", "011"]
    assert labels.frame["patient_id"].tolist() == ["0001", "0001", "0002", "0003"]
    no_patients = load_labels(path, "binary", target="y", slide_column="case", patient_column="missing_col")
    assert not no_patients.has_patients and no_patients.frame["patient_id"].tolist() == no_patients.slide_ids
