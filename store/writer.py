"""Writing a feature store: create-or-open, one array per (teacher, kind), whole shards with completion marks.

Several processes may fill one zarr store at once as long as each writes whole shards it alone owns (the
extract stage hands them out); creation is race-safe. A killed writer leaves at most unmarked shards, which
`pending_shards` reports and the next run redoes. A writer given a lease (an S3 store's writer lease, or the
fence of it that a Dask worker gets: store/s3_lease.py) checks it before each shard and again just before the
shard's completion mark, and stops with StoreBusyError, touching nothing more, once the lease is lost.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import numpy as np

from store.backends import Backend, open_backend
from store.common import (
    STORE_FORMAT,
    json_data,
    layout_from_root,
    library_versions,
    now_iso,
    recorded_dataset_name,
)
from store.errors import StoreBusyError, StoreDiskFullError, StoreError, StoreMismatchError, disk_full_message
from store.fsutil import disk_full_as_store_error, is_disk_full
from store.integrity import block_checksums, rows_sha256
from store.layout import (
    NORM_TOLERANCE,
    ROW_SPACE,
    SCHEMA_VERSION,
    Layout,
    check_dtype,
    check_kind,
    check_teacher,
    split_kind,
    stable_provenance,
)
from store.marks import ShardMark
from store.numeric import to_float32
from store.remote import store_location

_LIST_AT_MOST = 10


class Lease(Protocol):
    def check(self) -> None:
        """Raise StoreBusyError when this writer no longer holds the store."""


class FeatureStore:
    """A store opened for writing. Use `FeatureStore.create_or_open`; close it (or use `with`)."""

    def __init__(self, path: Path, backend: Backend, root: dict, lease: Lease | None = None) -> None:
        self.path = path
        self._backend = backend
        self.root = root
        self.lease = lease
        self.layout = layout_from_root(root, path)
        self._arrays: dict[tuple[str, str], dict] = {}

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        *,
        backend: str = "auto",
        dataset_fingerprint: str,
        n_images: int,
        n_captions: int,
        rows_per_shard: int = 4096,
        rows_per_chunk: int = 256,
        dataset_name: str = "",
        lease: Lease | None = None,
    ) -> FeatureStore:
        """Create the store, or open it when it exists with the same parameters (StoreError otherwise).

        Safe to call from several processes at once with the same arguments: one creates, the others open.
        `backend` is "zarr", "hdf5" or "auto" (an existing store's kind, else .h5/.hdf5 -> hdf5, else zarr).
        `lease`: what `writer_lease` yielded (or its `fence`, in a process the holder started), checked before
        each shard and each completion mark.
        """
        path = store_location(path)
        layout = Layout(n_images, n_captions, rows_per_shard, rows_per_chunk)
        if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
            raise StoreError("create_or_open needs the dataset fingerprint (dataset.json 'fingerprint')")
        wanted = {"dataset_fingerprint": dataset_fingerprint, **layout.to_dict()}
        with disk_full_as_store_error(path):
            store_backend = open_backend(path, backend, writable=True)
        try:
            with store_backend.metadata_lock(), disk_full_as_store_error(path):
                root = store_backend.read_root()
                if root is None:
                    root = {
                        "format": STORE_FORMAT,
                        "schema_version": SCHEMA_VERSION,
                        "dataset_name": dataset_name,
                        **wanted,
                        "created_at": now_iso(),
                        "store_libs": library_versions(),
                    }
                    store_backend.create_root(root)
                else:
                    layout_from_root(root, path)
                    _check_same_store(path, root, wanted, recorded_dataset_name(store_backend, root))
        except BaseException:
            store_backend.close()
            raise
        return cls(path, store_backend, root, lease)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def dataset_fingerprint(self) -> str:
        return self.root["dataset_fingerprint"]

    # -- arrays -------------------------------------------------------------------------------------
    def ensure_array(
        self,
        teacher: str,
        kind: str,
        dim: int,
        dtype: str = "float16",
        provenance: dict | None = None,
        *,
        views: int | None = None,
        normalisation: str = "l2",
    ) -> None:
        """Create `<teacher>/<kind>` (rows of its row space x dim) or check that the existing one matches.

        `provenance` is the caller's record of how the features are made (teacher config, checkpoint and
        tokenizer sha256, preprocessing, dsmd version...). On an existing array it must match, apart from
        volatile keys such as dsmd_version or host (see layout.VOLATILE_PROVENANCE_KEYS).
        `views`: a row holds this many unit vectors of dim // views side by side (image_view); each is checked
        on its own. `normalisation`: "l2", or "none" for values that are not features (image_view_box).
        """
        check_teacher(teacher)
        check_kind(kind)
        dtype = check_dtype(dtype)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise StoreError(f"{teacher}/{kind}: dim must be a positive integer, got {dim!r}")
        if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1 or dim % views):
            raise StoreError(f"{teacher}/{kind}: views must be a positive integer dividing dim {dim}, got {views!r}")
        if normalisation not in ("l2", "none"):
            raise StoreError(f"{teacher}/{kind}: normalisation must be 'l2' or 'none', got {normalisation!r}")
        provenance = json_data(provenance or {}, f"provenance of {teacher}/{kind}")
        array_file = self.path / teacher / kind if self.backend == "zarr" else self.path
        with self._backend.metadata_lock(), disk_full_as_store_error(array_file):
            attrs = self._backend.read_array_attrs(teacher, kind)
            if attrs is None:
                attrs = {
                    "teacher": teacher,
                    "kind": kind,
                    "row_space": ROW_SPACE[kind],
                    "rows": self.layout.rows(kind),
                    "dim": dim,
                    "dtype": dtype,
                    "normalisation": normalisation,
                    "schema_version": SCHEMA_VERSION,
                    "created_at": now_iso(),
                    "store_libs": library_versions(),
                    "provenance": provenance,
                }
                if views is not None:  # only view arrays carry it: other arrays' attributes stay as they were
                    attrs["views"] = views
                self._backend.create_array(teacher, kind, self.layout.rows(kind), dim, dtype, self.layout, attrs)
            else:
                _check_same_array(self.path, teacher, kind, attrs, dim, dtype, provenance)
                if attrs.get("views") != views or attrs.get("normalisation", "l2") != normalisation:
                    raise StoreMismatchError(
                        f"{self.path}: array {teacher}/{kind} holds views={attrs.get('views')}, normalisation "
                        f"{attrs.get('normalisation', 'l2')}, not views={views}, {normalisation}; use another store"
                    )
        self._arrays[(teacher, kind)] = attrs

    def _array(self, teacher: str, kind: str) -> dict:
        key = (check_teacher(teacher), check_kind(kind))
        if key not in self._arrays:
            attrs = self._backend.read_array_attrs(teacher, kind)
            if attrs is None:
                raise StoreError(f"{self.path} has no array {teacher}/{kind}: call ensure_array first")
            self._arrays[key] = attrs
        return self._arrays[key]

    def arrays(self) -> list[tuple[str, str]]:
        return self._backend.list_arrays()

    def array_attrs(self, teacher: str, kind: str) -> dict:
        return dict(self._array(teacher, kind))

    # -- shards -------------------------------------------------------------------------------------
    def num_shards(self, *kind_or_teacher_kind: str) -> int:
        """Shards of a kind's row space: num_shards("image"), num_shards("beit3/text") or
        num_shards("beit3", "text"); "caption" names the caption row space."""
        if len(kind_or_teacher_kind) == 2:
            check_teacher(kind_or_teacher_kind[0])
            return self.layout.num_shards(check_kind(kind_or_teacher_kind[1]))
        if len(kind_or_teacher_kind) != 1:
            raise TypeError("num_shards takes a kind, 'teacher/kind', or teacher and kind")
        return self.layout.num_shards(split_kind(kind_or_teacher_kind[0]))

    def shard_rows(self, teacher: str, kind: str, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of a shard."""
        return self.layout.shard_rows(check_kind(kind), shard)

    def pending_shards(self, teacher: str, kind: str) -> list[int]:
        """Shards without a completion mark, in order: the work left (all of it for a new array)."""
        self._array(teacher, kind)
        done = self._backend.read_marks(teacher, kind)
        return [s for s in range(self.layout.num_shards(kind)) if s not in done]

    def complete(self, teacher: str, kind: str) -> bool:
        return not self.pending_shards(teacher, kind)

    def skipped(self, teacher: str, kind: str) -> dict[int, str]:
        """Row id -> reason, over the completed shards."""
        self._array(teacher, kind)
        out: dict[int, str] = {}
        for mark in self._backend.read_marks(teacher, kind).values():
            out.update(mark.skipped)
        return dict(sorted(out.items()))

    def write_shard(
        self,
        teacher: str,
        kind: str,
        shard: int,
        values: np.ndarray,
        valid: np.ndarray | None = None,
        skipped: dict[int, str] | None = None,
        *,
        overwrite: bool = False,
        seconds: float | None = None,
    ) -> ShardMark:
        """Write all rows of one shard, make them durable, then mark the shard complete.

        values: (stop - start, dim) floats, L2-normalised where valid. valid: bool per row (None = all rows
        valid except the skipped ones). skipped: row id -> reason for rows that have no feature (stored as
        zero vectors, valid False). A shard already complete is refused unless overwrite=True. seconds: the time
        the caller spent making the rows, kept in the mark (`dsmd store info` sums it).
        """
        attrs = self._array(teacher, kind)
        start, stop = self.layout.shard_rows(kind, shard)
        where = f"{self.path}: {teacher}/{kind} shard {shard} (rows {start}..{stop - 1})"
        stored, valid_mask, reasons = prepare_rows(values, valid, skipped, start, stop, attrs, where)
        with self._backend.shard_lock(teacher, kind, shard):
            self._check_lease()
            if not overwrite and self._backend.read_mark(teacher, kind, shard) is not None:
                raise StoreError(
                    f"{where} is already complete (another writer may have finished it meanwhile): it is kept; "
                    "pass overwrite=True to replace it"
                )
            self._backend.clear_shard(teacher, kind, shard)
            try:
                extra = self._backend.write_rows(teacher, kind, shard, start, stop, stored)
                mark = ShardMark(
                    teacher=teacher,
                    kind=kind,
                    shard=shard,
                    start=start,
                    stop=stop,
                    dtype=attrs["dtype"],
                    dim=attrs["dim"],
                    valid_count=int(valid_mask.sum()),
                    skipped=reasons,
                    data_sha256=rows_sha256(stored),
                    file_sha256=extra.get("file_sha256"),
                    file_size=extra.get("file_size"),
                    written_at=now_iso(),
                    block_rows=self.layout.rows_per_chunk,
                    block_crc32c=block_checksums(stored, self.layout.rows_per_chunk),
                    seconds=None if seconds is None else round(float(seconds), 3),
                )
                self._check_lease()
                self._backend.write_mark(mark)
            except StoreBusyError:
                raise  # the store is another writer's now: clearing the shard could delete that writer's mark
            except BaseException as exc:
                # No half-written shard stays behind: without data or mark the shard is pending, and the next run
                # writes it again.
                with contextlib.suppress(Exception):
                    self._backend.clear_shard(teacher, kind, shard)
                if is_disk_full(exc):
                    raise StoreDiskFullError(
                        disk_full_message(self._backend.shard_path(teacher, kind, shard))
                    ) from None
                raise
        return mark

    def drop_shards(self, teacher: str, kind: str, shards: list[int]) -> None:
        """Forget finished shards, mark first, then data: they become pending and the next run writes them again
        (how `dsmd extract --repair` redoes damaged shards). Other shards are not touched."""
        self._array(teacher, kind)
        for shard in shards:
            self.layout.shard_rows(kind, shard)
            with self._backend.shard_lock(teacher, kind, shard):
                self._check_lease()
                self._backend.clear_shard(teacher, kind, shard)

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()


