"""One run at a time per output folder: the lock every stage holds on its `out` while it runs.

Two runs writing one folder at once (two users, or a job resubmitted while the first still runs)
would interleave manifests, delete each other's "stale" files and publish a mix. So every stage
(through `nic.stage_io.stage_storage`) takes `<out>/.nic-lock.json` before it touches `out`, and
a second run refuses with a message naming the first (host, pid, start time, command) and exit
code `EXIT_LOCKED` (75, "temporary failure: try again later").

The lock file is created with O_EXCL (atomic on local file systems and NFSv3+) and holds JSON:
token, host, boot id, pid namespace, pid and the pid's start time, user, start time, stage,
command. Its modification time is the heartbeat, refreshed every few seconds by a background
thread. A lock whose holder died is taken over (with a message):

- same host (host name, boot id and pid namespace all equal): the pid no longer runs, or now
  belongs to another process (its start time differs);
- another host (or a container with its own pid namespace): the heartbeat is older than
  `NIC_LOCK_STALE_S` seconds (default 60);
- an unreadable lock file (a holder killed while writing it): as another host's.

A process may take a lock it already holds (the pipeline holds its `out` while its stages run in
sub-folders, each with its own lock; a stage whose out is the pipeline's own folder nests).
The lock is a dot-file, so it is never uploaded to an object store: for an `s3://...` out the
node-local mirror folder is locked, which excludes runs on the same node only; runs on several
nodes exclude each other only through a shared file system (NFS, EFS) that they all mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from nic.logs import root_logger

LOCK_NAME = ".nic-lock.json"
#: Exit code of a stage refused because another run holds its output folder (sysexits EX_TEMPFAIL).
EXIT_LOCKED = 75
DEFAULT_STALE_S = 60.0


class LockedError(RuntimeError):
    """Another live run holds the folder; the message names it."""


def stale_after_s() -> float:
    """Seconds without a heartbeat after which another host's lock counts as abandoned."""
    try:
        seconds = float(os.environ.get("NIC_LOCK_STALE_S") or DEFAULT_STALE_S)
    except ValueError:  # not a number: the default
        return DEFAULT_STALE_S
    return max(1.0, seconds)


def heartbeat_s() -> float:
    return max(0.2, min(5.0, stale_after_s() / 6))


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_start(pid: int) -> int | None:
    """The start time of a process (clock ticks after boot, Linux), to tell a reused pid apart."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    text = _read(f"/proc/{pid}/stat")  # a killed process its parent has not reaped yet is a zombie
    return not (text and ")" in text and text.rsplit(")", 1)[1].split()[:1] == ["Z"])


def _identity() -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace()}


def describe(holder: dict) -> str:
    """'pid 123 on host h (user u), started 2026-12-02 10:00:00 (5 min ago): nic compress ...'"""
    if not holder:
        return "an unknown run (its lock file is empty or unreadable)"
    started = holder.get("started_unix")
    when = holder.get("started", "?")
    if isinstance(started, (int, float)):
        when += f" ({_ago(time.time() - started)} ago)"
    user = f" (user {holder['user']})" if holder.get("user") else ""
    stage = f"nic {holder['stage']}" if holder.get("stage") else "a nic run"
    return (f"{stage}, pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{user}, "
            f"started {when}, command: {holder.get('command') or '?'}")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def why_stale(holder: dict | None, age_s: float, stale_s: float | None = None) -> str | None:
    """Why a lock's holder is gone (the lock may be taken over), or None while it may be alive."""
    stale_s = stale_after_s() if stale_s is None else stale_s
    if not holder:
        if age_s > stale_s:
            return f"the lock file is unreadable and {age_s:.0f} s old (more than {stale_s:.0f} s)"
        return None
    me = _identity()
    if holder.get("host") == me["host"] and holder.get("boot_id") and me["boot_id"] \
            and holder.get("boot_id") != me["boot_id"]:
        return f"host {me['host']} has restarted since that run started"
    if holder.get("host") == me["host"] and holder.get("pid_ns") == me["pid_ns"]:
        pid = holder.get("pid")
        if pid == os.getpid():  # not among this process's locks (those nest): left by an earlier run
            return f"it was left by this process (pid {pid}) and is not held any more"
        if not isinstance(pid, int) or not _pid_alive(pid):
            return f"pid {pid} no longer runs on {me['host']}"
        start = holder.get("pid_start")
        if start is not None and _pid_start(pid) not in (None, start):
            return f"pid {pid} on {me['host']} is now another process"
        return None
    if age_s > stale_s:
        return f"its heartbeat is {age_s:.0f} s old (more than {stale_s:.0f} s) and it runs on another host"
    return None


