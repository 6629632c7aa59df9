"""Choosing a backend for a path: what is already there wins, else the suffix (.h5/.hdf5 -> HDF5, else zarr)."""

from __future__ import annotations

from pathlib import Path

from store.errors import StoreError
from store.hdf5_backend import Hdf5Backend
from store.zarr_backend import ZarrBackend

BACKENDS = ("zarr", "hdf5")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

Backend = ZarrBackend | Hdf5Backend


def detect_backend(path: Path, backend: str = "auto") -> str:
    if backend not in ("auto", *BACKENDS):
        raise StoreError(f"unknown store backend {backend!r}: use zarr, hdf5 or auto")
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


def open_backend(path: Path, backend: str, *, writable: bool) -> Backend:
    kind = detect_backend(path, backend)
    if not writable and not path.exists():
        raise StoreError(f"{path}: no feature store there; run dsmd extract to make it (or check extract.store)")
    return ZarrBackend(path, writable=writable) if kind == "zarr" else Hdf5Backend(path, writable=writable)
