"""Random access to the members of uncompressed tar shards (WebDataset, img2dataset), without unpacking them.

Each shard is indexed once, when the dataset is prepared: member name -> (offset of its data, size), which
`tarfile` gives while it walks the headers (it seeks past the data, so indexing reads headers only). Reading a
member is then one positioned read of exactly its bytes. The index lives in the canonical dataset
(``tar_index.parquet``) together with each shard's size; a shard whose size differs later was rewritten since
it was indexed and is refused, because the recorded offsets would point into other data.

Failures come in two kinds:
- a member that cannot be used (its data cut off by a truncated shard, or listed as downloaded but absent):
  `BadMemberError`, which `load_rgb` turns into a `BadImageError`: recorded by `dsmd data check` and skipped
  by every stage like a bad file;
- a shard that is missing, unreadable, changed or not a tar at all: `ShardError`, one line naming the shard,
  which no stage turns into a skip (every image in it would silently vanish).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import bucket
from pipeline.errors import DsmdError

__all__ = [
    "ABSENT",
    "BadMemberError",
    "IndexedMember",
    "ShardError",
    "TarIndex",
    "TarMember",
    "TAR_INDEX_SCHEMA",
    "check_shard",
    "shards_from_metadata",
    "shards_metadata",
    "index_shard",
]

_SHARDS_KEY = "dsmd_shards"
# tar_index.parquet; its key-value metadata holds the shard list (`shards_metadata`).
TAR_INDEX_SCHEMA = pa.schema([("image_id", pa.int64()), ("shard", pa.int32()), ("member", pa.string()),
                              ("offset", pa.int64()), ("size", pa.int64())])

# The offset of a sample that the shard's img2dataset table lists as downloaded but that the tar lacks.
ABSENT = -1


class ShardError(DsmdError):
    """A whole shard is unusable: missing, unreadable, rewritten since indexing, or not an uncompressed tar."""


class BadMemberError(DsmdError):
    """One member cannot be read; ``reason`` is worded for the check report."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class IndexedMember:
    name: str
    offset: int  # of the member's data in the shard
    size: int


@dataclass(frozen=True)
class TarMember:
    """One image inside a shard: where its bytes are and what the shard looked like when it was indexed. The
    shard is a local file, or an s3:// URL (pipeline/data/bucket.py) read with one ranged GET."""

    shard: Path | str
    name: str
    offset: int
    size: int
    shard_size: int
    # A shard in a bucket: its sha256 at prepare, and the local cache (store.remote.ShardCache) to read it whole
    # through; without a cache, or without the sha256 (prepared before it was recorded), one ranged GET per image.
    sha256: str = ""
    cache: Any = None

    def __str__(self) -> str:
        return f"{self.shard}/{self.name}"

    def read(self) -> bytes:
        """The member's bytes; `ShardError` for a shard that is gone or changed, `BadMemberError` for a member
        that the shard does not (completely) hold."""
        if self.offset == ABSENT:
            raise BadMemberError(f"missing from shard {_base(self.shard)} (listed as downloaded)")
        data = self._remote() if isinstance(self.shard, str) else self._local()
        if len(data) < self.size:
            raise BadMemberError(f"truncated shard: {len(data)} of {self.size} bytes in {_base(self.shard)}")
        return data

    def _remote(self) -> bytes:
        # The shard's size was checked when the dataset was opened; a HEAD before every image would double the
        # requests. A shard rewritten since then gives undecodable members, which are recorded as bad images.
        try:
            if self.cache is None or not self.sha256:
                return bucket.read_range(self.shard, self.offset, self.size)
            for _ in range(2):
                local = bucket.cached_copy(self.shard, self.shard_size, self.sha256, self.cache)
                try:
                    return _pread(local, self.offset, self.size)
                except FileNotFoundError:
                    continue  # evicted by another reader between its download and this read: fetch it again
            raise ShardError(f"{self.shard}: the local shard cache ({self.cache.directory}) evicts it as soon as it "
                             "arrives; raise extract.cache_gb")
        except bucket.BucketError as exc:
            raise ShardError(str(exc)) from None

    def _local(self) -> bytes:
        check_shard(self.shard, self.shard_size)
        try:
            fd = os.open(self.shard, os.O_RDONLY)
        except OSError as exc:
            raise ShardError(f"{self.shard}: cannot open the shard ({exc.strerror or exc})") from None
        try:
            return os.pread(fd, self.size, self.offset)
        except OSError as exc:
            raise ShardError(f"{self.shard}: cannot read the shard ({exc.strerror or exc})") from None
        finally:
            os.close(fd)


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _base(shard: Path | str) -> str:
    return shard.rsplit("/", 1)[-1] if isinstance(shard, str) else shard.name


def check_shard(path: Path, size: int) -> None:
    """Refuse a shard that is missing or whose size is not the one recorded at indexing."""
    try:
        actual = os.stat(path).st_size
    except FileNotFoundError:
        raise ShardError(
            f"{path}: shard missing; restore it or rerun `dsmd data prepare` without it"
        ) from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot read the shard ({exc.strerror or exc})") from None
    if actual != size:
        raise ShardError(
            f"{path}: shard is {actual:,} bytes but was {size:,} when indexed (rewritten since); rerun "
            "`dsmd data prepare`"
        )


