"""One run at a time per checkpoint directory.

A run that saves into ``checkpoint.save`` holds ``<save>/.megarm.lock`` (JSON: host,
pid, the process's start time, when it was taken). A second run refuses to start,
naming the owner. A lock is stale, and taken over with a note, when its owner is
provably gone: on the same host the pid is dead or belongs to another process
(start time differs); from another host, when the owner has not refreshed it for
``stale_after_s`` (the holder touches it at every save and log line).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".megarm.lock"


class CheckpointLockedError(RuntimeError):
    """Another live run writes into this checkpoint directory."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: dict[str, Any]) -> bool:
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = owner.get("started")
    return started is None or _process_start(pid) in (None, started)


class RunLock:
    """The lock of one save directory (take with :meth:`acquire`, drop with :meth:`release`)."""

    def __init__(self, root: str | Path, stale_after_s: float = 1800.0) -> None:
        self.path = Path(root) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        """The current holder's record, or None."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, owner: dict[str, Any]) -> str | None:
        if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
            return "this process took it before"
        if owner.get("host") == socket.gethostname():
            return None if _alive(owner) else f"pid {owner.get('pid')} is no longer running"
        age = time.time() - self.path.stat().st_mtime
        if age > self.stale_after_s:
            return f"not refreshed for {age / 60:.0f} min"
        return None

    def acquire(self) -> str | None:
        """Take the lock (or raise :class:`CheckpointLockedError`); returns a note when
        a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner() or {}
                reason = self._stale(owner) if owner else "unreadable"
                if reason is None:
                    raise CheckpointLockedError(
                        f"{self.path.parent} is being written by another run (host "
                        f"{owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since')}); "
                        "two runs would overwrite each other's checkpoints. Stop that run, or save "
                        f"elsewhere (checkpoint.save); if it is gone, delete {self.path}"
                    ) from None
                note = f"took over the stale lock {self.path} ({reason})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return note
        raise CheckpointLockedError(f"could not take {self.path}: another run keeps taking it")

    def refresh(self) -> None:
        """Mark the lock as still held (its modification time)."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Drop the lock if this process holds it."""
        if self.held and (self.owner() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
