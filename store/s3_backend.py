"""Zarr stores on S3-compatible object storage (``s3://bucket/prefix``): the same objects as a local zarr
store's files (zarr.json, ``<teacher>/<kind>/c/<shard>/0``, ``<teacher>/<kind>/marks/shard-NNNNNN.json``),
so a store copied between disk and bucket with any tool stays a store. Its extras (``_extras/<name>.npz``) are
store/s3_extras.py's.

Crash safety rests on S3 making an object visible whole or not at all: a shard is one PUT, read back and
hashed, and only then its mark is PUT. A writer killed mid-shard leaves no object or an unmarked one, which the
next run writes again. Object stores have no locks: the extract stage hands each writer its own shards and
creates the store before starting them, and one writing command per store at a time is kept by a writer lease
made of a conditional write (store/s3_lease.py).

Readers download each shard they touch, whole, into a size-limited local ShardCache (store/remote.py) and map
it from there, checked against its mark's sha256 first. A reader keeps its most recent maps open, at most the
cache's size of them, so that an evicted file's space is freed once its map goes. A reader that knows which
shards come next downloads them in the background (`prefetch`, store/prefetch.py); a read of a shard on its way
waits for that download instead of starting another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zarr
import zarr.storage
from zarr.errors import ContainsArrayError

from store.errors import StoreError, corrupt_shard
from store.layout import KINDS, Layout
from store.marks import ShardMark, collect_marks
from store.prefetch import ShardPrefetcher
from store.remote import ShardCache, StoreUrl, checked_filesystem, remote_errors
from store.s3_lease import LEASE_KEY
from store.zarr_backend import _WRITE_CONFIG, ARRAY_KEY, EXTRAS_DIR, ROOT_KEY, _contiguous_offset


class S3ZarrBackend:
    name = "zarr"
    remote = True
    keeps_views = False  # see _ArrayRows.view: the cache, not the reader, decides what stays on disk

    def __init__(self, url: StoreUrl, *, writable: bool, cache: ShardCache | None = None) -> None:
        self.path = url
        self.writable = writable
        self.cache = cache or ShardCache()
        self.fs = checked_filesystem(url)
        self._zstore = zarr.storage.FsspecStore.from_url(
            url, read_only=not writable, storage_options={"skip_instance_cache": True, "use_listings_cache": False}
        )
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._views: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._view_bytes = 0
        self._prefetcher = ShardPrefetcher()

    def _key(self, *parts: str) -> str:
        return "/".join([self.path.key, *parts])

    def _cat(self, *parts: str) -> bytes | None:
        with remote_errors(self.path):
            try:
                return self.fs.cat_file(self._key(*parts))
            except FileNotFoundError:
                return None

    # -- store-wide metadata ------------------------------------------------------------------------
    @contextlib.contextmanager
    def metadata_lock(self):
        yield  # no locks on object storage: the driver creates the store before any worker opens it

    def read_root(self) -> dict | None:
        raw = self._cat("zarr.json")
        if raw is None:
            return None
        try:
            attrs = json.loads(raw).get("attributes") or {}
        except (ValueError, AttributeError) as exc:
            raise StoreError(f"{self.path}: cannot read the zarr root metadata ({exc})") from None
        if ROOT_KEY not in attrs:
            raise StoreError(f"{self.path} is a zarr group but not a dsmd feature store (no {ROOT_KEY} attributes)")
        return attrs[ROOT_KEY]

    def create_root(self, attrs: dict) -> None:
        with remote_errors(self.path):
            others = self.fs.ls(self.path.key, detail=False) if self.fs.exists(self.path.key) else []
        others = [o for o in others if o.rsplit("/", 1)[-1] != LEASE_KEY]  # the lease of the command making it
        if others:
            shown = ", ".join(sorted(o.rsplit("/", 1)[-1] for o in others)[:5])
            raise StoreError(f"{self.path} exists and holds {shown} but no feature store: choose an empty or new "
                             "prefix for extract.store")
        with remote_errors(self.path):
            zarr.create_group(store=self._zstore, attributes={ROOT_KEY: attrs})

    def list_arrays(self) -> list[tuple[str, str]]:
        with remote_errors(self.path):
            found = self.fs.glob(self._key("*", "*", "zarr.json"))
        pairs = [tuple(p[len(self.path.key) + 1:].split("/")[:2]) for p in found]
        return sorted((t, k) for t, k in pairs if k in KINDS)

    def read_array_attrs(self, teacher: str, kind: str) -> dict | None:
        raw = self._cat(teacher, kind, "zarr.json")
        if raw is None:
            return None
        return (json.loads(raw).get("attributes") or {}).get(ARRAY_KEY)

    def create_array(self, teacher: str, kind: str, rows: int, dim: int, dtype: str, layout: Layout, attrs: dict):
        # Never overwrite: that would delete the shards a concurrent worker (Dask) has written meanwhile. Two
        # workers that both found no array both write its metadata; the copies differ only in created_at.
        with remote_errors(self.path), contextlib.suppress(ContainsArrayError):
            zarr.create_array(
                store=self._zstore, name=f"{teacher}/{kind}", shape=(rows, dim),
                chunks=(layout.rows_per_chunk, dim), shards=(layout.rows_per_shard, dim), dtype=dtype,
                fill_value=0, compressors=None, filters=None,
                chunk_key_encoding={"name": "default", "separator": "/"}, attributes={ARRAY_KEY: attrs},
                config=_WRITE_CONFIG,
            )

    def _array(self, teacher: str, kind: str) -> zarr.Array:
        key = (teacher, kind)
        if key not in self._arrays:
            with remote_errors(self.path):
                array = zarr.open_array(store=self._zstore, path=f"{teacher}/{kind}",
                                        mode="r+" if self.writable else "r")
            self._arrays[key] = array.with_config(_WRITE_CONFIG)
        return self._arrays[key]

    # -- shards -------------------------------------------------------------------------------------
    def shard_file(self, teacher: str, kind: str, shard: int) -> StoreUrl:
        return self.path / teacher / kind / self._array(teacher, kind).metadata.encode_chunk_key((shard, 0))

    shard_path = shard_file

    def _mark_key(self, teacher: str, kind: str, shard: int) -> str:
        return self._key(teacher, kind, "marks", f"shard-{shard:06d}.json")

    def shard_lock(self, teacher: str, kind: str, shard: int):
        return contextlib.nullcontext()  # the extract stage gives each writer its own shards

    def clear_shard(self, teacher: str, kind: str, shard: int) -> None:
        """Mark first, so that no reader trusts the data while it goes."""
        with remote_errors(self.path):
            for key in (self._mark_key(teacher, kind, shard), self.shard_file(teacher, kind, shard).key):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(key)

    def write_rows(self, teacher: str, kind: str, shard: int, start: int, stop: int, data: np.ndarray) -> dict:
        with remote_errors(self.path):
            self._array(teacher, kind)[start:stop] = data
            # Hash what the server holds, not what was sent: the mark then vouches for the stored object.
            body = self.fs.cat_file(self.shard_file(teacher, kind, shard).key)
        return {"file_sha256": hashlib.sha256(body).hexdigest(), "file_size": len(body)}

    def write_mark(self, mark: ShardMark) -> None:
        with remote_errors(self.path):
            self.fs.pipe_file(self._mark_key(mark.teacher, mark.kind, mark.shard), mark.to_json().encode())

    def read_mark(self, teacher: str, kind: str, shard: int) -> ShardMark | None:
        key = self._mark_key(teacher, kind, shard)
        raw = self._cat(key[len(self.path.key) + 1:])
        return None if raw is None else ShardMark.from_json(raw.decode(errors="replace"), f"s3://{key}", self.path)

    def read_marks(self, teacher: str, kind: str, unreadable: dict[int, str] | None = None) -> dict[int, ShardMark]:
        with remote_errors(self.path):
            keys = sorted(self.fs.glob(self._key(teacher, kind, "marks", "shard-*.json")))
            bodies = self.fs.cat(keys) if keys else {}
        return collect_marks(((key.rsplit("/", 1)[-1].removesuffix(".json"), lambda key=key: ShardMark.from_json(
            bodies[key].decode(errors="replace"), f"s3://{key}", self.path)) for key in keys), unreadable)

    # -- reading ------------------------------------------------------------------------------------
    def cache_file(self, teacher: str, kind: str, shard: int, mark: ShardMark) -> Path:
        return self.cache.path_for(self.path, f"{teacher}-{kind}-{shard:06d}", mark.file_sha256 or "unknown")

    def local_copy(self, teacher: str, kind: str, shard: int, mark: ShardMark) -> Path:
        """The shard's file in the local cache, downloaded (and checked against the mark) if absent; a download
        of it already started by `prefetch` is waited for, and its failure raised here."""
        future = self._prefetcher.claim(self.cache_file(teacher, kind, shard, mark))
        # One still queued behind other prefetches is withdrawn and fetched now; one running is waited for, and
        # its file taken from the cache as usual (which downloads it again if it was evicted since).
        if future is not None and not future.cancel():
            future.result()  # raises the background download's error
        return self._download(teacher, kind, shard, mark)

    def _download(self, teacher: str, kind: str, shard: int, mark: ShardMark) -> Path:
        url = self.shard_file(teacher, kind, shard)
        target = self.cache_file(teacher, kind, shard, mark)

        def download(tmp: Path) -> None:
            with remote_errors(self.path):
                try:
                    self.fs.get_file(url.key, str(tmp))
                except FileNotFoundError:
                    raise corrupt_shard(self.path, url, f"{teacher}/{kind}", mark.start, mark.stop,
                                        "shard object is missing although the shard is marked complete") from None

        return self.cache.fetch(target, download, mark.file_size or 0, mark.file_sha256 or "", str(url))

    def prefetch(self, teacher: str, kind: str, shard: int, mark: ShardMark) -> str:
        """Start downloading the shard into the cache in the background. Returns "cached" (already there, now
        marked most recently used), "started", or "skipped" (already on its way, or too many waiting)."""
        target = self.cache_file(teacher, kind, shard, mark)
        if self.cache.touch(target):
            return "cached"
        self._array(teacher, kind)  # opened here, not concurrently in the download threads
        started = self._prefetcher.start(target, lambda: self._download(teacher, kind, shard, mark))
        return "started" if started else "skipped"

    def shard_view(
        self, teacher: str, kind: str, shard: int, start: int, stop: int, mark: ShardMark | None = None
    ) -> np.ndarray:
        array = self._array(teacher, kind)
        if mark is None or mark.file_sha256 is None:
            with remote_errors(self.path):
                return np.asarray(array[start:stop])
        key = (teacher, kind, shard, mark.file_sha256)
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key]
        local = self.local_copy(teacher, kind, shard, mark)
        try:
            offset = _contiguous_offset(local, local.stat().st_size, array, stop - start)
        except ValueError as exc:
            raise corrupt_shard(self.path, self.shard_file(teacher, kind, shard), f"{teacher}/{kind}", start, stop,
                                str(exc)) from None
        if offset is None:
            with remote_errors(self.path):
                return np.asarray(array[start:stop])
        view = np.memmap(local, dtype=array.dtype.newbyteorder("<"), mode="r", offset=offset,
                         shape=(stop - start, array.shape[1]))
        self._keep(key, view)
        return view

    def _keep(self, key: tuple, view: np.ndarray) -> None:
        """Keep recent maps open (a batch then costs what it costs locally), but no more bytes of them than the
        cache may hold: a map keeps its file's space in use even after the cache has deleted the file."""
        self._views[key] = view
        self._view_bytes += view.nbytes
        while self._view_bytes > self.cache.max_bytes and len(self._views) > 1:
            _, old = self._views.popitem(last=False)
            self._view_bytes -= old.nbytes

    def file_digest(self, teacher: str, kind: str, shard: int) -> tuple[str, int] | None:
        """sha256 and size of the stored shard object (None when it is missing), for `dsmd store verify`."""
        raw = self._cat(*self.shard_file(teacher, kind, shard).key[len(self.path.key) + 1:].split("/"))
        return None if raw is None else (hashlib.sha256(raw).hexdigest(), len(raw))

    def full_view(self, teacher: str, kind: str) -> np.ndarray | None:
        return None

    def size_on_disk(self) -> int:
        with remote_errors(self.path):
            return int(self.fs.du(self.path.key))

    def exists(self) -> bool:
        return self._cat("zarr.json") is not None

    def delete(self) -> None:
        """Delete the store's objects, refusing (by name) a prefix that also holds objects no store holds."""
        with remote_errors(self.path):
            foreign, entries = [], self.fs.ls(self.path.key, detail=True)
            for entry in entries:
                name = entry["name"].rsplit("/", 1)[-1]
                if entry["type"] != "directory":
                    if name not in ("zarr.json", LEASE_KEY):
                        foreign.append(name)
                elif name != EXTRAS_DIR and not all(sub.rsplit("/", 1)[-1] in (*KINDS, "zarr.json")
                             for sub in self.fs.ls(entry["name"], detail=False)):
                    foreign.append(name)
            if foreign:
                shown = ", ".join(sorted(foreign)[:5])
                raise StoreError(f"{self.path} is a dsmd feature store but also holds {shown}, which no store holds: "
                                 "not deleting it; move those objects away or point the store elsewhere")
            # The writer lease stays: the command holding it keeps the store while it rebuilds it.
            for entry in entries:
                if entry["name"].rsplit("/", 1)[-1] != LEASE_KEY:
                    self.fs.rm(entry["name"], recursive=entry["type"] == "directory")

    def close(self) -> None:
        self._prefetcher.close()
        self._arrays.clear()
        self._views.clear()
        self._view_bytes = 0
