"""Writing stage outputs so that a killed job never leaves a file that looks complete.

Every file is written under a temporary name in the same folder and renamed into place; folders
that hold several files get a sidecar written last. Manifests are one row per input with a status.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)
#: error_kind of the `skipped` manifest row of an input that repeats another (same file, same id).
DUPLICATE = "duplicate"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


class NoSpaceError(OSError):
    """The disk (or quota) filled up while writing a file; the message names the file."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)  # always set by __init__


def is_no_space(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a full disk or quota. Libraries report it
    their own way: OSError errno 28/122, or only the system's text (pyarrow)."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def no_space_message(exc: BaseException, folder: str | Path | None = None) -> str:
    """'no space left on device writing <file>' for a full-disk error, naming the file when any
    error in the chain does (else the folder being written)."""
    seen, first_named = set(), None
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, NoSpaceError):
            return str(cur)
        if first_named is None and isinstance(cur, OSError) and cur.filename:
            first_named = str(cur.filename)
        cur = cur.__cause__ or cur.__context__
    where = first_named or (f"a file in {folder}" if folder is not None else "a file")
    return f"no space left on device writing {where} ({exc})"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.
    A full disk raises NoSpaceError naming `path` (the temporary is removed, nothing is renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        try:
            yield tmp
            os.replace(tmp, path)
        except Exception as exc:
            if is_no_space(exc) and not isinstance(exc, NoSpaceError):
                raise NoSpaceError(path) from exc
            raise
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet_atomic(path: str | Path, table: pa.Table, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def clean_stale_temporaries(folder: str | Path) -> int:
    """Remove temporaries left by a killed run (they never look complete, but they take space)."""
    folder = Path(folder)
    if not folder.exists():
        return 0
    removed = 0
    for tmp in folder.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


def write_manifest(path: str | Path, rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> None:
    """A stage manifest: one row per input, written atomically so a reader never sees half of it.
    A column a row lacks is written as null (a failed row knows only some of them)."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    write_parquet_atomic(path, pa.table(columns, schema=schema))


def read_manifest(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


def stable_hash(obj: Any, digits: int = 16) -> str:
    """The one hash of nic's resume keys: sha256 of the canonical JSON of `obj` (keys sorted, paths
    and other non-JSON values as strings), as its first `digits` hex digits. 16 is enough to tell
    one set of options from another; the encoder's config_hash keeps all 64, as encoder.json always
    has. Every stage hashes through here, so equal settings give equal keys in every stage."""
    import hashlib

    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:digits]
