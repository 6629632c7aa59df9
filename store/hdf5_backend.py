"""HDF5 backend: the same logical schema in one file, for export and single-writer use.

In the file:
    attrs["dsmd_store"]                     store-wide facts (JSON text)
    /<teacher>/<kind>                       dataset (rows, D), contiguous, uncompressed, allocated at creation;
                                            attrs["dsmd_array"] = provenance (JSON text)
    /_dsmd_marks/<teacher>/<kind>/shard-<shard:06d>   completion mark (JSON text, scalar)

One process writes (HDF5 locks the file; PyPI's h5py has no parallel HDF5). HDF5 is not crash-safe: a writer
killed mid-write can leave the file unreadable, so the zarr backend is the one for long extractions.
Contiguous uncompressed datasets let readers map the rows straight from the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from store.errors import StoreCorruptError, StoreError, corrupt_shard
from store.layout import KINDS, Layout
from store.marks import ShardMark, collect_marks

ROOT_KEY = "dsmd_store"
ARRAY_KEY = "dsmd_array"
MARKS_GROUP = "_dsmd_marks"


class Hdf5Backend:
    name = "hdf5"

    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self._handle: h5py.File | None = None
        if writable:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = _open(path, "a")

    @contextlib.contextmanager
    def _file(self) -> Iterator[h5py.File]:
        """The writer keeps its handle; a reader opens the file only while it reads metadata."""
        if self._handle is not None:
            yield self._handle
            return
        handle = _open(self.path, "r")
        try:
            yield handle
        finally:
            handle.close()

    # -- store-wide metadata ------------------------------------------------------------------------
    @contextlib.contextmanager
    def metadata_lock(self) -> Iterator[None]:
        yield  # the writer's open handle already excludes every other process

    def read_root(self) -> dict | None:
        with self._file() as handle:
            if ROOT_KEY not in handle.attrs:
                if len(handle.keys()) or len(handle.attrs):
                    raise StoreError(f"{self.path} is an HDF5 file but not a dsmd feature store")
                return None
            return json.loads(handle.attrs[ROOT_KEY])

    def create_root(self, attrs: dict) -> None:
        with self._file() as handle:
            handle.attrs[ROOT_KEY] = json.dumps(attrs)
            handle.flush()

    def list_arrays(self) -> list[tuple[str, str]]:
        found = []
        with self._file() as handle:
            for teacher in sorted(handle.keys()):
                if teacher == MARKS_GROUP or not isinstance(handle[teacher], h5py.Group):
                    continue
                found.extend((teacher, kind) for kind in KINDS if kind in handle[teacher])
        return found

    def read_array_attrs(self, teacher: str, kind: str) -> dict | None:
        with self._file() as handle:
            name = f"{teacher}/{kind}"
            if name not in handle:
                return None
            text = handle[name].attrs.get(ARRAY_KEY)
            return None if text is None else json.loads(text)

    def create_array(self, teacher: str, kind: str, rows: int, dim: int, dtype: str, layout: Layout, attrs: dict):
        with self._file() as handle:
            if f"{teacher}/{kind}" in handle:  # made by a run that failed before the attributes (e.g. disk full)
                del handle[f"{teacher}/{kind}"]
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            # Allocated and zero-filled now, so the rows sit at a fixed place in the file from the start.
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
            dataset = handle.create_dataset(
                f"{teacher}/{kind}", shape=(rows, dim), dtype=np.dtype(dtype).newbyteorder("<"),
                fillvalue=0, dcpl=dcpl, track_times=False,
            )
            dataset.attrs[ARRAY_KEY] = json.dumps(attrs)
            handle.require_group(f"{MARKS_GROUP}/{teacher}/{kind}")
            handle.flush()

    # -- shards -------------------------------------------------------------------------------------
    def shard_lock(self, teacher: str, kind: str, shard: int):
        return contextlib.nullcontext()

    def clear_shard(self, teacher: str, kind: str, shard: int) -> None:
        with self._file() as handle:
            name = _mark_name(teacher, kind, shard)
            if name in handle:
                del handle[name]
                self._sync(handle)

    def write_rows(self, teacher: str, kind: str, shard: int, start: int, stop: int, data: np.ndarray) -> dict:
        with self._file() as handle:
            handle[f"{teacher}/{kind}"][start:stop] = data
            self._sync(handle)
        return {}

    def write_mark(self, mark: ShardMark) -> None:
        with self._file() as handle:
            name = _mark_name(mark.teacher, mark.kind, mark.shard)
            if name in handle:
                del handle[name]
            handle.create_dataset(name, data=mark.to_json(), dtype=h5py.string_dtype())
            self._sync(handle)

    def read_mark(self, teacher: str, kind: str, shard: int) -> ShardMark | None:
        with self._file() as handle:
            name = _mark_name(teacher, kind, shard)
            if name not in handle:
                return None
            return self._mark(handle[name], f"{self.path}:{name}")

    def read_marks(self, teacher: str, kind: str, unreadable: dict[int, str] | None = None) -> dict[int, ShardMark]:
        """Shard -> mark; see ZarrBackend.read_marks."""
        with self._file() as handle:
            group = handle.get(f"{MARKS_GROUP}/{teacher}/{kind}")
            names = sorted(group.keys()) if group is not None else []
            return collect_marks(((name, lambda name=name: self._mark(group[name], f"{self.path}:{group.name}/{name}"))
                                  for name in names), unreadable)

    def _mark(self, dataset: h5py.Dataset, where: str) -> ShardMark:
        try:
            text = dataset[()].decode("utf-8", errors="replace")
        except (OSError, AttributeError, ValueError) as exc:
            text = f"<unreadable: {exc}>"
        return ShardMark.from_json(text, where, str(self.path))

    @staticmethod
    def _sync(handle: h5py.File) -> None:
        handle.flush()
        os.fsync(handle.id.get_vfd_handle())

    # -- reading ------------------------------------------------------------------------------------
    def full_view(self, teacher: str, kind: str) -> np.ndarray | None:
        """The whole dataset as a read-only memory map of the file (contiguous, uncompressed, allocated);
        None when the dataset is stored otherwise (e.g. a file written by another tool)."""
        with self._file() as handle:
            dataset = handle[f"{teacher}/{kind}"]
            offset = dataset.id.get_offset()
            if offset is None or dataset.chunks is not None or dataset.compression is not None:
                return None
            dtype, shape = dataset.dtype, dataset.shape
        if dtype.byteorder == ">":
            return None
        size = self.path.stat().st_size
        if offset + int(np.prod(shape)) * dtype.itemsize > size:
            raise corrupt_shard(self.path, self.path, f"{teacher}/{kind}", 0, shape[0],
                                f"file is {size} bytes, too short for the array's rows (truncated)")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def shard_view(
        self, teacher: str, kind: str, shard: int, start: int, stop: int, mark: ShardMark | None = None
    ) -> np.ndarray:
        full = self.full_view(teacher, kind)
        if full is not None:
            return full[start:stop]
        try:
            with self._file() as handle:
                return handle[f"{teacher}/{kind}"][start:stop]
        except (OSError, RuntimeError, ValueError) as exc:  # h5py's errors for a damaged file
            raise corrupt_shard(self.path, self.path, f"{teacher}/{kind}", start, stop,
                                f"cannot read the rows ({type(exc).__name__}: {exc})") from None

    def shard_path(self, teacher: str, kind: str, shard: int) -> Path:
        return self.path  # one file holds every shard

    def size_on_disk(self) -> int:
        return self.path.stat().st_size

    def delete(self) -> None:
        self.close()
        self.path.unlink()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _mark_name(teacher: str, kind: str, shard: int) -> str:
    return f"{MARKS_GROUP}/{teacher}/{kind}/shard-{shard:06d}"


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode, track_order=False)
    except (OSError, BlockingIOError) as exc:
        text = str(exc)
        # "unable to lock file", not any "lock": a truncated file's message says "sblock->base_addr".
        if "unable to lock" in text.lower() or isinstance(exc, BlockingIOError):
            raise StoreError(
                f"{path}: the HDF5 store is open for writing in another process (e.g. another `dsmd extract` or "
                "`dsmd store convert`; HDF5 allows one writer and no reader while it writes); wait for it to "
                "finish, or use the zarr backend for several writers"
            ) from None
        if "already open for write" in text or "file signature not found" in text or "truncated" in text:
            raise StoreCorruptError(
                f"{path}: not a readable HDF5 file ({text}); an HDF5 store cannot be repaired in place: delete it "
                "and make it again (dsmd store convert from the zarr store, or dsmd extract), or use the zarr "
                "backend, which resumes after a crash"
            ) from None
        if mode == "r" and not path.exists():
            raise StoreError(f"{path}: no such feature store; run dsmd extract first") from None
        raise StoreError(f"{path}: cannot open the HDF5 store ({text})") from None
