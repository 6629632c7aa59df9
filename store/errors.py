"""Errors of the feature store. The store stands alone (numpy, zarr, h5py), so it has its own error type."""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """A store problem the user can act on: wrong dataset, teacher or dimension, missing or corrupt shard."""


class StoreMismatchError(StoreError):
    """The store at the path was made for another dataset, layout or teacher setup than the one asked for."""


class StoreCorruptError(StoreError):
    """A finished shard (or other store file) no longer holds what was written: truncated, changed or unreadable.

    `reason` is the bare finding (e.g. "is 1000 bytes, but 4096 were written"), for reports that name the shard
    themselves."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class StoreDiskFullError(StoreError):
    """The disk (or quota) filled up while writing; what was half written has been removed."""


class StoreBusyError(StoreError):
    """Another command is writing the store right now."""


def repair_hint(store: str | Path, kind: str | None = None) -> str:
    """The fix for damaged shards, in command-line terms."""
    redo = "`dsmd extract --repair` (then `dsmd extract-pairs` for pair shards)" if kind == "pair" else (
        "`dsmd extract --repair`"
    )
    return f"run `dsmd store verify {store}` to list the damaged shards, then {redo} to redo exactly those"


def disk_full_message(path: str | Path) -> str:
    return f"no space left on device writing {path}; free space and rerun: finished shards are kept"


def corrupt_shard(
    store: str | Path, file: str | Path, name: str, start: int, stop: int, reason: str
) -> StoreCorruptError:
    """The one-line error for a damaged shard: its file, its array and rows, what is wrong, and the fix."""
    kind = name.rsplit("/", 1)[-1]
    return StoreCorruptError(f"{file}: {name} rows {start}..{stop - 1}: {reason}; {repair_hint(store, kind)}", reason)