def _load(path: Path) -> tuple[dict | None, float] | None:
    """(holder or None when unreadable, heartbeat age in s) of a lock file; None if there is none."""
    try:
        age = time.time() - path.stat().st_mtime
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return {}, 0.0
    try:  # only the parse: a lock cut short or overwritten with garbage is unreadable, not an error
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}, age
    return (holder if isinstance(holder, dict) else {}), age


class _Held:
    def __init__(self, path: Path, token: str) -> None:
        self.path = path
        self.token = token
        self.count = 1
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="nic-lock-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(heartbeat_s()):
            loaded = _load(self.path)
            holder = loaded[0] if loaded else None
            if not holder or holder.get("token") != self.token:
                root_logger().warning(f"nic: warning: the lock {self.path} was removed or taken by another run "
                                      f"({describe(holder or {}) if loaded else 'no lock file'}); another run "
                                      "may now write to this folder")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _create(path: Path, record: dict) -> bool:
    """Create the lock file with `record`; False if one exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        data = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return True


def _remove_stale(path: Path, holder: dict | None) -> None:
    """Remove the lock judged stale, unless another run replaced it meanwhile (then keep theirs)."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    moved = _load(aside)
    if moved and moved[0] and moved[0].get("token") != (holder or {}).get("token"):
        with contextlib.suppress(OSError):
            os.link(aside, path)  # a fresh lock of another run: put it back (never over a newer one)
    with contextlib.suppress(OSError):
        aside.unlink()


def acquire(folder: str | Path, stage: str = "") -> _Held:
    """Take the lock on `folder` (created if missing) or raise LockedError naming its holder."""
    from nic.storage import display

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    path = Path(key) / LOCK_NAME
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:  # this process holds it already: nest
            held.count += 1
            return held
        token = uuid.uuid4().hex
        record = {
            "token": token, **_identity(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "user": _user(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started_unix": time.time(),
            "stage": stage, "command": " ".join(sys.argv) or sys.executable, "folder": display(folder),
        }
        for _ in range(10):
            if _create(path, record):
                held = _Held(path, token)
                held.thread.start()
                _HELD[key] = held
                return held
            loaded = _load(path)
            if loaded is None:
                continue  # released meanwhile
            holder, age = loaded
            reason = why_stale(holder, age)
            if reason is None:
                raise LockedError(
                    f"{display(folder)} is in use by another run: {describe(holder or {})}; its lock "
                    f"{display(path)} was refreshed {age:.0f} s ago. Wait for that run to end or choose "
                    "another out folder. The lock of a run that died is taken over automatically: at once "
                    f"on the same host, after {stale_after_s():.0f} s without a heartbeat from another host "
                    "(or delete the lock file if you are sure that run is gone).")
            root_logger().warning(f"nic: taking over the lock on {display(folder)}: {reason} (it was held by "
                                  f"{describe(holder or {})})")
            _remove_stale(path, holder)
        raise LockedError(f"{display(folder)}: could not take the lock {display(path)} (other runs keep "
                          "taking it); try again")


def release(held: _Held) -> None:
    with _HELD_GUARD:
        held.count -= 1
        if held.count > 0:
            return
        _HELD.pop(os.path.realpath(held.path.parent), None)
    held.stop.set()
    if held.thread.is_alive():
        held.thread.join(timeout=10)
    loaded = _load(held.path)
    if loaded and loaded[0] and loaded[0].get("token") == held.token:
        with contextlib.suppress(OSError):
            held.path.unlink()


def _user() -> str | None:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no user name for this uid (containers)
        return None


@contextlib.contextmanager
def out_lock(folder: str | Path, stage: str = "") -> Iterator[Path]:
    """Hold the lock on an output folder for the block; yields the lock file's path. A folder that
    did not exist before and is still empty at the end is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    held = acquire(folder, stage)
    try:
        yield held.path
    finally:
        release(held)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
