"""Zarr v3 backend: one sharded array per (teacher, kind), one file per shard, one JSON mark per shard.

On disk (PATH is a directory):
    PATH/zarr.json                         root group; attributes["dsmd_store"] = store-wide facts
    PATH/.dsmd.lock                        lock file (creation, ensure_array)
    PATH/.dsmd-writer.lock                 held by the one writing command (dsmd extract, store convert)
    PATH/<teacher>/<kind>/zarr.json        array (rows, D); attributes["dsmd_array"] = provenance
    PATH/<teacher>/<kind>/c/<shard>/0      shard file: inner chunks of rows_per_chunk rows, then the index
    PATH/<teacher>/<kind>/marks/shard-<shard:06d>.json   completion mark (ShardMark)
    PATH/<teacher>/<kind>/marks/.lock      byte i locked while shard i is being written

Arrays are uncompressed (embeddings do not compress), so a finished shard file holds its rows as plain
little-endian bytes at offsets listed in the shard index (zarr v3 sharding spec); readers map those bytes
directly instead of decoding chunk by chunk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
import zarr.storage

from store.errors import StoreCorruptError, StoreError, corrupt_shard
from store.fsutil import RangeLock, atomic_write_text, fsync_dir, remove_durably, sync_and_hash
from store.layout import KINDS, Layout
from store.marks import ShardMark, collect_marks

ROOT_KEY = "dsmd_store"
ARRAY_KEY = "dsmd_array"
LEASE_FILE = ".dsmd-writer.lock"
LOCK_FILES = frozenset({".dsmd.lock", LEASE_FILE})
EXTRAS_DIR = "_extras"  # see store/extras.py
_WRITE_CONFIG = {"write_empty_chunks": True}  # every shard file exists, even for all-zero (skipped) rows
_EMPTY = np.uint64(2**64 - 1)


class ZarrBackend:
    name = "zarr"

    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        if writable:
            refuse_foreign_folder(path)  # before any lock file is made in someone else's directory
            path.mkdir(parents=True, exist_ok=True)
        self._store = zarr.storage.LocalStore(str(path), read_only=not writable)
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._shard_locks: dict[tuple[str, str], RangeLock] = {}
        self._meta_lock: RangeLock | None = None

    # -- store-wide metadata ------------------------------------------------------------------------
    @contextlib.contextmanager
    def metadata_lock(self) -> Iterator[None]:
        """Serialise creation across processes, so create-or-open races resolve to one winner."""
        if self._meta_lock is None:
            self._meta_lock = RangeLock(self.path / ".dsmd.lock")
        with self._meta_lock.hold(0, wait=True, what=f"{self.path} metadata"):
            yield

    def read_root(self) -> dict | None:
        if not (self.path / "zarr.json").is_file():
            return None
        try:
            group = zarr.open_group(store=self._store, mode="r")
        except Exception as exc:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{self.path}: cannot read the zarr root metadata ({exc})") from None
        attrs = group.attrs.asdict()
        if ROOT_KEY not in attrs:
            raise StoreError(f"{self.path} is a zarr group but not a dsmd feature store (no {ROOT_KEY} attributes)")
        return attrs[ROOT_KEY]

    def create_root(self, attrs: dict) -> None:
        others = [p.name for p in self.path.iterdir() if p.name not in LOCK_FILES]
        if others:
            raise StoreError(
                f"{self.path} exists and holds {', '.join(sorted(others)[:5])} but no feature store: "
                "choose an empty or new directory for extract.store"
            )
        zarr.create_group(store=self._store, attributes={ROOT_KEY: attrs})
        fsync_dir(self.path)

    def list_arrays(self) -> list[tuple[str, str]]:
        found = []
        for teacher_dir in sorted(p for p in self.path.iterdir() if p.is_dir()):
            for kind in KINDS:
                if (teacher_dir / kind / "zarr.json").is_file():
                    found.append((teacher_dir.name, kind))
        return found

    def read_array_attrs(self, teacher: str, kind: str) -> dict | None:
        if not (self.path / teacher / kind / "zarr.json").is_file():
            return None
        return self._array(teacher, kind).attrs.asdict().get(ARRAY_KEY)

    def create_array(self, teacher: str, kind: str, rows: int, dim: int, dtype: str, layout: Layout, attrs: dict):
        zarr.create_array(
            store=self._store,
            name=f"{teacher}/{kind}",
            shape=(rows, dim),
            chunks=(layout.rows_per_chunk, dim),
            shards=(layout.rows_per_shard, dim),
            dtype=dtype,
            fill_value=0,
            compressors=None,
            filters=None,
            chunk_key_encoding={"name": "default", "separator": "/"},
            attributes={ARRAY_KEY: attrs},
            config=_WRITE_CONFIG,
        )
        (self.path / teacher / kind / "marks").mkdir(exist_ok=True)
        fsync_dir(self.path / teacher)
        fsync_dir(self.path / teacher / kind)

    def _array(self, teacher: str, kind: str) -> zarr.Array:
        key = (teacher, kind)
        if key not in self._arrays:
            mode = "r+" if self.writable else "r"
            try:
                array = zarr.open_array(store=self._store, path=f"{teacher}/{kind}", mode=mode)
            except Exception as exc:  # zarr raises several types for unreadable metadata
                where = self.path / teacher / kind / "zarr.json"
                raise StoreCorruptError(
                    f"{where}: cannot read the array metadata of {teacher}/{kind} ({type(exc).__name__}: {exc}); "
                    f"the array cannot be repaired shard by shard: delete {self.path / teacher / kind} and rerun "
                    "dsmd extract"
                ) from None
            # open_array ignores its config argument (zarr 3.1): set it on the opened array, or zarr drops the
            # file of an all-zero shard (every row skipped) and the write cannot be checked.
            self._arrays[key] = array.with_config(_WRITE_CONFIG)
        return self._arrays[key]

    # -- shards -------------------------------------------------------------------------------------
    def shard_file(self, teacher: str, kind: str, shard: int) -> Path:
        key = self._array(teacher, kind).metadata.encode_chunk_key((shard, 0))
        return self.path / teacher / kind / key

    shard_path = shard_file  # the file that holds a shard's rows, in both backends

    def _mark_file(self, teacher: str, kind: str, shard: int) -> Path:
        return self.path / teacher / kind / "marks" / f"shard-{shard:06d}.json"

    def shard_lock(self, teacher: str, kind: str, shard: int):
        key = (teacher, kind)
        if key not in self._shard_locks:
            self._shard_locks[key] = RangeLock(self.path / teacher / kind / "marks" / ".lock")
        return self._shard_locks[key].hold(shard, wait=False, what=f"shard {shard} of {teacher}/{kind}")

    def clear_shard(self, teacher: str, kind: str, shard: int) -> None:
        """Forget a shard before (re)writing it: the mark goes first, so no reader trusts the old data."""
        remove_durably(self._mark_file(teacher, kind, shard))
        # Whatever a killed writer left is garbage; removing it keeps zarr from reading a torn shard index.
        remove_durably(self.shard_file(teacher, kind, shard))

    def write_rows(self, teacher: str, kind: str, shard: int, start: int, stop: int, data: np.ndarray) -> dict:
        self._array(teacher, kind)[start:stop] = data
        path = self.shard_file(teacher, kind, shard)
        file_sha256, file_size = sync_and_hash(path, sync=True)
        fsync_dir(path.parent)
        fsync_dir(path.parent.parent)
        return {"file_sha256": file_sha256, "file_size": file_size}

    def write_mark(self, mark: ShardMark) -> None:
        atomic_write_text(self._mark_file(mark.teacher, mark.kind, mark.shard), mark.to_json())

    def read_mark(self, teacher: str, kind: str, shard: int) -> ShardMark | None:
        path = self._mark_file(teacher, kind, shard)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        return ShardMark.from_json(text, str(path), str(self.path))

    def read_marks(self, teacher: str, kind: str, unreadable: dict[int, str] | None = None) -> dict[int, ShardMark]:
        """Shard -> mark. An unreadable mark raises StoreCorruptError, or with `unreadable` given is listed
        there (shard -> why) and left out."""
        paths = sorted((self.path / teacher / kind / "marks").glob("shard-*.json"))
        return collect_marks(((path.stem, lambda path=path: ShardMark.from_json(
            path.read_text(encoding="utf-8", errors="replace"), str(path), str(self.path))) for path in paths),
            unreadable)

    # -- reading ------------------------------------------------------------------------------------
    def shard_location(
        self, teacher: str, kind: str, shard: int, start: int, stop: int, mark: ShardMark | None = None
    ) -> tuple[Path, int] | None:
        """(file, offset) where the finished shard's rows lie as raw little-endian values, one after
        another: always so for shards this package writes (uncompressed, chunks in order). None if not.
        StoreCorruptError when the file is missing, is not the size its mark recorded, or its index is damaged."""
        path = self.shard_file(teacher, kind, shard)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise self._corrupt(path, teacher, kind, start, stop, "shard file is missing although the shard is "
                                "marked complete") from None
        if mark is not None and mark.file_size is not None and size != mark.file_size:
            what = "truncated" if size < mark.file_size else "grown"
            raise self._corrupt(path, teacher, kind, start, stop, f"shard file is {size} bytes, but "
                                f"{mark.file_size} were written ({what} since)")
        try:
            offset = _contiguous_offset(path, size, self._array(teacher, kind), stop - start)
        except ValueError as exc:
            raise self._corrupt(path, teacher, kind, start, stop, str(exc)) from None
        return None if offset is None else (path, offset)

    def shard_view(
        self, teacher: str, kind: str, shard: int, start: int, stop: int, mark: ShardMark | None = None
    ) -> np.ndarray:
        """Rows [start, stop) of a finished shard: a read-only memory map of the shard file, or the rows
        decoded by zarr into memory when they are not stored plainly."""
        array = self._array(teacher, kind)
        location = self.shard_location(teacher, kind, shard, start, stop, mark)
        if location is None:
            try:
                return np.asarray(array[start:stop])
            except Exception as exc:  # a damaged shard fails in many ways inside zarr's codecs
                raise self._corrupt(self.shard_file(teacher, kind, shard), teacher, kind, start, stop,
                                    f"cannot decode the shard ({type(exc).__name__}: {exc})") from None
        path, offset = location
        return np.memmap(path, dtype=array.dtype.newbyteorder("<"), mode="r", offset=offset,
                         shape=(stop - start, array.shape[1]))

    def _corrupt(self, path: Path, teacher: str, kind: str, start: int, stop: int, reason: str) -> StoreCorruptError:
        return corrupt_shard(self.path, path, f"{teacher}/{kind}", start, stop, reason)

    def full_view(self, teacher: str, kind: str) -> np.ndarray | None:
        return None  # one file per shard: no single map covers the array

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def delete(self) -> None:
        shutil.rmtree(self.path)

    def close(self) -> None:
        for lock in self._shard_locks.values():
            lock.close()
        self._shard_locks.clear()
        if self._meta_lock is not None:
            self._meta_lock.close()
            self._meta_lock = None
        self._arrays.clear()


def _contiguous_offset(path: Path, size: int, array: zarr.Array, rows: int) -> int | None:
    """File offset of the shard's first row if its first `rows` rows lie contiguously, in order, as raw
    little-endian values; None otherwise. Follows the zarr v3 sharding_indexed layout: the index is an
    (n_chunks, 2) table of uint64 (offset, nbytes), encoded as little-endian bytes plus a crc32c.
    ValueError when the index is damaged (too short, or its crc32c does not match)."""
    codecs = array.metadata.to_dict()["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    config = codecs[0]["configuration"]
    inner = config["codecs"]
    if len(inner) != 1 or inner[0]["name"] != "bytes" or inner[0].get("configuration", {}).get("endian") == "big":
        return None
    if [c["name"] for c in config["index_codecs"]] != ["bytes", "crc32c"]:
        return None
    chunk_rows, dim = config["chunk_shape"]
    shard_rows = array.metadata.chunk_grid.chunk_shape[0]
    n_chunks = shard_rows // chunk_rows
    index_bytes = n_chunks * 16 + 4
    if size < index_bytes:
        raise ValueError(f"shard file is {size} bytes, too short for its {index_bytes}-byte index (truncated)")
    with open(path, "rb") as handle:
        if config.get("index_location", "end") == "end":
            handle.seek(size - index_bytes)
        raw = handle.read(index_bytes)
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ValueError("the shard index does not match its crc32c (damaged or truncated file)")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)
    chunk_bytes = chunk_rows * dim * array.dtype.itemsize
    used = -(-rows // chunk_rows)
    offsets, nbytes = index[:used, 0], index[:used, 1]
    if (offsets == _EMPTY).any() or (nbytes != chunk_bytes).any():
        return None
    first = int(offsets[0])
    if (offsets != first + np.arange(used, dtype=np.uint64) * np.uint64(chunk_bytes)).any():
        return None
    if first + rows * dim * array.dtype.itemsize > size:
        raise ValueError("the shard index points past the end of the file (truncated)")
    return first


def folder_problem(path: Path, *, strict: bool = False) -> str | None:
    """What makes the directory `path` no place for a store: None for a dsmd zarr store, an empty directory
    (lock files aside) or no directory. `strict`: also name entries a store never holds (before deleting it)."""
    if not path.is_dir():
        return None
    entries = sorted(p.name for p in path.iterdir() if p.name not in LOCK_FILES)
    if not entries:
        return None
    try:
        attrs = json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("attributes") or {}
        is_store = ROOT_KEY in attrs
    except (OSError, ValueError, AttributeError):
        is_store = False
    if not is_store:
        return f"{path} holds {_some(entries)} but is not a dsmd feature store (no dsmd zarr.json)"
    if strict:
        foreign = [name for name in entries if not _store_entry(path / name)]
        if foreign:
            return f"{path} is a dsmd feature store but also holds {_some(foreign)}, which no store holds"
    return None


def refuse_foreign_folder(path: Path) -> None:
    problem = folder_problem(path)
    if problem:
        raise StoreError(f"{problem}: point the store path at a new or empty directory (nothing was written there)")


def _store_entry(entry: Path) -> bool:
    if entry.name in ("zarr.json", EXTRAS_DIR):
        return True
    return entry.is_dir() and all(p.name == "zarr.json" or p.name in KINDS for p in entry.iterdir())


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
