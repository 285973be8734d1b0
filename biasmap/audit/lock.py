"""One writer per run folder: an exclusive lock held for the whole of `run_audit`.

    with RunLock(run_dir) as lock:      # RunLockedError naming the holder's pid and host
        ...                             # lock.stale: the record of a dead holder taken over

The lock is `<run>/audit.lock`, locked with `fcntl.flock` and holding the holder's pid, host and
start time as JSON. The kernel releases a flock when its process dies, however it dies, so a lock
left by a killed run is free for the next one (the JSON it left names a dead process and is
reported as taken over), and two starters can never both win: there is no window between
"check the holder is dead" and "take over" for a third process to slip through. The file itself
is never deleted (deleting a locked path lets a later starter lock a new file while an older one
still holds the unlinked one); releasing empties it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "audit.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """The exclusive writer lock of a run folder (see the module docstring).

    acquire() raises RunLockedError naming the holder; `stale` is then the record (pid, host,
    started) of a dead holder whose lock this one took over, or None.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError; returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another audit ({describe_holder(holder)}); "
                "wait for it to finish or stop it, then rerun"
            ) from None
        previous = _read_record(fd)
        self.stale = previous or None  # a record left under a free lock: its writer died
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the record and unlock (the file stays; see the module docstring)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        record = {}
    return record if isinstance(record, dict) else {}


def describe_holder(record: dict) -> str:
    """'pid 123 on host x since 2026-01-01 10:00:00' from a lock record (what is known of it)."""
    if not record:
        return "holder not recorded yet"
    text = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
    started = record.get("started")
    if isinstance(started, int | float):
        text += f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
    return text
