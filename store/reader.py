"""Reading a feature store for training and evaluation: rows by id, valid masks, streaming, in-RAM mode.

Only completed shards are readable. Rows come straight from memory maps of the shard files (zarr) or the
file (HDF5): a batch is sorted, cut at shard borders, gathered per shard and put back in the asked order.
The first time a reader touches a shard it checks the whole shard against its completion mark (file size,
index, crc32c of every block of rows; see store/integrity.py), so damage is one StoreCorruptError naming the
file, not wrong features or a traceback from deep inside zarr; later batches pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from store import stitch
from store.backends import Backend, open_backend
from store.common import layout_from_root, recorded_dataset_name
from store.errors import StoreError, corrupt_shard
from store.integrity import damaged_rows
from store.layout import ROW_SPACE, Layout, check_kind
from store.marks import ShardMark
from store.numeric import to_float32
from store.remote import ShardCache, store_location

# (teacher, kind, row ids): rows of one array, as StoreReader.prefetch takes them.
Rows = tuple[str, str, np.ndarray]


class _ArrayRows:
    """Rows of one array, by id, from its completed shards."""

    def __init__(self, backend: Backend, layout: Layout, teacher: str, kind: str, attrs: dict) -> None:
        self._backend = backend
        self.teacher, self.kind, self.attrs = teacher, kind, attrs
        self.name = f"{teacher}/{kind}"
        self.rows = layout.rows(kind)
        self.dim = int(attrs["dim"])
        self.dtype = np.dtype(attrs["dtype"]).newbyteorder("<")
        self.layout = layout
        self.n_shards = layout.num_shards(kind)
        self.marks: dict[int, ShardMark] = backend.read_marks(teacher, kind)
        self.done = np.zeros(self.n_shards, dtype=bool)
        self.done[list(self.marks)] = True
        self.checked = np.zeros(self.n_shards, dtype=bool)  # done, and its rows found intact
        self._views: list[np.ndarray | None] = [None] * self.n_shards
        # One array for all rows (HDF5's memory map, the zarr shards stitched together, or the in-RAM copy)
        # turns a batch into one gather instead of one per shard.
        self._whole: np.ndarray | None = backend.full_view(teacher, kind)
        self._stitched: stitch.StitchedRows | None = None
        if self._whole is None and hasattr(backend, "shard_location"):
            self._stitch(np.flatnonzero(self.done))

    def _stitch(self, shards: np.ndarray) -> None:
        """Add finished shards to the stitched view; give it up (per-shard maps) if a shard cannot join."""
        if self._stitched is None:
            if self._whole is not None or not stitch.supported(self.layout.rows_per_shard, self.dim,
                                                               self.dtype.itemsize):
                return
            try:
                self._stitched = stitch.StitchedRows(self.rows, self.dim, self.dtype, self.layout.rows_per_shard)
            except OSError:
                return
        for shard in shards.tolist():
            start, stop = self.layout.shard_rows(self.kind, shard)
            try:
                location = self._backend.shard_location(self.teacher, self.kind, shard, start, stop,
                                                        self.marks[shard])
                if location is None:
                    raise OSError("rows not stored plainly")
                self._stitched.map_shard(shard, location[0], location[1], stop - start)
            except (OSError, StoreError):
                # e.g. a damaged or missing shard file: reading that shard reports it, the others still work
                self._stitched = None
                self._whole = None
                return
        self._whole = self._stitched.array

    # -- completion ---------------------------------------------------------------------------------
    def _refresh(self, shards: np.ndarray) -> None:
        """A writer may have finished shards since we opened: look again before refusing."""
        for shard in shards.tolist():
            mark = self._backend.read_mark(self.teacher, self.kind, shard)
            if mark is not None:
                self.marks[shard] = mark
                self.done[shard] = True
                if self._stitched is not None:
                    self._stitch(np.array([shard]))

    def require(self, shards: np.ndarray, *, check: bool = True) -> None:
        """Refuse unless these shards are complete and (check) intact; checks each shard once."""
        if self.checked[shards].all():
            return
        missing = np.unique(shards[~self.done[shards]])
        if missing.size:
            self._refresh(missing)
            missing = missing[~self.done[missing]]
        if missing.size:
            first = int(missing[0])
            start, stop = self.layout.shard_rows(self.kind, first)
            more = f" (and {missing.size - 1} more incomplete shards)" if missing.size > 1 else ""
            raise StoreError(
                f"{self._backend.path}: {self.name} shard {first} (rows {start}..{stop - 1}) is not complete{more}; "
                "rerun dsmd extract to finish it"
            )
        if check:
            for shard in np.unique(shards[~self.checked[shards]]).tolist():
                self._check(shard)

    def require_all(self, *, check: bool = True) -> None:
        self.require(np.arange(self.n_shards), check=check)

    def _check(self, shard: int) -> None:
        """Read the whole shard once and compare it with what its writer recorded."""
        mark = self.marks[shard]
        bad = damaged_rows(self.view(shard), mark)
        if bad is not None:
            raise corrupt_shard(
                self._backend.path, self._backend.shard_path(self.teacher, self.kind, shard), self.name, *bad,
                "changed since they were written (their checksum in the completion mark does not match)",
            )
        self.checked[shard] = True

    # -- rows ---------------------------------------------------------------------------------------
    def view(self, shard: int) -> np.ndarray:
        view = self._views[shard]
        if view is None:
            start, stop = self.layout.shard_rows(self.kind, shard)
            if self._whole is not None:
                view = self._whole[start:stop]
            else:
                view = self._backend.shard_view(self.teacher, self.kind, shard, start, stop, self.marks[shard])
            if getattr(self._backend, "keeps_views", True):
                self._views[shard] = view  # remote shards are mapped per batch: the cache may evict them
        return view

    def check_ids(self, ids: object) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise StoreError(f"{self.name}: ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            bad = ids[(ids < 0) | (ids >= self.rows)][0]
            raise StoreError(
                f"{self.name}: id {bad} is out of range: the store has {self.rows} "
                f"{ROW_SPACE[self.kind]} rows"
            )
        return ids

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Rows for already checked ids, in the stored dtype, in the order of ids."""
        shards = ids // self.layout.rows_per_shard
        self.require(shards)
        if ids.size == 0:
            return np.empty((0, self.dim), dtype=self.dtype)
        if self._whole is not None:
            return self._whole[ids]
        order = np.argsort(ids, kind="stable")
        sorted_ids, sorted_shards = ids[order], shards[order]
        cuts = (np.flatnonzero(sorted_shards[1:] != sorted_shards[:-1]) + 1).tolist()
        local = sorted_ids - sorted_shards * self.layout.rows_per_shard
        gathered = np.empty((ids.size, self.dim), dtype=self.dtype)
        for a, b in zip([0, *cuts], [*cuts, ids.size], strict=True):
            np.take(self.view(int(sorted_shards[a])), local[a:b], axis=0, out=gathered[a:b])
        out = np.empty_like(gathered)
        out[order] = gathered
        return out

    def load(self) -> None:
        """Copy every completed shard into one in-RAM array (zero rows where shards are incomplete)."""
        whole = np.zeros((self.rows, self.dim), dtype=self.dtype)
        self.require(np.flatnonzero(self.done))
        for shard in np.flatnonzero(self.done).tolist():
            start, stop = self.layout.shard_rows(self.kind, shard)
            whole[start:stop] = self.view(shard)
        self._whole = whole
        self._stitched = None
        self._views = [None] * self.n_shards

    def valid(self) -> np.ndarray:
        mask = np.ones(self.rows, dtype=bool)
        for shard in np.flatnonzero(~self.done).tolist():
            start, stop = self.layout.shard_rows(self.kind, shard)
            mask[start:stop] = False
        for mark in self.marks.values():
            if mark.skipped:
                mask[np.fromiter(mark.skipped, dtype=np.int64)] = False
        return mask


