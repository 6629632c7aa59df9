"""Choosing a backend for a path (what is already there wins, else the suffix: .h5/.hdf5 -> HDF5, else zarr),
holding a store for one writing command, and deleting a store (and nothing else).

The zarr backend is imported only where a zarr store is used, so that HDF5 stores work where zarr is not
installed (the GPU image the acceptance run uses has h5py but no zarr).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Union

from store.errors import StoreError
from store.fsutil import WriterLease
from store.hdf5_backend import Hdf5Backend
from store.remote import ShardCache, StoreUrl, store_location

if TYPE_CHECKING:
    from store.s3_lease import S3WriterLease
    from store.zarr_backend import ZarrBackend

BACKENDS = ("zarr", "hdf5")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# Union, not "X | Y": ZarrBackend is only a name here (imported for type checkers alone).
Backend = Union["ZarrBackend", Hdf5Backend]


def detect_backend(path: Path | StoreUrl, backend: str = "auto") -> str:
    if backend not in ("auto", *BACKENDS):
        raise StoreError(f"unknown store backend {backend!r}: use zarr, hdf5 or auto")
    if isinstance(path, StoreUrl):
        if backend == "hdf5" or path.suffix.lower() in HDF5_SUFFIXES:
            raise StoreError(f"{path}: HDF5 stores cannot live on object storage; use the zarr backend there "
                             "(extract.backend=zarr and a store URL without .h5), or a local path for HDF5")
        return "zarr"
    found = _existing_backend(path)
    if found is not None:
        if backend not in ("auto", found):
            raise StoreError(f"{path} is an existing {found} store, not {backend}: use backend {found} or another path")
        return found
    if backend != "auto":
        return backend
    return "hdf5" if path.suffix.lower() in HDF5_SUFFIXES else "zarr"


def _existing_backend(path: Path) -> str | None:
    if path.is_dir():
        return "zarr"
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head == _HDF5_SIGNATURE:
            return "hdf5"
        if not head:
            return None
        raise StoreError(f"{path} exists but is neither a zarr store (a directory) nor an HDF5 file")
    return None


def open_backend(path: Path | StoreUrl, backend: str, *, writable: bool, cache: ShardCache | None = None) -> Backend:
    kind = detect_backend(path, backend)
    if isinstance(path, StoreUrl):
        from store.s3_backend import S3ZarrBackend

        remote = S3ZarrBackend(path, writable=writable, cache=cache)
        if not writable and not remote.exists():
            raise StoreError(f"{path}: no feature store there; run dsmd extract to make it (or check extract.store)")
        return remote
    if not writable and not path.exists():
        raise StoreError(f"{path}: no feature store there; run dsmd extract to make it (or check extract.store)")
    if kind == "hdf5":
        return Hdf5Backend(path, writable=writable)
    from store.zarr_backend import ZarrBackend

    return ZarrBackend(path, writable=writable)


@contextlib.contextmanager
def writer_lease(path: Path, command: str) -> Iterator[S3WriterLease | None]:
    """Hold the store at `path` (existing or about to be made) for one writing `command`, e.g. "dsmd extract":
    a second command gets StoreBusyError naming the first. Processes the holder starts (Dask workers) write
    without it. HDF5 needs no lease: its one writer locks the file. An S3 store's lease is an object created
    only if absent and renewed by its holder (store/s3_lease.py); it can be lost (a holder paused past its
    stale time), so it is yielded: pass it to FeatureStore.create_or_open(lease=) and its `fence` to the
    processes the holder starts, and they stop before marking shards once it is lost. A local lease (a flock)
    is held until its process ends, so None is yielded for local stores."""
    path = store_location(path)
    if isinstance(path, StoreUrl):
        from store.s3_lease import s3_writer_lease

        with s3_writer_lease(path, command) as lease:
            yield lease
        return
    if detect_backend(path) == "hdf5":
        yield None
        return
    from store.zarr_backend import LEASE_FILE, LOCK_FILES, refuse_foreign_folder

    refuse_foreign_folder(path)
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with WriterLease(path / LEASE_FILE, command, path):
            yield None
    finally:
        if not (path / "zarr.json").exists():
            # The command failed before making the store: leave no lock files (and no directory) behind.
            for name in LOCK_FILES:
                with contextlib.suppress(OSError):
                    (path / name).unlink()
            if made:
                with contextlib.suppress(OSError):
                    path.rmdir()


def store_exists(path: str | Path) -> bool:
    """Whether a dsmd store (its root metadata at least) is at the path or URL."""
    path = store_location(path)
    if isinstance(path, StoreUrl):
        from store.s3_backend import S3ZarrBackend

        return S3ZarrBackend(path, writable=False).exists()
    return path.exists()


def delete_store(path: Path) -> None:
    """Delete the dsmd store at `path` (an HDF5 store's extras beside it too). Anything that is not a dsmd store,
    or a store directory holding foreign files, is refused by name and left alone. A held writer lease file
    stays, so that the command holding it keeps the store while it rebuilds it."""
    path = store_location(path)
    if isinstance(path, StoreUrl):
        from store.s3_backend import S3ZarrBackend

        remote = S3ZarrBackend(path, writable=True)
        if remote.exists():
            remote.read_root()  # refuses a zarr group that is not a dsmd store
            remote.delete()
        return
    if path.is_dir():
        from store.zarr_backend import LEASE_FILE, folder_problem

        problem = folder_problem(path, strict=True)
        if problem:
            raise StoreError(f"{problem}: not deleting it; move those files away or point the store elsewhere")
        for entry in path.iterdir():
            if entry.name == LEASE_FILE:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return
    if not path.exists():
        return
    if _existing_backend(path) != "hdf5":
        raise StoreError(f"{path} is not a dsmd feature store: not deleting it")
    backend = Hdf5Backend(path, writable=False)
    try:
        if backend.read_root() is None:
            raise StoreError(f"{path} is an HDF5 file but not a dsmd feature store: not deleting it")
    finally:
        backend.close()
    path.unlink()
    extras = path.with_name(path.name + ".extras")
    if extras.is_dir():
        shutil.rmtree(extras)
