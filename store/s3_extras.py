"""The objects behind the extras (store/extras.py) of a zarr store on S3: ``<store>/_extras/<name>.npz``, the
same key as the file a local zarr store keeps, so a store copied between disk and bucket keeps its extras.

An extra is written like a shard (store/s3_backend.py): its bytes go to a local temporary file, are uploaded as
one object (one PUT at the sizes extras have; s3fs sends an object over 100 MiB in parts, which S3 also shows
whole or not at all), then read back and compared by sha256 with the file. A writer killed midway leaves the
previous object or none. What the bytes mean is store/extras.py's business; this module only moves them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from store.errors import StoreError
from store.remote import StoreUrl, checked_filesystem, remote_errors
from store.zarr_backend import EXTRAS_DIR


def extras_url(store: StoreUrl) -> StoreUrl:
    return store / EXTRAS_DIR


def store_exists(store: StoreUrl) -> bool:
    fs = checked_filesystem(store)
    with remote_errors(store):
        return fs.exists(f"{store.key}/zarr.json")


def put(target: StoreUrl, write: Callable[[BinaryIO], None]) -> None:
    """Upload what `write(handle)` writes as the object `target`, checked by reading it back."""
    fs = checked_filesystem(target)
    handle, tmp = tempfile.mkstemp(prefix=".dsmd-extra-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        digest = hashlib.sha256()
        with open(tmp, "rb") as written:
            while block := written.read(1 << 22):
                digest.update(block)
        with remote_errors(target):
            fs.put_file(tmp, target.key)
            stored = hashlib.sha256(fs.cat_file(target.key)).hexdigest()
        if stored != digest.hexdigest():
            with contextlib.suppress(Exception):  # best effort: the error below is the news, not a failed delete
                fs.rm_file(target.key)  # leave no object that differs from what was written
            raise StoreError(f"{target}: the uploaded extra reads back with sha256 {stored[:12]}, not the "
                             f"{digest.hexdigest()[:12]} written; check the object store, then write it again")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read(target: StoreUrl) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    fs = checked_filesystem(target)
    with remote_errors(target):
        try:
            return fs.cat_file(target.key)
        except FileNotFoundError:
            return None


def exists(target: StoreUrl) -> bool:
    fs = checked_filesystem(target)
    with remote_errors(target):
        return fs.isfile(target.key)


def names(directory: StoreUrl) -> list[str]:
    """The names of the extras under `directory` (an extras_url), sorted."""
    fs = checked_filesystem(directory)
    with remote_errors(directory):
        found = fs.glob(f"{directory.key}/*.npz")
    return sorted(key.rsplit("/", 1)[-1].removesuffix(".npz") for key in found
                  if not key.rsplit("/", 1)[-1].startswith("."))