def index_shard(path: Path) -> tuple[list[IndexedMember], bool]:
    """The regular members of the shard at ``path``, in archive order, and whether the shard is cut short.

    A shard cut inside a member's data keeps that member (its read fails later as truncated); one cut inside
    a header ends the listing there. A file that is not an uncompressed tar is a `ShardError`.
    """
    try:
        file_size = os.stat(path).st_size
        handle = open(path, "rb")  # noqa: SIM115 (closed below, after tarfile is done with it)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard missing") from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot read the shard ({exc.strerror or exc})") from None
    with handle:
        magic = handle.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
            raise ShardError(
                f"{path}: compressed shard; images are read by offset, which needs plain .tar shards: "
                "decompress it (e.g. gunzip) and prepare again"
            )
        handle.seek(0)
        members: list[IndexedMember] = []
        truncated = False
        try:
            # "r:" = uncompressed only; ignore_zeros=False stops at the end-of-archive blocks.
            archive = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.ReadError as exc:
            raise ShardError(f"{path}: not a tar file ({exc}); remove it from the shard directory") from None
        with archive:
            while True:
                try:
                    info = archive.next()
                except (tarfile.ReadError, EOFError) as exc:
                    if not members:
                        raise ShardError(f"{path}: not a readable tar file ({exc})") from None
                    truncated = True  # a header cut off or damaged: nothing after it can be found
                    break
                if info is None:
                    break
                # TarFile keeps every TarInfo it reads (~1 KB each, 30k per img2dataset shard), only for later
                # lookups by name, which indexing never does.
                archive.members.clear()
                if info.isfile():
                    members.append(IndexedMember(info.name, info.offset_data, info.size))
                    if info.offset_data + info.size > file_size:
                        truncated = True
                        break
    if not members and file_size > 0 and not truncated:
        # An empty archive is legal but certainly not what the user meant to prepare.
        raise ShardError(f"{path}: the shard holds no files")
    return members, truncated


def shards_metadata(shards: list[dict]) -> dict[str, str]:
    """The tar index's metadata: each shard's path (relative to the images root) and size at indexing."""
    return {_SHARDS_KEY: json.dumps(shards)}


@dataclass
class TarIndex:
    """Where each image of a dataset lies: ``shards`` (paths relative to the images root) with their sizes at
    indexing, and per image row its shard's position in that list, member name, data offset and size."""

    shards: list[str]
    shard_sizes: list[int]
    shard_of: np.ndarray  # int32, one per image row
    # Kept in Arrow, not as Python strings: ~0.1 KB per image in every process that holds the dataset.
    members: pa.Array  # string
    offsets: np.ndarray  # int64; ABSENT for a sample the tar lacks
    sizes: np.ndarray  # int64
    shard_sha256: list[str] = field(default_factory=list)  # shards in a bucket only (prepare hashes each one)

    def __len__(self) -> int:
        return len(self.members)

    def member(self, row: int) -> str:
        return self.members[row].as_py()

    def to_table(self) -> pa.Table:
        shas = self.shard_sha256 or [""] * len(self.shards)
        shards = [{"path": p, "size": s, **({"sha256": h} if h else {})}
                  for p, s, h in zip(self.shards, self.shard_sizes, shas, strict=True)]
        return pa.table(
            {
                "image_id": pa.array(np.arange(len(self), dtype=np.int64)),
                "shard": pa.array(self.shard_of, pa.int32()),
                "member": self.members.cast(pa.string()),
                "offset": pa.array(self.offsets, pa.int64()),
                "size": pa.array(self.sizes, pa.int64()),
            },
            schema=TAR_INDEX_SCHEMA,
        ).replace_schema_metadata(shards_metadata(shards))

    @classmethod
    def read(cls, path: Path, where: str) -> TarIndex:
        """The index in tar_index.parquet; its shard list is in the file's key-value metadata (written after
        the rows by a streamed prepare, so not part of the Arrow schema stored at its start)."""
        file = pq.ParquetFile(path)
        return cls.from_table(file.read(), where, file.metadata.metadata)

    @classmethod
    def from_table(cls, table: pa.Table, where: str, metadata: dict | None = None) -> TarIndex:
        try:
            shards, sizes, shas = shards_from_metadata(metadata or table.schema.metadata, where)
            index = cls(
                shards=shards,
                shard_sizes=sizes,
                shard_sha256=shas,
                shard_of=table.column("shard").to_numpy().astype(np.int32),
                members=_member_names(table.column("member")),
                offsets=table.column("offset").to_numpy().astype(np.int64),
                sizes=table.column("size").to_numpy().astype(np.int64),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DsmdError(f"{where}: damaged tar index ({exc}); rerun `dsmd data prepare`") from None
        if not np.array_equal(table.column("image_id").to_numpy(), np.arange(len(index))) or (
            len(index) and not 0 <= int(index.shard_of.min()) <= int(index.shard_of.max()) < len(index.shards)
        ):
            raise DsmdError(f"{where}: damaged tar index (ids or shard numbers); rerun `dsmd data prepare`")
        return index


def shards_from_metadata(metadata: dict | None, where: str) -> tuple[list[str], list[int], list[str]]:
    """The shard paths, sizes and sha256s ("" where none was recorded) that `shards_metadata` recorded."""
    try:
        shards = json.loads((metadata or {})[_SHARDS_KEY.encode()])
        return ([str(s["path"]) for s in shards], [int(s["size"]) for s in shards],
                [str(s.get("sha256", "")) for s in shards])
    except (KeyError, TypeError, ValueError) as exc:
        raise DsmdError(f"{where}: damaged tar index ({exc}); rerun `dsmd data prepare`") from None


def _member_names(column: pa.ChunkedArray) -> pa.Array:
    if column.null_count:
        raise ValueError("member names must not be null")
    return column.combine_chunks().cast(pa.string()) if column.num_chunks else pa.array([], pa.string())
