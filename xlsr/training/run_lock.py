"""One run per ``output_dir``: ``output_dir/.lock`` names the run that writes there.

The lock is a JSON file ``{"host", "pid", "started", "command", "token"}`` created by rank 0 when a run starts
(``O_EXCL``: of two runs starting together, one gets it) and removed when the run ends, also on an error. A second
run into the same folder stops with an error naming the first (host, pid, start time, command) instead of
overwriting its checkpoints. A lock left by a run that is gone is taken over with a warning: on the same host, a pid
that no longer exists (or this process's own pid: an earlier run of this process, or of a restarted container);
a lock that cannot be read. On another host the pid cannot be checked: the lock counts as live, and the message says
to delete it if that run is gone.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger("xlsr.training")

LOCK_NAME = ".lock"

_held: dict[Path, str] = {}  # lock file -> token, for the locks this process holds


class OutputDirLockedError(ValueError):
    """Another live run holds the output folder's lock; the message names it."""


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's record; None when it cannot be read (half-written or damaged)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or not record.get("host"):
        return None
    return record


def describe(record: dict[str, Any]) -> str:
    """``pid 123 on host gpu7 (started ..., command ...)``."""
    return (f"pid {record['pid']} on host {record['host']} (started {record.get('started', '?')}, command: "
            f"{record.get('command', '?')})")


def acquire(output_dir: str | os.PathLike, command: str | None = None) -> Path:
    """Take ``output_dir/.lock`` for this process (the folder is created if needed); returns the lock's path.

    Raises:
        OutputDirLockedError: a live run holds it (named in the message, with the lock file to delete if that run
            is in fact gone).
    """
    path = Path(os.path.abspath(output_dir)) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    token = uuid.uuid4().hex
    record = {
        "host": host,
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join([sys.executable, *sys.argv]),
        "token": token,
    }
    for _ in range(3):  # a stale lock removed, then created again: another run may win the race in between
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _remove_stale(path, _read_lock(path), host)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if not _held:
            atexit.register(release_all)  # a run that never reaches its end (no process group: a normal exit)
        _held[path] = token
        return path
    raise OutputDirLockedError(f"{path}: could not take the lock (other runs keep taking it)")


def _remove_stale(path: Path, holder: dict[str, Any] | None, host: str) -> None:
    """Remove a lock whose run is gone (with a warning; silently when this process took it); raise for a live one."""
    if holder is None:
        logger.warning("%s: an unreadable lock file: taken over", path)
    elif holder["host"] == host and holder["pid"] == os.getpid():
        if _held.get(path) != holder.get("token"):
            logger.warning("%s: a lock of this process's pid (%s), not taken by it: a run that is gone, taken over",
                           path, describe(holder))
    elif holder["host"] == host and not _pid_alive(holder["pid"]):
        logger.warning("%s: the run that held this folder is gone (%s): lock taken over", path, describe(holder))
    else:
        where = "" if holder["host"] == host else ", which cannot be checked from this host"
        raise OutputDirLockedError(
            f"{path.parent} is in use by another run: {describe(holder)}{where}. Use another output_dir, or wait for "
            f"that run to end; if it is gone, delete {path}"
        )
    path.unlink(missing_ok=True)
    _held.pop(path, None)


def release(path: Path) -> None:
    """Remove the lock ``path`` if this process holds it (a lock another run took meanwhile is left alone)."""
    token = _held.pop(path, None)
    if token is not None and (holder := _read_lock(path)) is not None and holder.get("token") == token:
        path.unlink(missing_ok=True)


def release_all() -> None:
    """Remove every lock this process holds (the end of a command, also on an error)."""
    for path in list(_held):
        release(path)
