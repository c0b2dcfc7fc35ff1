"""The skeleton the stages over slides share (`nic tile`, `nic compress`; `nic synth` for its `out`
and exit code). Not a stage itself: what would otherwise be written once per stage.

A slide stage reads a list of slide inputs and answers for every one of them in a manifest,
`slides.parquet`, one row per input whatever happened to it. The parts here are the ones that
must not drift apart between stages, since readers and re-runs rely on them:

- the base columns of that manifest (`MANIFEST_COLUMNS`, `ManifestRow`); a stage inserts its own
  columns among them (`manifest_schema`), so each keeps the column order its files always had;
- the rows that are no stage's own work: a failed slide (`failed_row`), an input that is unusable
  or repeats another (`input_row`), a slide an earlier manifest vouches for (`vouched_row`), the
  error of a slide without tissue (`no_tissue_error`);
- sorting inputs into done and to-do (`partition`), with what an object-store re-run learns from
  one listing of `out` (`ListingResume`);
- saving the manifest while slides finish (`ManifestSaver`) and at the end (`finish`), the
  closing summary and the exit-code rule (`summarise`, `exit_code`);
- making `out` ready (`prepare_out`).

It lives in nic.slides (library) because it speaks of slide inputs and slide plans, a stage may
not import another stage, and a module at the top of nic would be in no layer (tests/import_graph.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast, get_type_hints

import pyarrow as pa

from nic import storage
from nic.artifacts import (
    DUPLICATE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    clean_stale_temporaries,
    read_manifest,
    write_bytes_atomic,
    write_manifest,
)
from nic.config.base import StageConfig, dump_config
from nic.logs import stage_logger
from nic.slides.errors import SlideError
from nic.slides.inputs import SlideInput, note_aliases
from nic.storage import display, remote_files

if TYPE_CHECKING:
    from nic.config.slides import SlideOptions
    from nic.slides.plan import SlidePlan

#: The manifest's file name in a stage's `out`.
MANIFEST_NAME = "slides.parquet"
#: `reason` of a slide that an earlier run finished (a `skipped` row).
ALREADY_COMPLETE = "already complete"
#: `error_kind` of an input that cannot be used as given (a bad path, id or list entry).
UNUSABLE = "input"
#: `error_kind` of a slide whose worker died on every attempt: lost, not failed by its own fault.
CRASH = "crash"

#: The columns every slide stage's manifest has, in this order (a stage's own go in between).
MANIFEST_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("slide_id", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),  # ok | failed | skipped (nic.artifacts.STATUSES)
    ("reason", pa.string()),  # why it failed or was skipped, naming the file
    ("error_kind", pa.string()),  # a SlideError kind, or input, duplicate, crash, no_space, ...
    ("mpp", pa.float64()),
    ("base_mpp", pa.float64()),
    ("level", pa.int32()),
    ("rows", pa.int32()),
    ("cols", pa.int32()),
    ("tiles", pa.int64()),
    ("seconds", pa.float64()),
    ("options_hash", pa.string()),
    ("file_bytes", pa.int64()),  # the output file's size: a re-run on an object store trusts it from a listing
)


class ManifestRow(TypedDict, total=False):
    """One row of a slide stage's manifest: the columns of MANIFEST_COLUMNS. A failed row holds
    only some of them (the others are written as nulls); stages extend it with their own columns
    (nic.tiling.worker.TileRow, nic.grids.manifest.GridRow)."""

    slide_id: str
    path: str
    status: str
    reason: str
    error_kind: str | None
    mpp: float
    base_mpp: float | None
    level: int
    rows: int
    cols: int
    tiles: int
    seconds: float
    options_hash: str
    file_bytes: int | None


def manifest_schema(row_type: object, own: Mapping[str, Sequence[tuple[str, pa.DataType]]] | None = None
                    ) -> pa.Schema:
    """The Parquet schema of a stage's manifest: the base columns with the stage's own, each group
    inserted after the base column it names (`{"base_mpp": [("mpp_source", pa.string())]}`), so a
    stage keeps the column order its manifests always had. `row_type`, the stage's TypedDict of a
    row, must name exactly these columns: a column added to one and not the other fails at import."""
    own = own or {}
    unknown = set(own) - {name for name, _ in MANIFEST_COLUMNS}
    if unknown:
        raise ValueError(f"no base manifest column {sorted(unknown)} to put stage columns after")
    fields: list[tuple[str, pa.DataType]] = []
    for name, kind in MANIFEST_COLUMNS:
        fields.append((name, kind))
        fields.extend(own.get(name, ()))
    schema = pa.schema(fields)
    typed = set(get_type_hints(row_type))
    if typed != set(schema.names):
        raise TypeError(f"{row_type!r} and its manifest schema disagree: only in the type "
                        f"{sorted(typed - set(schema.names))}, only in the schema {sorted(set(schema.names) - typed)}")
    return schema


def failed_row(slide_id: str, path: str, reason: str, kind: str = "error", seconds: float = 0.0) -> ManifestRow:
    """The row of a slide that failed: the columns a failure knows; the rest are written as nulls.
    `reason` names the file (nic.slides.SlideError does); `kind` is what code counts and filters by."""
    return {"slide_id": slide_id, "path": display(path), "status": STATUS_FAILED, "reason": reason,
            "error_kind": kind, "seconds": seconds}


def input_row(item: SlideInput, problem: Callable[[SlideInput], str | None] | None = None) -> ManifestRow | None:
    """The row of an input no stage processes, or None for one to process: a repeat of an earlier
    input (same file, same id) is `skipped` with error_kind `duplicate`, the one row that names it;
    an unusable input is `failed` with error_kind `input`. `problem` is a stage's own objection to
    an input the expansion accepted (compress: an id that cannot name a grid folder); it is asked
    only about inputs without an error of their own."""
    if item.duplicate_of:
        return {**failed_row(item.slide_id, item.path, item.note or "", DUPLICATE), "status": STATUS_SKIPPED}
    error = item.error if item.error is not None or problem is None else problem(item)
    return failed_row(item.slide_id, item.path, error, UNUSABLE) if error else None


def vouched_row(previous: Mapping[str, Any], path: str) -> ManifestRow:
    """The earlier manifest's row of a slide whose outputs it vouches for (nothing downloaded to
    check them), as this run's `skipped` row: the same facts, this run's path and no time spent."""
    return cast(ManifestRow, {**previous, "path": display(path), "status": STATUS_SKIPPED,
                              "reason": ALREADY_COMPLETE, "error_kind": None, "seconds": 0.0})


def no_tissue_error(path: str, plan: SlidePlan, options: SlideOptions) -> SlideError:
    """The error of a slide none of whose tiles has enough tissue. plan_slide does not raise it (a
    plan without tiles is a valid plan); the stages do, with the best tile's share so a person can
    tell an empty slide from a threshold set too high."""
    best = float(plan.fractions.max()) if plan.fractions.size else 0.0
    return SlideError(path, f"no tissue: none of its {plan.grid.rows * plan.grid.cols} tiles is at least "
                            f"{options.tissue.threshold:.0%} tissue (best tile: {best:.0%})", "no_tissue")


def previous_rows(path: Path) -> dict[str, dict]:
    """The earlier run's manifest rows by slide id ({} when there is none or it is unreadable)."""
    try:
        return {row["slide_id"]: row for row in read_manifest(path)}
    except Exception:  # a damaged manifest is rewritten; the outputs are checked on their own
        return {}


