"""The labels table of a downstream run: reading, validating, matching it with the grid store.

A user's labels table is where most downstream runs go wrong (a slide renamed, a blank cell, a time
of 0, an event coded 2), so every problem found is collected, not just the first, and the error
lists the offending rows by row number and slide id. Grids that have no label are not an error
(they are reported); labelled slides without a grid are, unless the run asks to drop them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

Kind = Literal["binary", "multiclass", "regression", "survival"]
MAX_LISTED = 20


class LabelError(ValueError):
    """The labels table cannot be used; the message lists every problem and its rows."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(f"labels table {path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Labels:
    """A validated labels table: one row per usable slide, in table order.

    `frame` columns: slide_id, patient_id (the slide id when the table has no patient column),
    row (1-based data row in the file), and per kind: target (class index int or float value) or
    time (float > 0) and event (int 0/1).
    """

    kind: Kind
    frame: pd.DataFrame
    classes: list[str] = field(default_factory=list)  # class index -> original label (classification)
    has_patients: bool = False
    unlabelled_grids: list[str] = field(default_factory=list)  # grids with no row in the table
    dropped_without_grid: list[str] = field(default_factory=list)  # labelled slides dropped (no grid)
    source: str = ""

    @property
    def slide_ids(self) -> list[str]:
        return self.frame["slide_id"].tolist()

    @property
    def num_outputs(self) -> int:
        """Model outputs: K logits for multiclass, one value otherwise."""
        return len(self.classes) if self.kind == "multiclass" else 1

    def strata(self) -> np.ndarray | None:
        """What splits stratify on: the class, or the event indicator for survival; None for regression."""
        if self.kind in ("binary", "multiclass"):
            return self.frame["target"].to_numpy().astype(int)
        if self.kind == "survival":
            return self.frame["event"].to_numpy().astype(int)
        return None

    def summary(self) -> dict:
        out: dict[str, Any] = {
            "kind": self.kind,
            "slides": len(self.frame),
            "patients": int(self.frame["patient_id"].nunique()),
            "unlabelled_grids": len(self.unlabelled_grids),
            "dropped_without_grid": self.dropped_without_grid,
        }
        if self.classes:
            counts = self.frame["target"].value_counts().to_dict()
            out["classes"] = {name: int(counts.get(i, 0)) for i, name in enumerate(self.classes)}
        if self.kind == "survival":
            out["events"] = int(self.frame["event"].sum())
        return out


def read_table(path: str | Path, id_columns: tuple[str, ...] = ("slide_id", "patient_id")) -> pd.DataFrame:
    """CSV, TSV or Parquet (by extension); id columns of a text table are read as text, so ids like
    '007' keep their leading zeros."""
    path = Path(path)
    if not path.exists():
        raise LabelError(path, ["file not found"])
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype={c: str for c in id_columns if c})
        else:
            raise LabelError(path, [f"unsupported extension {suffix!r}: use .csv, .tsv or .parquet"])
    except LabelError:
        raise
    except Exception as exc:  # the reader's own message says what is wrong with the file
        raise LabelError(path, [f"cannot be read: {exc}"]) from exc
    return frame


def _rows(frame: pd.DataFrame, mask: np.ndarray | pd.Series, slide_column: str) -> str:
    """'row 3 (slide a), row 7 (slide b), ... and N more' for the rows where mask is true."""
    idx = np.flatnonzero(np.asarray(mask))
    parts = [f"row {i + 1} ({slide_column} {frame[slide_column].iloc[i]!r})" for i in idx[:MAX_LISTED]]
    more = f", ... and {len(idx) - MAX_LISTED} more" if len(idx) > MAX_LISTED else ""
    return ", ".join(parts) + more


