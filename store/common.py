"""Facts every part of the store records or checks: timestamps, library versions, root attributes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from store.errors import StoreError
from store.layout import SCHEMA_VERSION, Layout

STORE_FORMAT = "dsmd-feature-store"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def library_versions() -> dict:
    try:
        dsmd_version = metadata.version("dsmd")
    except metadata.PackageNotFoundError:
        dsmd_version = "unknown"
    # zarr's version from its metadata, not an import: an HDF5 store is made where zarr is absent (the GPU image).
    try:
        zarr_version = metadata.version("zarr")
    except metadata.PackageNotFoundError:
        zarr_version = "not installed"
    return {"dsmd": dsmd_version, "numpy": np.__version__, "zarr": zarr_version, "h5py": h5py.__version__}


def json_data(value: dict, what: str) -> dict:
    """A JSON round trip: the form in which attributes come back from disk (tuples become lists)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be plain JSON data (str, int, float, bool, list, dict): {exc}") from None


def layout_from_root(root: dict, path: Path) -> Layout:
    if root.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: not a dsmd feature store (format {root.get('format')!r})")
    version = root.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {version} is not the version this dsmd reads ({SCHEMA_VERSION}); "
            "rerun dsmd extract into a new store"
        )
    return Layout(root["n_images"], root["n_captions"], root["rows_per_shard"], root["rows_per_chunk"])


def recorded_dataset_name(backend, root: dict) -> str:
    """The dataset's name as recorded: the store's own field, else the first array provenance naming it."""
    if root.get("dataset_name"):
        return root["dataset_name"]
    for teacher, kind in backend.list_arrays():
        provenance = (backend.read_array_attrs(teacher, kind) or {}).get("provenance") or {}
        dataset = provenance.get("dataset")
        if isinstance(dataset, dict) and dataset.get("name"):
            return str(dataset["name"])
    return ""
