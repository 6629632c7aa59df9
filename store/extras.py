"""Small auxiliary arrays kept with a feature store (e.g. MCAD's fused-to-dual alignment maps).

An extra is one named numpy array plus a JSON record (the caller's provenance, the dataset fingerprint, a
sha256 of the values). It lives in one `.npz` file, written atomically:
- zarr store (a directory):  PATH/_extras/<name>.npz   (inside the store, so copies and DVC carry it along;
  '_extras' cannot clash with a teacher, whose names start with a letter or digit)
- HDF5 store (a file):       PATH.extras/<name>.npz    (beside it: HDF5 allows one writer and is not crash-safe)
- zarr store on S3:          URL/_extras/<name>.npz    (an object, the same key as the local file; uploaded whole,
  read back and checked: store/s3_extras.py, which alone touches fsspec, so local extras never import it)
Extras are not shards: `dsmd store convert` does not copy them and `verify` does not look at them.
numpy only, like the rest of the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.errors import StoreCorruptError, StoreError
from store.fsutil import disk_full_as_store_error, fsync_dir, removed_on_error
from store.remote import StoreUrl, store_location

__all__ = ["Extra", "extras_dir", "put_extra", "get_extra", "has_extra", "list_extras"]

EXTRAS_FORMAT = "dsmd-store-extra"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class Extra:
    name: str
    value: np.ndarray
    provenance: dict
    record: dict  # everything stored beside the values: format, fingerprint, shape, dtype, sha256, provenance


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreError(
            f"extra name {name!r} is not usable: letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _s3():
    """store/s3_extras.py, imported for s3:// stores only: local extras never load fsspec."""
    from store import s3_extras

    return s3_extras


def _store_exists(path: Path) -> bool:
    return (path / "zarr.json").is_file() if path.is_dir() else path.is_file()


def extras_dir(store_path: str | Path) -> Path | StoreUrl:
    """Where the extras of the store at `store_path` live (see the module docstring)."""
    path = store_location(store_path)
    if isinstance(path, StoreUrl):
        return _s3().extras_url(path)
    if path.is_dir():
        return path / "_extras"
    return path.with_name(path.name + ".extras")


def _file(store_path: str | Path, name: str) -> Path | StoreUrl:
    return extras_dir(store_path) / f"{_check_name(name)}.npz"


def _sha256(values: np.ndarray) -> str:
    little = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return hashlib.sha256(little.tobytes()).hexdigest()


def put_extra(
    store_path: str | Path, name: str, value: np.ndarray, *, dataset_fingerprint: str, provenance: dict | None = None
) -> Path | StoreUrl:
    """Write (or replace) the extra `name` of the store at `store_path`; returns the file (or object) written."""
    path = store_location(store_path)
    if isinstance(path, StoreUrl):
        exists = _s3().store_exists(path)
    else:
        exists = _store_exists(path)
    if not exists:
        raise StoreError(f"{path}: no feature store there; run dsmd extract first, then add extras to it")
    value = np.asarray(value)
    if value.dtype.kind not in "fiub":
        raise StoreError(f"extra {name!r}: only numeric arrays can be stored, got dtype {value.dtype}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise StoreError(f"extra {name!r}: the array holds NaN or infinite values")
    record = {
        "format": EXTRAS_FORMAT,
        "name": name,
        "dataset_fingerprint": dataset_fingerprint,
        "shape": list(value.shape),
        "dtype": str(value.dtype),
        "sha256": _sha256(value),
        "provenance": provenance or {},
    }
    try:
        record_text = json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"provenance of extra {name!r} must be plain JSON data: {exc}") from None
    target = _file(path, name)

    def write(handle) -> None:
        np.savez(handle, value=value, record=np.array(record_text))

    if isinstance(target, StoreUrl):
        _s3().put(target, write)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with disk_full_as_store_error(target), removed_on_error(tmp):
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


def has_extra(store_path: str | Path, name: str) -> bool:
    target = _file(store_path, name)
    if isinstance(target, StoreUrl):
        return _s3().exists(target)
    return target.is_file()


def list_extras(store_path: str | Path) -> list[str]:
    directory = extras_dir(store_path)
    if isinstance(directory, StoreUrl):
        return _s3().names(directory)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.npz") if not p.name.startswith("."))


def get_extra(store_path: str | Path, name: str, *, dataset_fingerprint: str | None = None) -> Extra:
    """Read the extra `name`; StoreError when it is missing, damaged or made for another dataset."""
    target = _file(store_path, name)
    if isinstance(target, StoreUrl):
        body = _s3().read(target)
        source = None if body is None else io.BytesIO(body)
    else:
        source = target if target.is_file() else None
    if source is None:
        present = ", ".join(list_extras(store_path)) or "none"
        raise StoreError(f"{store_path}: no extra {name!r} in this store (present: {present})")
    remake = "make it again (`dsmd extract-pairs` refits damaged alignment maps)"
    try:
        with np.load(source, allow_pickle=False) as data:
            value = data["value"]
            record = json.loads(str(data["record"]))
        if not isinstance(record, dict):
            raise ValueError("its record is not a JSON object")
    except Exception as exc:  # a damaged zip or array fails in many ways (zlib, zipfile, numpy, json)
        raise StoreCorruptError(f"{target}: cannot read this store extra ({type(exc).__name__}: {exc}); "
                                f"{remake}") from None
    if record.get("format") != EXTRAS_FORMAT or record.get("sha256") != _sha256(value):
        raise StoreCorruptError(f"{target}: damaged store extra (format or checksum mismatch); {remake}")
    if dataset_fingerprint is not None and record.get("dataset_fingerprint") != dataset_fingerprint:
        raise StoreError(
            f"{target} was made for the dataset with fingerprint {record.get('dataset_fingerprint')}, not "
            f"{dataset_fingerprint}: make it again for this dataset"
        )
    return Extra(name=name, value=value, provenance=record.get("provenance", {}), record=record)
