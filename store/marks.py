"""Shard completion marks: what a finished shard holds, written only after its data is durable."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from store.errors import StoreCorruptError, repair_hint

MARK_FORMAT = "dsmd-shard-mark"
MARK_VERSION = 1


@dataclass
class ShardMark:
    teacher: str
    kind: str
    shard: int
    start: int
    stop: int
    dtype: str
    dim: int
    valid_count: int
    # Row id -> why the row was skipped (its stored vector is zero and its valid flag False).
    skipped: dict[int, str] = field(default_factory=dict)
    # sha256 of the rows [start, stop) in the stored dtype, little-endian, row-major: the same for every
    # backend, so a converted store keeps it.
    data_sha256: str = ""
    # zarr only: sha256 and size of the shard file as written (catches damage to the file's index too).
    file_sha256: str | None = None
    file_size: int | None = None
    written_at: str = ""
    # crc32c of each block of block_rows rows (as data_sha256, over the stored bytes): readers check a shard
    # the first time they touch it at ~10 GB/s and can name the damaged rows. None in marks made before them.
    block_rows: int | None = None
    block_crc32c: list[int] | None = None
    # Seconds the writer spent making the shard's rows, when it says (the extract stage does for views).
    seconds: float | None = None

    def to_json(self) -> str:
        body = {
            "format": MARK_FORMAT,
            "version": MARK_VERSION,
            "teacher": self.teacher,
            "kind": self.kind,
            "shard": self.shard,
            "start": self.start,
            "stop": self.stop,
            "dtype": self.dtype,
            "dim": self.dim,
            "valid_count": self.valid_count,
            "skipped": {str(row): reason for row, reason in sorted(self.skipped.items())},
            "data_sha256": self.data_sha256,
            "file_sha256": self.file_sha256,
            "file_size": self.file_size,
            "written_at": self.written_at,
            "block_rows": self.block_rows,
            "block_crc32c": self.block_crc32c,
        }
        if self.seconds is not None:  # absent otherwise, so that marks without it read as before
            body["seconds"] = self.seconds
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str, store: str | None = None) -> ShardMark:
        try:
            body = json.loads(text)
            if body.get("format") != MARK_FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, not {MARK_FORMAT!r}")
            if body.get("version") != MARK_VERSION:
                raise ValueError(f"version {body.get('version')!r} is not {MARK_VERSION}")
            return cls(
                teacher=str(body["teacher"]),
                kind=str(body["kind"]),
                shard=int(body["shard"]),
                start=int(body["start"]),
                stop=int(body["stop"]),
                dtype=str(body["dtype"]),
                dim=int(body["dim"]),
                valid_count=int(body["valid_count"]),
                skipped={int(row): str(reason) for row, reason in body["skipped"].items()},
                data_sha256=str(body["data_sha256"]),
                file_sha256=body.get("file_sha256"),
                file_size=body.get("file_size"),
                written_at=str(body.get("written_at", "")),
                block_rows=None if body.get("block_rows") is None else int(body["block_rows"]),
                block_crc32c=None if body.get("block_crc32c") is None else [int(c) for c in body["block_crc32c"]],
                seconds=None if body.get("seconds") is None else float(body["seconds"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreCorruptError(
                f"{where}: shard completion mark is unreadable ({exc}); {repair_hint(store or where)}"
            ) from None


def collect_marks(
    entries: Iterable[tuple[str, Callable[[], ShardMark]]], unreadable: dict[int, str] | None = None
) -> dict[int, ShardMark]:
    """Shard -> mark from (label "shard-N", read) pairs, the backends' one rule for a damaged mark: it raises
    StoreCorruptError, or with ``unreadable`` given is listed there (shard -> why) and left out."""
    marks = {}
    for label, read in entries:
        try:
            mark = read()
        except StoreCorruptError as exc:
            shard = label.removeprefix("shard-")
            if unreadable is None or not shard.isdigit():
                raise
            unreadable[int(shard)] = str(exc).split("; ")[0]
            continue
        marks[mark.shard] = mark
    return marks
