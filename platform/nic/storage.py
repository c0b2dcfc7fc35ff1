"""Object-store URIs (s3://, gs://, abfs://, hdfs://) wherever nic accepts a path, through a mirror.

OpenSlide, tifffile, atomic renames and most of the libraries a stage uses need local files, and
on a cluster every node must agree on what a path means. So a URI in a config becomes a path
under the node-local mirror root, `<root>/<scheme>/<bucket>/<key>`: a reversible mapping, so the
mirror path a driver hands to any Ray worker still says which object it stands for, and every
node (same user, same `NIC_MIRROR`) maps it to the same place.

- Inputs are fetched where they are opened (`ensure_local`), on whichever node that is: a slide
  by the task or actor that reads it, an encoder by each actor that loads it, grids by each Train
  worker. A copy is reused while the object's size and modification time are unchanged.
- Outputs are written to the mirror as usual (atomic renames, sidecars last) and uploaded when
  the stage ends, or by the Ray task that wrote them (`publish`): data files first, manifests and
  sidecars last, so a reader of the bucket never sees a manifest before the data it describes.
  Object-store writes are atomic per object (a multipart upload appears only when complete).
- A stage's output is fetched before it runs, so that a re-run skips finished work, except its
  per-slide data folders (`lazy`, e.g. a grid store's tiles/): for those the stage decides what is
  complete from its manifest and the bucket's listing (`remote_files`: sizes and times), fetching
  only what the manifest cannot vouch for. A re-run of 1,000 slides fetches no grid.
- The mirror's size limit is kept with a running total of what this process fetched, recounted
  by a walk of the mirror every `_RESCAN_S` seconds or when the total nears the limit (not a walk
  per download).
- Ray Train and Ray Tune get the URI itself (`ray_storage`): they sync checkpoints themselves.

Credentials and endpoints come from the usual environment of each filesystem (AWS_* variables or
an instance profile for S3, Application Default Credentials for GCS, ...), resolved by pyarrow.

This module imports nothing else of nic (tests/test_import_graph.py): the decorator that applies
it to a stage's run (lock, fetch, mirror, exit codes) is `nic.stage_io.stage_storage`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nic.logs import root_logger

#: URI schemes read and written through pyarrow.fs, and the name each has in the mirror.
SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "abfs": "abfs", "abfss": "abfss", "hdfs": "hdfs",
           "viewfs": "viewfs"}
#: Folders inside a stage's output that Ray Train/Tune write to the URI directly (checkpoints):
#: a mirrored output never downloads or uploads them.
RAY_STORAGE_DIRS = frozenset({"checkpoints", "ray"})
#: Files that describe others and so are uploaded after them.
_METADATA_SUFFIXES = (".json", ".yaml", ".yml", ".md")
_MANIFEST_NAMES = frozenset({"slides.parquet"})
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_DIRECT_UPLOAD = ("S3FileSystem", "GcsFileSystem", "AzureFileSystem")  # atomic per object
#: True fetches a stage's whole output before it runs, `lazy` folders too (every re-run did so
#: before issue 16 item 6); benchmarks/bench_resume_s3.py sets it to compare.
PREFETCH_OUTPUTS = False


class StorageError(ValueError):
    """A URI nic cannot use; the message names it."""


class UploadError(OSError):
    """A stage's outputs could not be uploaded; they stay in the mirror for the next run."""


def is_uri(text: Any) -> bool:
    return isinstance(text, str) and _URI.match(text) is not None


def mirror_root() -> Path:
    """Where this node keeps copies of remote objects (`NIC_MIRROR`, default ~/.cache/nic/mirror).
    It is a cache: deleting it loses nothing that was uploaded."""
    return Path(os.environ.get("NIC_MIRROR") or "~/.cache/nic/mirror").expanduser().absolute()