class ListingResume:
    """What an object-store re-run learns from one listing of `out` instead of downloading every
    output: which files exist there, with size and time, and when the earlier manifest was saved
    (an output newer than it was replaced since, and is not vouched for). `listing` is None for a
    local `out` (and when the whole output is fetched first, as before issue 16 item 6). Stages
    subclass it with their own rule of what makes a slide complete."""

    #: what the log line counts ("slide(s)", "grid(s)")
    noun = "slide(s)"

    def __init__(self, out: Path, previous: dict[str, dict]) -> None:
        self.out, self.previous = out, previous
        self.listing = None if storage.PREFETCH_OUTPUTS else remote_files(out)
        manifest = (self.listing or {}).get(MANIFEST_NAME)
        self.manifest_mtime_ns = manifest.mtime_ns if manifest else None
        self.vouched = 0  # decided from the manifest and the listing
        self.fetched = 0  # downloaded to be verified

    def describe(self) -> str:
        """The end of the stage's opening line: how the listing decided (nothing for a local out)."""
        if self.listing is None:
            return ""
        return (f"; decided from the manifest and a listing of {display(self.out)}: {self.vouched} {self.noun} "
                f"vouched for without a download, {self.fetched} fetched to be verified")


@dataclass
class Partition:
    """A run's inputs sorted before any work: `results` holds the row of every input that needs
    none (done, unusable, repeated), `todo` the rest, `order` every slide id in input order (the
    manifest's row order)."""

    order: list[str]
    results: dict[str, ManifestRow] = field(default_factory=dict)
    todo: list[SlideInput] = field(default_factory=list)

    @property
    def unusable(self) -> list[str]:
        """Ids of the inputs that cannot be used (before any work, every failed row is one)."""
        return [sid for sid, row in self.results.items() if row["status"] == STATUS_FAILED]

    def describe(self) -> str:
        """'<n> already complete, <m> unusable[, <d> repeating ...]', for the stage's opening line."""
        statuses = Counter(row["status"] for row in self.results.values())
        dups = sum(row.get("error_kind") == DUPLICATE for row in self.results.values())
        return (f"{statuses[STATUS_SKIPPED] - dups} already complete, {statuses[STATUS_FAILED]} unusable"
                + (f", {dups} repeating another input (same file, same id)" if dups else ""))


