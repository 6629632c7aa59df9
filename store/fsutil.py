"""File helpers for crash-safe writes: durable files, atomic replacement, and inter-process locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from store.errors import StoreBusyError, StoreDiskFullError, StoreError, disk_full_message

_BLOCK = 1 << 22
_LIBRARY_ERRORS = (OSError, RuntimeError, ValueError)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new, renamed or deleted file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers and a later crash see either nothing or the whole file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_full_as_store_error(path), removed_on_error(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, also when a library only says so in its message (h5py raises ValueError or OSError
    with HDF5's "errno = 28, error message = 'No space left on device'")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return isinstance(exc, _LIBRARY_ERRORS) and ("no space left on device" in text or "disk quota exceeded" in text)


@contextlib.contextmanager
def disk_full_as_store_error(path: Path) -> Iterator[None]:
    """A full disk while writing `path` becomes one line naming it (StoreDiskFullError), not a traceback."""
    try:
        yield
    except _LIBRARY_ERRORS as exc:
        if is_disk_full(exc):
            raise StoreDiskFullError(disk_full_message(path)) from None
        raise


@contextlib.contextmanager
def removed_on_error(path: Path) -> Iterator[None]:
    """Delete the (temporary) file `path` if the block fails: no half-written files are left behind."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def remove_durably(path: Path) -> bool:
    """Delete a file if present and make the deletion durable; True when something was removed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def sync_and_hash(path: Path, sync: bool = True) -> tuple[str, int]:
    """sha256 and size of a file, fsync'ing it first so that the hash describes what is on disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        while block := handle.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class RangeLock:
    """POSIX record locks on the bytes of one lock file: byte i guards item i (a shard), across processes.

    Locks belong to the process and vanish when it dies, so a killed writer never leaves a stale lock.
    The file stays open for the object's lifetime: closing any descriptor of it would drop every lock this
    process holds on it (a POSIX rule).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def hold(self, index: int, *, wait: bool, what: str) -> Iterator[None]:
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.lockf(self._fd, flags, 1, index, os.SEEK_SET)
        except (BlockingIOError, PermissionError):
            raise StoreError(
                f"{what} is being written by another process right now: give each writer its own shards"
            ) from None
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, index, os.SEEK_SET)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class WriterLease:
    """One writing command per store at a time: an flock on `path`, which names the holder while held.

    flock (not lockf) so that no other descriptor of the file, opened and closed elsewhere in this process, can
    drop the lock; the kernel releases it when the holder dies, so a killed command never blocks the next one.
    The holder's command, pid and host are written into the file for the message the next command gets.
    """

    def __init__(self, path: Path, command: str, store: Path) -> None:
        self.path, self.command, self.store = path, command, store
        self._fd = -1

    def __enter__(self) -> WriterLease:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            raise StoreBusyError(self._busy_message()) from None
        holder = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(UTC).isoformat(timespec="seconds")}
        with contextlib.suppress(OSError):  # the note is for messages only; a full disk must not stop here
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = -1

    def _busy_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            who = f"`{holder['command']}`"
            where = f" (pid {holder['pid']} on host {holder['host']}, since {holder['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            who, where = "dsmd command", ""  # the holder has not written its note yet
        return (
            f"another {who} is running on {self.store}{where}; wait for it to finish (or stop it), then run "
            f"`{self.command}` again: the shards it finished are kept"
        )
