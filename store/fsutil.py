"""File helpers for crash-safe writes: durable files, atomic replacement, and inter-process locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from store.errors import StoreError

_BLOCK = 1 << 22


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
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