def partition(inputs: list[SlideInput], check: Callable[[SlideInput], ManifestRow | None],
              problem: Callable[[SlideInput], str | None] | None = None,
              extra: ManifestRow | None = None) -> Partition:
    """Sort inputs into rows and to-do: an unusable or repeated input gets its row (`input_row`,
    with the stage's `extra` columns: compress records the encoder even there); any other is
    asked of `check`, the stage's resume rule, which returns the row of a slide an earlier run
    finished, or None to (re)do it."""
    part = Partition(order=[item.slide_id for item in inputs])
    for item in inputs:
        row = input_row(item, problem)
        if row is not None and extra:
            row = {**row, **extra}
        if row is None:
            row = check(item)
        if row:
            part.results[item.slide_id] = row
        else:
            part.todo.append(item)
    return part


def save_manifest(path: Path, schema: pa.Schema, order: list[str], results: Mapping[str, ManifestRow]) -> None:
    """Write the manifest: the rows known so far, in input order (atomically: a reader never sees half)."""
    write_manifest(path, [results[sid] for sid in order if sid in results], schema)


class ManifestSaver:
    """Saves the manifest while slides finish, at most every `every_s` seconds (not per slide: a
    manifest of thousands of rows is rewritten whole), so a killed job still says what it
    finished. The interval counts from when it is made, i.e. when slides start to come back."""

    def __init__(self, path: Path, schema: pa.Schema, order: list[str], results: Mapping[str, ManifestRow],
                 every_s: float) -> None:
        self.path, self.schema, self.order, self.results, self.every_s = path, schema, order, results, every_s
        self.last_save = time.monotonic()

    def save(self) -> None:
        save_manifest(self.path, self.schema, self.order, self.results)

    def save_if_due(self) -> None:
        if time.monotonic() - self.last_save > self.every_s:
            self.save()
            self.last_save = time.monotonic()


def exit_code(succeeded: int, failed: int, strict: bool) -> int:
    """Every slide stage's exit code: 1 when no slide succeeded (ok or skipped), or with `strict`
    when any failed; else 0. A collection always holds some bad files: they are in the manifest,
    and fail the run only when asked to."""
    if succeeded == 0:
        return 1
    return 1 if strict and failed else 0


def summarise(stage: str, results: Mapping[str, ManifestRow], order: list[str], manifest_path: Path,
              strict: bool) -> int:
    """Log the run's outcome (counts, tissue tiles, then each failed slide with its reason, in
    input order) and return its exit code. A repeated input is counted apart: it is no slide."""
    log = stage_logger(stage)
    counts = Counter(row["status"] for row in results.values())
    dups = sum(row.get("error_kind") == DUPLICATE for row in results.values())
    counts[STATUS_SKIPPED] -= dups
    tiles = sum(int(row.get("tiles") or 0) for row in results.values() if row["status"] != STATUS_FAILED)
    log.info(f"[{stage}] done: {counts[STATUS_OK]} ok, {counts[STATUS_SKIPPED]} skipped (already complete), "
             f"{counts[STATUS_FAILED]} failed" + (f", {dups} duplicate input(s) skipped" if dups else "")
             + f"; {tiles} tissue tiles; manifest: {display(manifest_path)}")
    for sid in order:
        row = results.get(sid)
        if row and row["status"] == STATUS_FAILED:
            log.warning(f"[{stage}]   failed {sid}: {row['reason']}")
    succeeded = counts[STATUS_OK] + counts[STATUS_SKIPPED]
    if succeeded == 0:
        log.error(f"[{stage}] no slide succeeded")
    return exit_code(succeeded, counts[STATUS_FAILED], strict)


def finish(stage: str, inputs: list[SlideInput], results: dict[str, ManifestRow], manifest_path: Path,
           schema: pa.Schema, strict: bool) -> int:
    """The end of a run: aliases noted in their rows, the whole manifest saved, the summary logged;
    returns the exit code."""
    note_aliases(cast(dict[str, dict], results), inputs)  # it edits the rows in place
    order = [item.slide_id for item in inputs]
    save_manifest(manifest_path, schema, order, results)
    return summarise(stage, results, order, manifest_path, strict)


def prepare_out(out: Path, config: StageConfig, config_file: str,
                clean: Callable[[Path], object] = clean_stale_temporaries) -> None:
    """Make `out`, clear what a killed run left there (`clean`: temporaries, which never look
    complete but take space; a stage with its own staging passes its own), then record the
    resolved config as `config_file`, so the folder says how it was made."""
    out.mkdir(parents=True, exist_ok=True)
    clean(out)
    write_bytes_atomic(out / config_file, dump_config(config).encode())
