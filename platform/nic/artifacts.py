"""Writing stage outputs so that a killed job never leaves a file that looks complete.

Every file is written under a temporary name in the same folder and renamed into place; folders
that hold several files get a sidecar written last. Manifests are one row per input with a status.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
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


def write_manifest(path: str | Path, rows: list[dict], schema: pa.Schema) -> None:
    """A stage manifest: one row per input, written atomically so a reader never sees half of it."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    write_parquet_atomic(path, pa.table(columns, schema=schema))


def read_manifest(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


def stable_hash(obj: Any) -> str:
    """Short content hash of a JSON-able object, to tell whether an output was made with the same options."""
    import hashlib

    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