def _split(uri: str) -> tuple[str, str, str]:
    match = _URI.match(uri)
    if not match:
        raise StorageError(f"{uri!r} is not a URI")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise StorageError(f"{uri!r}: unsupported URI scheme '{scheme}://' (nic reads and writes "
                           f"{', '.join(sorted(set(SCHEMES)))} through pyarrow, and local paths)")
    if "?" in rest or "#" in rest:
        raise StorageError(f"{uri!r}: options in the URI are not supported; set them in the "
                           "environment (for S3: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_PROFILE)")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: no bucket (or host) in the URI")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"{uri!r}: '.' and '..' are not allowed in object keys")
    return SCHEMES[scheme], bucket, "/".join(parts)


def to_local(text: str) -> str:
    """What a config keeps for a path it was given: the path itself, or a URI's mirror path."""
    if not is_uri(text):
        return text
    if text.lower().startswith("file://"):
        return text[len("file://"):]
    return str(mirror_path(text))


def local_path(path: str | Path) -> Path:
    """A Python API's path argument as a local Path: a URI string becomes its mirror path."""
    return Path(to_local(path)) if isinstance(path, str) else Path(path)


def mirror_path(uri: str) -> Path:
    scheme, bucket, key = _split(uri)
    path = mirror_root() / scheme / bucket
    return path / key if key else path


def uri_for(path: str | Path) -> str | None:
    """The URI a mirror path stands for, or None for an ordinary local path."""
    path = Path(path).absolute()
    root = mirror_root()
    for base in dict.fromkeys((root, root.resolve())):
        try:
            rel = path.relative_to(base)
        except ValueError:
            continue
        parts = rel.parts
        if len(parts) >= 2 and parts[0] in SCHEMES.values():
            return f"{parts[0]}://{'/'.join(parts[1:])}"
    return None


def display(path: str | Path) -> str:
    """How a path is shown to the user and recorded in manifests: the URI when it is one."""
    return uri_for(path) or str(path)


def ray_storage(path: str | Path) -> str:
    """A Ray Train/Tune `storage_path`: the URI itself for a mirror path (Ray syncs to it from every
    node), else the absolute local path."""
    return uri_for(path) or str(Path(path).resolve())


@functools.cache
def _bucket_filesystem(scheme: str, bucket: str):
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")
    return fs, base.rstrip("/")


