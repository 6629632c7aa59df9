"""`dsmd store verify`: check every shard of every array against its mark, its checksums and the schema.

The report lists each damaged or unfinished shard with its file; `dsmd extract --repair` redoes exactly the
shards listed here (see `ShardDamage`), leaving every other shard as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.backends import Backend, open_backend
from store.common import layout_from_root, recorded_dataset_name
from store.errors import StoreCorruptError, StoreError
from store.fsutil import sync_and_hash
from store.integrity import damaged_rows, rows_sha256
from store.layout import NORM_TOLERANCE, Layout
from store.marks import ShardMark
from store.remote import store_location
from store.writer import array_row_problems

_PER_SHARD = 10  # problems listed per shard before summarising


@dataclass
class ShardDamage:
    """A shard that is damaged (marked complete, but not what was written or not usable) or unfinished."""

    teacher: str
    kind: str
    shard: int
    start: int
    stop: int
    file: Path  # the shard file (zarr) or the store file (HDF5)
    problems: list[str]
    marked: bool  # a completion mark exists (or an unreadable one): the shard was finished, then damaged

    def describe(self) -> str:
        return (f"{self.file}: {self.teacher}/{self.kind} shard {self.shard} (rows {self.start}..{self.stop - 1}): "
                + "; ".join(self.problems))


@dataclass
class VerifyReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    damaged: list[ShardDamage] = field(default_factory=list)
    arrays: int = 0
    shards_checked: int = 0
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    # Problems of the store as a whole (metadata, dataset, stray marks), which redoing shards does not fix.
    store_problems: list[str] = field(default_factory=list)

    def add_store_problem(self, problem: str) -> None:
        self.problems.append(problem)
        self.store_problems.append(problem)


def read_dataset_json(dataset_dir: Path) -> dict:
    """The canonical dataset's dataset.json (fingerprint, name, counts)."""
    path = Path(dataset_dir) / "dataset.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path} not found: give the canonical dataset directory (made by dsmd data)") from None
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not info.get("fingerprint"):
        raise StoreError(f"{path} has no 'fingerprint': rebuild the canonical dataset")
    return info


def verify_store(
    path: str | Path,
    *,
    dataset_dir: str | Path | None = None,
    dataset_fingerprint: str | None = None,
    on_shard: Callable[[str, str, int], None] | None = None,
    teachers: list[str] | None = None,
) -> VerifyReport:
    """Check the store (only these teachers' arrays, if given); every problem found is listed in the report
    (nothing is raised for damage)."""
    path = store_location(path)
    report = VerifyReport(path)
    backend = open_backend(path, "auto", writable=False)
    try:
        root = backend.read_root()
        if root is None:
            report.add_store_problem(f"{path}: no feature store metadata")
            return report
        layout = layout_from_root(root, path)
        root = {**root, "dataset_name": recorded_dataset_name(backend, root)}
        _check_dataset(report, root, layout, dataset_dir, dataset_fingerprint)
        for teacher, kind in backend.list_arrays():
            if teachers is not None and teacher not in teachers:
                continue
            report.arrays += 1
            _check_array(report, backend, layout, teacher, kind, on_shard)
    finally:
        backend.close()
    return report


def _check_dataset(
    report: VerifyReport, root: dict, layout: Layout, dataset_dir: str | Path | None, fingerprint: str | None
) -> None:
    expected = {}
    if dataset_dir is not None:
        info = read_dataset_json(Path(dataset_dir))
        expected["dataset.json"] = info["fingerprint"]
        counts = info.get("counts") or {}
        for key, ours in (("images", layout.n_images), ("captions", layout.n_captions)):
            theirs = counts.get(key, counts.get(f"n_{key}"))
            if theirs is not None and theirs != ours:
                report.add_store_problem(f"{report.path}: store has {ours} {key} rows, {dataset_dir} has {theirs}")
    if fingerprint is not None:
        expected["the given fingerprint"] = fingerprint
    for source, value in expected.items():
        if value != root["dataset_fingerprint"]:
            report.add_store_problem(
                f"{report.path}: made for dataset {root.get('dataset_name') or '?'!r} (fingerprint "
                f"{root['dataset_fingerprint']}), but {source} says {value}: fingerprint mismatch"
            )