def _as_number(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce")


def _class_labels(values: pd.Series) -> list:
    """Distinct class labels in a stable order (numeric order for numbers, else text order)."""
    uniq = pd.unique(values.dropna())
    try:
        return sorted(uniq, key=float)
    except (TypeError, ValueError):
        return sorted(uniq, key=str)


def load_labels(
    path: str | Path,
    kind: Kind,
    *,
    target: str | None = None,
    time_column: str = "time",
    event_column: str = "event",
    patient_column: str | None = "patient_id",
    slide_column: str = "slide_id",
    available_slides: list[str] | None = None,
    missing_grids: Literal["error", "drop"] = "error",
    min_per_class: int = 2,
) -> Labels:
    """Read and validate a labels table; with `available_slides`, match it to the grid store.

    Every problem is collected and raised together as one LabelError:
    missing columns; duplicated or empty slide ids; missing/NaN/non-numeric targets; binary
    targets with more than two values; negative or zero times; events other than 0/1; a class (or,
    for survival, events or censored slides) with fewer than `min_per_class` slides (stratified
    k-fold needs one per fold); labelled slides that have no grid (unless missing_grids="drop",
    which drops and reports them). Grids without a label are reported in `unlabelled_grids`.
    """
    path = Path(path)
    frame = read_table(path, (slide_column, patient_column or "")).reset_index(drop=True)
    _require_columns(path, frame, kind, target, time_column, event_column, slide_column)
    has_patients = bool(patient_column) and patient_column in frame.columns
    problems = _id_problems(frame, slide_column, patient_column if has_patients else None)

    out = pd.DataFrame({
        "slide_id": frame[slide_column],
        "patient_id": frame[patient_column].astype(str) if has_patients else frame[slide_column],
        "row": np.arange(1, len(frame) + 1),
    })
    classes: list[str] = []
    if kind == "survival":
        problems += _survival_columns(frame, out, time_column, event_column, slide_column)
    else:
        assert target is not None  # _require_columns refused a table without one
        target_problems, classes = _target_column(frame, out, kind, target, slide_column)
        problems += target_problems
    if problems:
        raise LabelError(path, problems)

    dropped: list[str] = []
    unlabelled: list[str] = []
    if available_slides is not None:
        out, dropped, unlabelled = _match_grids(path, frame, out, available_slides, missing_grids, slide_column)

    count_problems = _count_problems(out, kind, classes, target, min_per_class)
    if count_problems:
        raise LabelError(path, count_problems)

    return Labels(kind=kind, frame=out, classes=classes, has_patients=has_patients,
                  unlabelled_grids=unlabelled, dropped_without_grid=dropped, source=str(path))


def _require_columns(path: Path, frame: pd.DataFrame, kind: Kind, target: str | None, time_column: str,
                     event_column: str, slide_column: str) -> None:
    """Refuse at once a table that lacks a column the kind needs: every later check reads those
    columns, so there is nothing more to collect without them."""
    needed = [slide_column]
    if kind == "survival":
        needed += [time_column, event_column]
    else:
        if not target:
            raise LabelError(path, [f"kind {kind!r} needs a target column (config key 'target')"])
        needed.append(target)
    missing_cols = [c for c in needed if c not in frame.columns]
    if missing_cols:
        raise LabelError(path, [f"missing column(s) {missing_cols}; the table has {list(frame.columns)}"])


def _id_problems(frame: pd.DataFrame, slide_column: str, patient_column: str | None) -> list[str]:
    """Empty and duplicated slide ids, and rows without a patient (`patient_column` None: the
    table has none). Strips the slide ids in `frame` in place, so a stray space in a spreadsheet
    does not make an id that matches no grid."""
    problems: list[str] = []
    slide = frame[slide_column]
    empty = slide.isna() | (slide.astype(str).str.strip() == "")
    if empty.any():
        problems.append(f"{int(empty.sum())} row(s) without a slide id: {_rows(frame, empty, slide_column)}")
    frame[slide_column] = slide.astype(str).str.strip()
    dup = frame[slide_column].duplicated(keep=False) & ~empty
    if dup.any():
        problems.append(f"duplicated slide ids: {_rows(frame, dup, slide_column)}")
    if patient_column is not None:
        no_patient = frame[patient_column].isna() & ~empty
        if no_patient.any():
            problems.append(f"{int(no_patient.sum())} row(s) without a {patient_column!r}: "
                            f"{_rows(frame, no_patient, slide_column)}")
    return problems


def _survival_columns(frame: pd.DataFrame, out: pd.DataFrame, time_column: str, event_column: str,
                      slide_column: str) -> list[str]:
    """Add `time` and `event` to `out`; returns the problems of those columns (times must be
    finite and > 0 for the Cox loss, events exactly 0 or 1)."""
    problems: list[str] = []
    t = _as_number(frame[time_column])
    e = _as_number(frame[event_column])
    bad_t = t.isna() | ~np.isfinite(t.fillna(0))
    if bad_t.any():
        problems.append(f"missing, NaN or non-numeric {time_column!r}: {_rows(frame, bad_t, slide_column)}")
    nonpos = ~bad_t & (t <= 0)
    if nonpos.any():
        problems.append(f"negative or zero {time_column!r} (survival times must be > 0): "
                        f"{_rows(frame, nonpos, slide_column)}")
    bad_e = e.isna() | ~e.isin([0, 1])
    if bad_e.any():
        problems.append(f"{event_column!r} must be 0 (censored) or 1 (event): {_rows(frame, bad_e, slide_column)}")
    out["time"] = t.astype(float)
    out["event"] = e.fillna(-1).astype(int)
    return problems


def _target_column(frame: pd.DataFrame, out: pd.DataFrame, kind: Kind, target: str,
                   slide_column: str) -> tuple[list[str], list[str]]:
    """Add `target` to `out` (a float for regression, a class index for classification); returns
    the column's problems and the class names (empty for regression), index order."""
    problems: list[str] = []
    raw = frame[target]
    absent = raw.isna() | (raw.astype(str).str.strip() == "")
    if kind == "regression":
        values = _as_number(raw)
        bad = values.isna() | ~np.isfinite(values.fillna(0))
        if bad.any():
            problems.append(f"missing, NaN or non-numeric {target!r}: {_rows(frame, bad, slide_column)}")
        out["target"] = values.astype(float)
        return problems, []
    if absent.any():
        problems.append(f"missing or NaN {target!r}: {_rows(frame, absent, slide_column)}")
    labels = _class_labels(raw[~absent])
    if kind == "binary" and len(labels) > 2:
        problems.append(f"binary target {target!r} has {len(labels)} distinct values {labels[:10]}; "
                        "use kind: multiclass or recode it to two values")
    if len(labels) < 2:
        problems.append(f"target {target!r} has fewer than two classes ({labels}): nothing to learn")
    index = {lab: i for i, lab in enumerate(labels)}
    out["target"] = raw.map(lambda v: index.get(v, -1) if not pd.isna(v) else -1).astype(int)
    return problems, [_label_text(lab) for lab in labels]


def _match_grids(path: Path, frame: pd.DataFrame, out: pd.DataFrame, available_slides: list[str],
                 missing_grids: Literal["error", "drop"],
                 slide_column: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Match the validated rows to the grid store: a labelled slide without a grid is an error (or,
    with missing_grids="drop", dropped and reported); returns the rows kept, the slides dropped and
    the grids that have no label (reported, never an error)."""
    dropped: list[str] = []
    have = set(available_slides)
    no_grid = ~out["slide_id"].isin(have)
    if no_grid.any():
        if missing_grids == "error":
            raise LabelError(path, [
                f"{int(no_grid.sum())} labelled slide(s) have no grid in the grid store: "
                f"{_rows(frame, no_grid.to_numpy(), slide_column)} (compression failed or skipped them, or "
                "the ids differ; set missing_grids: drop to train without them)"
            ])
        dropped = out.loc[no_grid, "slide_id"].tolist()
        out = out.loc[~no_grid].reset_index(drop=True)
    labelled = set(out["slide_id"])
    unlabelled = sorted(s for s in have if s not in labelled)
    return out, dropped, unlabelled


def _count_problems(out: pd.DataFrame, kind: Kind, classes: list[str], target: str | None,
                    min_per_class: int) -> list[str]:
    """Enough slides per class (per event status for survival) for stratified folds: counted
    after matching with the grids, since a dropped slide can leave a class too small."""
    count_problems = []
    if kind in ("binary", "multiclass"):
        counts = out["target"].value_counts()
        for i, name in enumerate(classes):
            n = int(counts.get(i, 0))
            if n < min_per_class:
                rows = out.loc[out["target"] == i]
                listed = ", ".join(f"row {r} ({s!r})" for r, s in zip(rows["row"], rows["slide_id"]))
                count_problems.append(
                    f"class {name!r} of {target!r} has {n} slide(s) with a grid, fewer than the {min_per_class} "
                    f"needed (one per fold){': ' + listed if listed else ''}"
                )
    elif kind == "survival":
        n_events = int(out["event"].sum())
        if n_events < min_per_class:
            count_problems.append(f"only {n_events} event(s) among slides with a grid; at least {min_per_class} "
                                  "are needed (one per fold) to fit and evaluate a survival model")
    elif len(out) < min_per_class:
        count_problems.append(f"only {len(out)} slide(s) with a grid; at least {min_per_class} are needed")
    return count_problems


def _label_text(value: object) -> str:
    """'1' rather than '1.0' for integral numeric labels, so class names read naturally."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)