def _remote(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; filesystems are made once per bucket."""
    scheme, bucket, key = _split(uri)
    fs, base = _bucket_filesystem(scheme, bucket)
    return fs, f"{base}/{key}" if key else base


def _fresh(local: Path, info) -> bool:
    """A local copy matches the object when size and (whole-second) modification time agree."""
    try:
        st = local.stat()
    except OSError:
        return False
    if st.st_size != info.size:
        return False
    return info.mtime_ns is None or int(st.st_mtime) == info.mtime_ns // 1_000_000_000


def _stamp(local: Path, info) -> None:
    if info.mtime_ns is not None:
        seconds = info.mtime_ns // 1_000_000_000
        os.utime(local, (seconds, seconds))


def mirror_limit_bytes() -> int:
    """Most bytes the mirror may hold before old copies are dropped (`NIC_MIRROR_MAX_GB`, default
    100): a cluster node fetches thousands of slides over a job, more than its disk holds."""
    return int(float(os.environ.get("NIC_MIRROR_MAX_GB") or 100) * 1e9)


#: Seconds a walk of the mirror stays good for the size check: in between, the bytes this process
#: fetched are added to it. Other processes on the node fetch too, so it is recounted on this
#: schedule, and whenever the running total says a download would not fit.
_RESCAN_S = 60.0
#: A walk that has to drop copies drops them down to this fraction of the limit, so that the next
#: downloads fit without another walk.
_LOW_WATER = 0.9


@dataclass
class _Usage:
    root: Path
    scanned_at: float  # time.monotonic() of the last walk
    used: int  # bytes at that walk, plus what this process fetched since


_usage: _Usage | None = None
_usage_lock = threading.Lock()


def _forget_usage() -> None:
    """Forget the running total: the next size check walks the mirror (tests, benchmarks)."""
    global _usage
    with _usage_lock:
        _usage = None


def _scan_mirror(root: Path) -> list[tuple[float, int, Path]]:
    """(access time, size, path) of every file in the mirror: one walk of it."""
    files = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                st = path.stat()
                files.append((st.st_atime, st.st_size, path))
    return files


def _note_fetched(size: int) -> None:
    """Add a download to the running total (when there is one for this mirror)."""
    with _usage_lock:
        if _usage is not None and _usage.root == mirror_root():
            _usage.used += size


def _make_room(needed: int, keep: Path) -> int:
    """Make sure `needed` more bytes fit under the limit: from the running total when the last walk
    is recent and says they fit, else after a walk of the mirror that drops the least recently used
    copies (down to `_LOW_WATER` of the limit). Only a copy that matches its object is dropped
    (never an output still waiting for its upload); a process that has a dropped file open keeps
    reading it. Returns the bytes freed."""
    global _usage
    limit = mirror_limit_bytes()
    root = mirror_root()
    with _usage_lock:
        now = time.monotonic()
        if (_usage is not None and _usage.root == root and now - _usage.scanned_at < _RESCAN_S
                and _usage.used + needed <= limit):
            _usage.used += needed  # the download about to happen
            return 0
        files = _scan_mirror(root)
        used = sum(size for _, size, _ in files)
        target = limit if used + needed <= limit else int(limit * _LOW_WATER)
        freed = 0
        for _, size, path in sorted(files):
            if used - freed + needed <= target:
                break
            uri = uri_for(path)
            if path == keep or _is_temporary(path.name) or uri is None or not _is_copy(path):
                continue
            with contextlib.suppress(OSError):
                fs, rpath = _remote(uri)
                if _fresh(path, fs.get_file_info(rpath)):
                    path.unlink()
                    freed += size
        _usage = _Usage(root, now, used - freed + needed)
        return freed


def _is_temporary(name: str) -> bool:
    return name.startswith(".")


def _touch(local: Path) -> None:
    """Mark a copy as just used (access time) for `_make_room`, keeping the modification time that
    says which version of the object it is."""
    with contextlib.suppress(OSError):
        os.utime(local, ns=(time.time_ns(), local.stat().st_mtime_ns))


_BIG = 64 << 20  # downloads this large check the mirror's limit first (slides, not manifests)


def _download(fs, info, local: Path) -> int:
    if info.size >= _BIG:
        _make_room(info.size, local)
    else:
        _note_fetched(info.size)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    _stamp(local, info)
    return info.size


def _excluded(rel: str, exclude: frozenset[str]) -> bool:
    """Temporaries, staging folders and dot-files never move; nor do the `exclude` folders."""
    parts = rel.split("/")
    return any(p in exclude for p in parts[:-1]) or any(_is_temporary(p) for p in parts)


def _is_lazy(rel: str, lazy: tuple[str, ...]) -> bool:
    """Whether `rel` lies in one of the `lazy` folders (relative paths; `*` matches one name)."""
    folders = rel.split("/")[:-1]
    for pattern in lazy:
        parts = pattern.strip("/").split("/")
        if len(folders) >= len(parts) and all(fnmatch.fnmatchcase(f, p) for f, p in zip(folders, parts)):
            return True
    return False


def ensure_local(path: str | Path, missing_ok: bool = False,
                 exclude: frozenset[str] = frozenset(), lazy: Iterable[str] = ()) -> Path:
    """A local path holding the current content of `path`: unchanged for local paths; for a mirror
    path, the object (or every object under the prefix) is downloaded unless the copy is current.
    Objects in the `lazy` folders under the prefix (e.g. "tiles", "grids/*/tiles") are not
    downloaded: a local file there that is not a current copy of its object (a stale copy, or a
    file written here that the bucket has since replaced) is removed, so what is left there is
    current or written here and not uploaded yet; the caller fetches the rest as it needs it
    (`remote_files` says what the bucket holds). Raises FileNotFoundError naming the URI when it
    names nothing (unless `missing_ok`)."""
    import pyarrow.fs as pafs

    local = Path(path)
    uri = uri_for(local)
    if uri is None:
        return local
    lazy = () if PREFETCH_OUTPUTS else tuple(lazy)
    fs, rpath = _remote(uri)
    try:
        info = fs.get_file_info(rpath)
        if info.type == pafs.FileType.File:
            if not _fresh(local, info):
                _download(fs, info, local)
            _touch(local)
        elif info.type == pafs.FileType.Directory:
            wanted = set()
            for item in fs.get_file_info(pafs.FileSelector(rpath, recursive=True)):
                rel = item.path[len(rpath):].lstrip("/")
                if item.type == pafs.FileType.File and not _excluded(rel, exclude):
                    wanted.add(rel)
                    target = local / rel
                    if _fresh(target, item):
                        continue
                    if lazy and _is_lazy(rel, lazy):
                        target.unlink(missing_ok=True)
                    else:
                        _download(fs, item, target)
            _drop_unlisted(local, wanted, exclude)
        elif not missing_ok and not local.exists():
            raise FileNotFoundError(f"{uri}: no such object or prefix")
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise OSError(f"{uri}: cannot read it ({exc})") from exc
    return local


def _is_copy(path: Path) -> bool:
    """Whether a file is a copy of an object (fetched, or uploaded since it was written): those get
    the object's whole-second modification time, a file written here keeps its nanoseconds (the
    mirror needs a file system with sub-second times, as ext4, xfs and btrfs have)."""
    try:
        return path.stat().st_mtime_ns % 1_000_000_000 == 0
    except OSError:
        return False


def _drop_unlisted(local: Path, wanted: set[str], exclude: frozenset[str]) -> None:
    """The URI is the truth: copies of objects that are gone (a re-made grid store) must not be
    read as current. Files written here and not uploaded yet, and temporaries, are left."""
    for path in local.rglob("*"):
        rel = path.relative_to(local).as_posix()
        if path.is_file() and rel not in wanted and not _excluded(rel, exclude) and _is_copy(path):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class RemoteFile:
    """An object as a listing of its bucket shows it."""

    size: int
    mtime_ns: int | None


def remote_files(path: str | Path) -> dict[str, RemoteFile] | None:
    """Every object under a mirror path's prefix, by its path relative to it, with size and
    modification time, from a listing of the bucket (nothing is downloaded); {} when the prefix
    holds nothing, None for a local path. Temporaries and dot-files are left out."""
    import pyarrow.fs as pafs

    uri = uri_for(path)
    if uri is None:
        return None
    fs, rpath = _remote(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(rpath, allow_not_found=True, recursive=True))
    except OSError as exc:
        raise OSError(f"{uri}: cannot list it ({exc})") from exc
    files = {}
    for info in infos:
        rel = info.path[len(rpath):].lstrip("/")
        if info.type == pafs.FileType.File and not _excluded(rel, frozenset()):
            files[rel] = RemoteFile(int(info.size), info.mtime_ns)
    return files


def is_current_copy(local: str | Path, remote: RemoteFile) -> bool:
    """Whether a local file is a copy of the object `remote` describes (same size and time)."""
    return _fresh(Path(local), remote)


def written_here(local: str | Path) -> bool:
    """Whether a local file in the mirror was written on this node and not uploaded yet (not a
    copy of an object): a re-run on this node may trust it as the stage left it."""
    path = Path(local)
    return path.is_file() and not _is_copy(path)


def remote_children(path: str | Path) -> list[Path] | None:
    """Mirror paths of the objects directly under a mirror path's prefix (None for a local path,
    [] when the prefix holds nothing): lets a driver list slides without downloading them."""
    import pyarrow.fs as pafs

    uri = uri_for(path)
    if uri is None:
        return None
    fs, rpath = _remote(uri)
    selector = pafs.FileSelector(rpath, allow_not_found=True, recursive=False)
    return sorted(Path(path) / Path(i.path).name for i in fs.get_file_info(selector))


def remote_kind(path: str | Path) -> str | None:
    """'file', 'dir' or 'missing' for a mirror path's object; None for a local path."""
    import pyarrow.fs as pafs

    uri = uri_for(path)
    if uri is None:
        return None
    fs, rpath = _remote(uri)
    kind = fs.get_file_info(rpath).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind, "missing")