def _check_array(
    report: VerifyReport,
    backend: Backend,
    layout: Layout,
    teacher: str,
    kind: str,
    on_shard: Callable[[str, str, int], None] | None,
) -> None:
    name = f"{teacher}/{kind}"
    try:
        attrs = backend.read_array_attrs(teacher, kind)
    except StoreError as exc:
        report.add_store_problem(str(exc))
        return
    if attrs is None or attrs.get("rows") != layout.rows(kind) or attrs.get("dtype") not in NORM_TOLERANCE:
        report.add_store_problem(f"{report.path}: {name} has missing or inconsistent attributes: {attrs!r}")
        return
    unreadable: dict[int, str] = {}
    marks = backend.read_marks(teacher, kind, unreadable)
    n_shards = layout.num_shards(kind)
    for shard in sorted((set(marks) | set(unreadable)) - set(range(n_shards))):
        report.add_store_problem(f"{name}: mark for shard {shard}, which does not exist (0..{n_shards - 1})")
    for shard in range(n_shards):
        start, stop = layout.shard_rows(kind, shard)
        mark = marks.get(shard)
        if shard in unreadable:
            found, marked = [unreadable[shard]], True
        elif mark is None:
            found, marked = ["not complete (no completion mark); rerun dsmd extract to finish it"], False
        else:
            found, marked = _check_shard(backend, teacher, kind, shard, start, stop, attrs, mark), True
            report.shards_checked += 1
            report.rows_checked += stop - start
        if found:
            damage = ShardDamage(teacher, kind, shard, start, stop, backend.shard_path(teacher, kind, shard),
                                 found, marked)
            report.damaged.append(damage)
            report.problems.extend(f"{name} shard {shard} (rows {start}..{stop - 1}): {p}" for p in found)
        if on_shard is not None:
            on_shard(teacher, kind, shard)


def _check_shard(
    backend: Backend, teacher: str, kind: str, shard: int, start: int, stop: int, attrs: dict, mark: ShardMark
) -> list[str]:
    problems = []
    expected = (mark.shard, mark.start, mark.stop, mark.dtype, mark.dim, mark.teacher, mark.kind)
    if expected != (shard, start, stop, attrs["dtype"], attrs["dim"], teacher, kind):
        problems.append(f"completion mark describes another shard: {expected}")
        return problems
    if getattr(backend, "remote", False):
        digest = backend.file_digest(teacher, kind, shard)
        if digest is None:
            return [f"shard object {backend.shard_file(teacher, kind, shard)} is missing although the shard is marked "
                    "complete"]
        if digest != (mark.file_sha256, mark.file_size):
            problems.append("shard object does not match its mark's sha256 (damaged or replaced)")
    elif backend.name == "zarr":
        shard_file = backend.shard_file(teacher, kind, shard)
        if not shard_file.is_file():
            return [f"shard file {shard_file} is missing although the shard is marked complete"]
        file_sha256, size = sync_and_hash(shard_file, sync=False)
        if size != mark.file_size or file_sha256 != mark.file_sha256:
            problems.append("shard file does not match its mark's sha256 (damaged or replaced)")
    try:
        rows = np.asarray(backend.shard_view(teacher, kind, shard, start, stop, mark))
    except StoreCorruptError as exc:
        return [*problems, exc.reason]
    except StoreError as exc:
        return [*problems, str(exc)]
    except Exception as exc:  # a damaged file can fail in many ways inside zarr or h5py
        return [*problems, f"cannot read the rows ({type(exc).__name__}: {exc})"]
    bad = damaged_rows(rows, mark) if mark.block_crc32c is not None else None
    if bad is not None:
        problems.append(f"rows {bad[0]}..{bad[1] - 1} do not match the checksum in the completion mark (data "
                        "changed after writing)")
    elif rows_sha256(rows) != mark.data_sha256:
        problems.append("rows do not match the checksum in the completion mark (data changed after writing)")
    valid = np.ones(stop - start, dtype=bool)
    skipped_rows = np.array(sorted(mark.skipped), dtype=np.int64)
    if skipped_rows.size:
        valid[skipped_rows - start] = False
    if int(valid.sum()) != mark.valid_count:
        problems.append(f"mark counts {mark.valid_count} valid rows but lists {len(mark.skipped)} skipped")
    row_problems = array_row_problems(rows, valid, start, attrs)
    nonzero_skipped = [start + int(i) for i in np.flatnonzero(~valid & (rows != 0).any(axis=1))]
    row_problems += [f"row {row} is skipped but not a zero vector" for row in nonzero_skipped]
    problems.extend(row_problems[:_PER_SHARD])
    if len(row_problems) > _PER_SHARD:
        problems.append(f"... and {len(row_problems) - _PER_SHARD} more bad rows")
    return problems