def row_norm_problems(rows: np.ndarray, valid: np.ndarray, first_row: int, tolerance: float) -> list[str]:
    """Row ids (with what is wrong) among valid rows that are not finite or not of unit norm."""
    as32 = to_float32(rows)
    squares = np.einsum("ij,ij->i", as32, as32)
    # A non-finite sum means a NaN or inf in the row, or (float32 rows only) squares too large to add up.
    suspicious = np.flatnonzero(valid & ~np.isfinite(squares))
    not_finite = [i for i in suspicious.tolist() if not np.isfinite(as32[i]).all()]
    problems = [f"row {first_row + i} is not finite (NaN or inf)" for i in not_finite]
    norms = np.sqrt(squares.astype(np.float64))
    with np.errstate(invalid="ignore"):
        off = valid & ~(np.abs(norms - 1.0) <= tolerance)
    off[not_finite] = False
    problems += [f"row {first_row + i} has norm {norms[i]:.5f}" for i in np.flatnonzero(off)]
    return problems


def array_row_problems(rows: np.ndarray, valid: np.ndarray, first_row: int, attrs: dict) -> list[str]:
    """row_norm_problems under the array's own rule: each of a view row's unit vectors on its own, and only
    finiteness for values that are not features (normalisation "none")."""
    tolerance = NORM_TOLERANCE[attrs["dtype"]]
    if attrs.get("normalisation", "l2") == "none":
        finite = np.isfinite(to_float32(rows)).all(axis=1)
        return [f"row {first_row + i} is not finite (NaN or inf)" for i in np.flatnonzero(valid & ~finite)]
    views = attrs.get("views") or 1
    if views == 1:
        return row_norm_problems(rows, valid, first_row, tolerance)
    width = rows.shape[1] // views
    problems = []
    for view in range(views):
        part = rows[:, view * width : (view + 1) * width]
        problems += [f"{p} (view {view})" for p in row_norm_problems(part, valid, first_row, tolerance)]
    return problems