class StoreReader:
    """A feature store opened for reading (see `open_store`)."""

    def __init__(self, path: Path, backend: Backend, root: dict) -> None:
        self.path = path
        self._backend = backend
        self.root = root
        self.layout = layout_from_root(root, path)
        self._arrays: dict[tuple[str, str], _ArrayRows] = {}
        self._present = backend.list_arrays()
        self._in_ram: set[tuple[str, str]] = set()

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def dataset_fingerprint(self) -> str:
        return self.root["dataset_fingerprint"]

    @property
    def dataset_name(self) -> str:
        return recorded_dataset_name(self._backend, self.root)

    def arrays(self) -> list[tuple[str, str]]:
        return list(self._present)

    def teachers(self) -> list[str]:
        return sorted({teacher for teacher, _ in self._present})

    def _array(self, teacher: str, kind: str) -> _ArrayRows:
        key = (teacher, check_kind(kind))
        if key not in self._arrays:
            if key not in self._present:
                present = ", ".join(f"{t}/{k}" for t, k in self._present) or "none"
                raise StoreError(f"{self.path} has no array {teacher}/{kind} (arrays present: {present})")
            attrs = self._backend.read_array_attrs(teacher, kind)
            self._arrays[key] = _ArrayRows(self._backend, self.layout, teacher, kind, attrs)
        return self._arrays[key]

    def attrs(self, teacher: str, kind: str) -> dict:
        """The array's attributes: teacher, kind, dim, dtype, normalisation, provenance, ..."""
        return dict(self._array(teacher, kind).attrs)

    def provenance(self, teacher: str, kind: str) -> dict:
        return dict(self._array(teacher, kind).attrs["provenance"])

    def dim(self, teacher: str, kind: str) -> int:
        return self._array(teacher, kind).dim

    def shape(self, teacher: str, kind: str) -> tuple[int, int]:
        array = self._array(teacher, kind)
        return array.rows, array.dim

    def marks(self, teacher: str, kind: str) -> dict[int, ShardMark]:
        return dict(self._array(teacher, kind).marks)

    def pending_shards(self, teacher: str, kind: str) -> list[int]:
        array = self._array(teacher, kind)
        array._refresh(np.flatnonzero(~array.done))
        return np.flatnonzero(~array.done).tolist()

    def complete(self, teacher: str, kind: str) -> bool:
        return not self.pending_shards(teacher, kind)

    def skipped(self, teacher: str, kind: str) -> dict[int, str]:
        out: dict[int, str] = {}
        for mark in self._array(teacher, kind).marks.values():
            out.update(mark.skipped)
        return dict(sorted(out.items()))

    def get(self, teacher: str, kind: str, ids: Sequence[int] | np.ndarray, *, dtype=np.float32) -> np.ndarray:
        """Rows `ids` (any order, repeats allowed) as a new (len(ids), dim) array of `dtype` (float32 by
        default; dtype=None gives the stored dtype, e.g. float16 to convert on the GPU). Skipped rows come
        back as zeros (see `valid`); a row in an incomplete shard raises StoreError."""
        array = self._array(teacher, kind)
        rows = array.gather(array.check_ids(ids))
        if dtype is None or np.dtype(dtype) == rows.dtype:
            return rows
        if np.dtype(dtype) == np.float32:
            return to_float32(rows)
        return rows.astype(dtype)

    @property
    def remote(self) -> bool:
        """Whether reads download shards (an s3:// store): only then is there anything to prefetch."""
        return getattr(self._backend, "remote", False)

    def prefetch(self, wanted: Sequence[Rows], held: Sequence[Rows] = ()) -> dict[str, int]:
        """Start downloading, in the background, the shards of an s3:// store that hold the `wanted` rows
        (entry by entry, each in shard order), so that the reads of those rows find them in the local cache. An
        entry is (teacher, kind, ids). `held` rows are those still being read: their cached shards are marked most
        recently used and their size is set aside first, and no more is started than the cache holds next to
        them (it evicts least recently used files first, so a prefetch never pushes out what is still read).
        Rows in RAM and incomplete shards are left alone; a local store has nothing to download. Returns counts:
        cached (wanted and already there), started, skipped (already on its way, or too many waiting), over (did
        not fit the cache)."""
        counts = {"cached": 0, "started": 0, "skipped": 0, "over": 0}
        if not self.remote:
            return counts
        room = self._backend.cache.max_bytes
        seen: set[tuple[str, str, int]] = set()
        for entries, fetch in ((held, False), (wanted, True)):
            for array, shard, mark in self._shards_of(entries, seen):
                room -= mark.file_size or 0
                if not fetch:
                    self._backend.cache.touch(self._backend.cache_file(array.teacher, array.kind, shard, mark))
                elif room < 0:
                    counts["over"] += 1
                else:
                    counts[self._backend.prefetch(array.teacher, array.kind, shard, mark)] += 1
        return counts

    def _shards_of(self, entries: Sequence[Rows], seen: set) -> Iterator[tuple[_ArrayRows, int, ShardMark]]:
        """The complete, downloadable shards holding these rows, each once across calls sharing `seen`."""
        for teacher, kind, ids in entries:
            array = self._array(teacher, kind)
            if array._whole is not None:  # in RAM
                continue
            for shard in np.unique(array.check_ids(ids) // self.layout.rows_per_shard).tolist():
                mark = array.marks.get(shard)
                if mark is None or mark.file_sha256 is None or (teacher, kind, shard) in seen:
                    continue
                seen.add((teacher, kind, shard))
                yield array, shard, mark

    def valid(self, teacher: str, kind: str, *, allow_incomplete: bool = False) -> np.ndarray:
        """Bool per row: True where the row holds a feature (False for skipped rows, e.g. bad images).
        Refuses an incomplete array unless allow_incomplete (then its unfinished rows are False).

        A local store's shards are also checked against their marks here, before training starts. A remote
        store's are checked as each is first read instead: checking them here would download the whole store,
        which at scale is neither possible in the cache nor wanted before the first step."""
        array = self._array(teacher, kind)
        if not allow_incomplete:
            array.require_all(check=not self.remote)
        return array.valid()

    def stream(
        self,
        teacher: str,
        kind: str,
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        *,
        valid_only: bool = True,
        drop_last: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, float32 rows) batches reading whole shards one after another: sequential I/O for
        stores larger than RAM. shuffle_buffer > 0 visits shards in a seeded random order and shuffles
        rows within a pool of at least that many rows; 0 keeps row order."""
        if batch_size < 1 or shuffle_buffer < 0:
            raise StoreError(f"stream: need batch_size >= 1, shuffle_buffer >= 0; got {batch_size}, {shuffle_buffer}")
        array = self._array(teacher, kind)
        array.require_all(check=False)  # each shard is checked as the stream reaches it: one pass over the data
        valid = array.valid() if valid_only else None
        rng = np.random.default_rng(seed)
        order = rng.permutation(array.n_shards) if shuffle_buffer else np.arange(array.n_shards)
        pool_ids = np.empty(0, dtype=np.int64)
        pool_rows = np.empty((0, array.dim), dtype=np.float32)
        for position, shard in enumerate(order.tolist()):
            start, stop = self.layout.shard_rows(kind, shard)
            ids = np.arange(start, stop, dtype=np.int64)
            array.require(np.array([shard]))
            rows = to_float32(np.array(array.view(shard)))
            if valid is not None:
                keep = valid[start:stop]
                ids, rows = ids[keep], rows[keep]
            pool_ids, pool_rows = np.concatenate([pool_ids, ids]), np.concatenate([pool_rows, rows])
            if shuffle_buffer:
                perm = rng.permutation(pool_ids.size)
                pool_ids, pool_rows = pool_ids[perm], pool_rows[perm]
            keep_back = shuffle_buffer if position < array.n_shards - 1 else 0
            while pool_ids.size >= batch_size + keep_back:
                yield pool_ids[:batch_size], pool_rows[:batch_size]
                pool_ids, pool_rows = pool_ids[batch_size:], pool_rows[batch_size:]
        if pool_ids.size and not drop_last:
            yield pool_ids, pool_rows

    def load_all(self, teachers: Sequence[str] | None = None, kinds: Sequence[str] | None = None) -> StoreReader:
        """Copy arrays into RAM (stored dtype): later `get` calls read memory, not files. Returns self."""
        for teacher, kind in self._present:
            if (teachers is None or teacher in teachers) and (kinds is None or kind in kinds):
                self._array(teacher, kind).load()
                self._in_ram.add((teacher, kind))
        return self

    def __reduce__(self):
        # Maps and file handles do not travel: a copy sent to another process (e.g. a spawned data-loader
        # worker) opens the store again, and loads the same arrays into its own RAM.
        cache = getattr(self._backend, "cache", None)
        cache_args = (None, None) if cache is None else (str(cache.directory), cache.max_bytes)
        return _reopen, (str(self.path), self._backend.name, sorted(self._in_ram), *cache_args)

    def nbytes(self, teachers: Sequence[str] | None = None, kinds: Sequence[str] | None = None) -> int:
        """RAM that load_all would take for these arrays."""
        total = 0
        for teacher, kind in self._present:
            if (teachers is None or teacher in teachers) and (kinds is None or kind in kinds):
                array = self._array(teacher, kind)
                total += array.rows * array.dim * array.dtype.itemsize
        return total

    def size_on_disk(self) -> int:
        return self._backend.size_on_disk()

    def close(self) -> None:
        self._arrays.clear()
        self._backend.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    path: str | Path,
    *,
    dataset_fingerprint: str | None = None,
    teacher: str | Sequence[str] | None = None,
    dim: int | None = None,
    kinds: Sequence[str] = ("image", "text"),
    in_memory: bool = False,
    backend: str = "auto",
    cache_dir: str | Path | None = None,
    cache_bytes: int | None = None,
) -> StoreReader:
    """Open a store for reading and check it is the one the caller needs.

    dataset_fingerprint: refuse a store made for another dataset. teacher (one name or several): refuse a
    store without these teachers' `kinds` arrays. dim: refuse arrays of another dimension. in_memory: load
    the checked arrays (all arrays when no teacher is given) into RAM. cache_dir, cache_bytes: where and how
    much of an s3:// store's shards are kept on local disk (default ~/.cache/dsmd/store-cache, 8 GiB).
    """
    path = store_location(path)
    cache = ShardCache(cache_dir, cache_bytes) if not isinstance(path, Path) else None
    store_backend = open_backend(path, backend, writable=False, cache=cache)
    try:
        root = store_backend.read_root()
        if root is None:
            raise StoreError(f"{path}: no feature store there (no store metadata); run dsmd extract to make it")
        reader = StoreReader(path, store_backend, root)
        _check_reader(reader, dataset_fingerprint, teacher, dim, kinds)
    except BaseException:
        store_backend.close()
        raise
    if in_memory:
        teachers = None if teacher is None else ([teacher] if isinstance(teacher, str) else list(teacher))
        reader.load_all(teachers, kinds if teacher is not None else None)
    return reader


def _reopen(path: str, backend: str, in_ram: list[tuple[str, str]], cache_dir: str | None = None,
            cache_bytes: int | None = None) -> StoreReader:
    reader = open_store(path, backend=backend, cache_dir=cache_dir, cache_bytes=cache_bytes)
    for teacher, kind in in_ram:
        reader.load_all([teacher], [kind])
    return reader


def _check_reader(
    reader: StoreReader,
    dataset_fingerprint: str | None,
    teacher: str | Sequence[str] | None,
    dim: int | None,
    kinds: Sequence[str],
) -> None:
    path = reader.path
    if dataset_fingerprint is not None and dataset_fingerprint != reader.dataset_fingerprint:
        made_for = reader.dataset_name or "another dataset"
        raise StoreError(
            f"{path} was made for dataset {made_for!r} (fingerprint {reader.dataset_fingerprint}), but the dataset "
            f"in use has fingerprint {dataset_fingerprint}: these features belong to another dataset (or another "
            "version of it). Point extract.store at the right store or rerun dsmd extract for this dataset"
        )
    for kind in kinds:
        check_kind(kind)
    if teacher is None:
        return
    teachers = [teacher] if isinstance(teacher, str) else list(teacher)
    present = reader.teachers()
    for name in teachers:
        if name not in present:
            raise StoreError(
                f"{path} holds features of teacher(s) {', '.join(present) or 'none'}, not {name!r}: extract "
                f"{name!r} into this store (dsmd extract with teacher.name={name}) or pick one of those present"
            )
        for kind in kinds:
            if (name, kind) not in reader.arrays():
                have = ", ".join(k for t, k in reader.arrays() if t == name)
                raise StoreError(f"{path}: teacher {name!r} has no {kind} features (it has: {have})")
            if dim is not None and reader.dim(name, kind) != dim:
                raise StoreError(
                    f"{path}: {name}/{kind} holds {reader.dim(name, kind)}-dimensional features, but {dim} were "
                    "asked for: the student's projection size must match the teacher's embedding size"
                )


__all__ = ["StoreReader", "open_store"]