def _is_metadata(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(_METADATA_SUFFIXES) or name in _MANIFEST_NAMES


def upload_order(rels: list[str]) -> list[str]:
    """Data files first, then the manifests and sidecars that describe them (each group sorted)."""
    return sorted(rels, key=lambda rel: (_is_metadata(rel), rel))


def _upload(fs, local: Path, rpath: str) -> None:
    parent = rpath.rsplit("/", 1)[0]
    direct = type(fs).__name__ in _DIRECT_UPLOAD
    if not direct:  # object stores have no folders to make
        fs.create_dir(parent, recursive=True)
    target = rpath if direct else f"{parent}/.{local.name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(local, "rb") as src, fs.open_output_stream(target) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    if not direct:
        fs.move(target, rpath)
    _stamp(local, fs.get_file_info(rpath))


def publish(path: str | Path, exclude: frozenset[str] = RAY_STORAGE_DIRS) -> int:
    """Upload what changed under a mirror path (a file or a folder) to its URI; returns the number
    of files uploaded (0 for local paths). Temporaries and dot-files are never uploaded."""
    import pyarrow.fs as pafs

    local = Path(path)
    uri = uri_for(local)
    if uri is None or not local.exists():
        return 0
    fs, rpath = _remote(uri)
    if local.is_file():
        info = fs.get_file_info(rpath)
        if info.type == pafs.FileType.File and _fresh(local, info):
            return 0
        _upload(fs, local, rpath)
        return 1
    remote = {i.path[len(rpath):].lstrip("/"): i
              for i in fs.get_file_info(pafs.FileSelector(rpath, allow_not_found=True, recursive=True))
              if i.type == pafs.FileType.File}
    rels = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    stale = [rel for rel in rels if not _excluded(rel, exclude)
             and not (rel in remote and _fresh(local / rel, remote[rel]))]
    for rel in upload_order(stale):
        _upload(fs, local / rel, f"{rpath}/{rel}")
    return len(stale)


def exists(path: str | Path) -> bool:
    """Whether a path exists here or, for a mirror path, in its object store."""
    return Path(path).exists() or remote_kind(path) in ("file", "dir")


def remove(path: str | Path) -> None:
    """Delete a file or folder here and, for a mirror path, its objects."""
    import pyarrow.fs as pafs

    local = Path(path)
    if local.is_dir():
        shutil.rmtree(local, ignore_errors=True)
    else:
        local.unlink(missing_ok=True)
    uri = uri_for(local)
    if uri is not None:
        fs, rpath = _remote(uri)
        kind = fs.get_file_info(rpath).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(rpath)
        elif kind == pafs.FileType.File:
            fs.delete_file(rpath)


def child_names(path: str | Path) -> list[str]:
    """Names in a folder here and, for a mirror path, under its prefix."""
    local = Path(path)
    names = {p.name for p in local.iterdir()} if local.is_dir() else set()
    names.update(p.name for p in remote_children(local) or [])
    return sorted(names)


@contextlib.contextmanager
def mirrored_output(path: str | Path, lazy: Iterable[str] = ()) -> Iterator[Path]:
    """A stage's output folder: for a mirror path, what the URI holds already is fetched first (so
    that a re-run skips complete work), except the `lazy` folders (see `ensure_local`: the stage
    decides from its manifest and `remote_files` what is complete there), and everything written is
    uploaded at the end, also when the stage fails (each file is complete, so partial progress is
    kept for the next run)."""
    local = ensure_local(path, missing_ok=True, exclude=RAY_STORAGE_DIRS, lazy=lazy)
    try:
        yield local
    finally:
        uri = uri_for(local)
        if uri is not None:
            try:
                sent = publish(local)
            except OSError as exc:
                raise UploadError(f"{uri}: upload failed ({exc}); the outputs are kept in {local} "
                                  "and a re-run uploads them") from exc
            if sent:
                root_logger().info(f"nic: uploaded {sent} file(s) to {uri}")