def prepare_rows(
    values: np.ndarray,
    valid: np.ndarray | None,
    skipped: dict[int, str] | None,
    start: int,
    stop: int,
    attrs: dict,
    where: str,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Check a shard's rows and return (rows in the stored dtype, valid mask, skipped reasons)."""
    rows, dim, dtype = stop - start, attrs["dim"], attrs["dtype"]
    values = np.asarray(values)
    if values.shape != (rows, dim):
        raise StoreError(f"{where}: expected values of shape ({rows}, {dim}), got {values.shape}")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise StoreError(f"{where}: values must be numbers, got dtype {values.dtype}")
    reasons = {}
    for row, reason in (skipped or {}).items():
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not start <= row < stop:
            raise StoreError(
                f"{where}: skipped row {row!r} is not in this shard; skipped keys are canonical row ids "
                f"{start}..{stop - 1}"
            )
        reasons[int(row)] = str(reason)
    if valid is None:
        valid_mask = np.ones(rows, dtype=bool)
    else:
        valid_mask = np.asarray(valid)
        if valid_mask.dtype != np.bool_ or valid_mask.shape != (rows,):
            raise StoreError(f"{where}: valid must be a bool array of shape ({rows},), got "
                             f"{valid_mask.dtype} {valid_mask.shape}")
        contradicting = [row for row in reasons if valid_mask[row - start]]
        if contradicting:
            raise StoreError(f"{where}: rows {_first(contradicting)} are listed as skipped but marked valid")
        valid_mask = valid_mask.copy()
        for i in np.flatnonzero(~valid_mask):
            reasons.setdefault(start + int(i), "skipped (no reason given)")
    for row in reasons:
        valid_mask[row - start] = False
    stored = np.zeros((rows, dim), dtype=np.dtype(dtype).newbyteorder("<"))
    with np.errstate(over="ignore", invalid="ignore"):
        if valid_mask.all():
            stored[...] = values
        else:
            stored[valid_mask] = values[valid_mask]
    problems = array_row_problems(stored, valid_mask, start, attrs)
    if problems:
        raise StoreError(
            f"{where}: {len(problems)} valid rows are unusable: {_first(problems)}. Store L2-normalised, finite "
            f"features (normalise in float32; |norm - 1| <= {NORM_TOLERANCE[dtype]} after casting to {dtype}), "
            "or mark bad rows as skipped"
        )
    return stored, valid_mask, dict(sorted(reasons.items()))


def _first(items: list) -> str:
    shown = ", ".join(str(x) for x in items[:_LIST_AT_MOST])
    return shown + (f" and {len(items) - _LIST_AT_MOST} more" if len(items) > _LIST_AT_MOST else "")


def _check_same_store(path: Path, root: dict, wanted: dict, made_for: str) -> None:
    if root["dataset_fingerprint"] != wanted["dataset_fingerprint"]:
        name = made_for or "another dataset"
        raise StoreMismatchError(
            f"{path} was made for dataset {name!r} (fingerprint {root['dataset_fingerprint']}), not for this one "
            f"(fingerprint {wanted['dataset_fingerprint']}): use another extract.store path or delete the old store"
        )
    differing = [f"{key} {root[key]} (asked {wanted[key]})" for key in wanted if root.get(key) != wanted[key]]
    if differing:
        raise StoreMismatchError(
            f"{path} exists with other parameters: {', '.join(differing)}; use the same settings to resume "
            "it, or another extract.store path"
        )


def _check_same_array(
    path: Path, teacher: str, kind: str, attrs: dict, dim: int, dtype: str, provenance: dict
) -> None:
    where = f"{path}: array {teacher}/{kind}"
    if attrs["dim"] != dim:
        raise StoreMismatchError(
            f"{where} holds {attrs['dim']}-dimensional features, not {dim}; use another teacher name"
        )
    if attrs["dtype"] != dtype:
        raise StoreMismatchError(
            f"{where} is stored as {attrs['dtype']}, not {dtype}; set extract.dtype={attrs['dtype']}"
        )
    old, new = stable_provenance(attrs["provenance"]), stable_provenance(provenance)
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        detail = "; ".join(f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}" for k in keys[:5])
        raise StoreMismatchError(
            f"{where} was made with another teacher setup ({detail}); its features would mix with these. "
            "Use another teacher name or another store, or delete the array to start over"
        )
