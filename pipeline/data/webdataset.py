"""Reader for WebDataset shards as img2dataset writes them: ``00000.tar`` holding ``{key}.jpg`` (or .jpeg,
.png, .webp), ``{key}.txt`` (the caption) and ``{key}.json`` (metadata), beside ``00000.parquet`` (one row per
sample of the shard's input, downloaded or not: key, caption, status, error_message, ...).

``data.source`` is a directory of shards (every ``*.tar`` directly in it, in name order) or one ``.tar``; the
shards must lie under ``data.images_root``. Both may be s3:// URLs instead (pipeline/data/bucket.py). Images
stay inside the tars: each shard is indexed once here (`pipeline.data.shards`) and every stage reads an image by
its offset.

Rules:
- A sample is the members sharing a key: the member name up to the first dot of its base name, as the
  WebDataset convention has it (``a/b.c.jpg`` -> key ``a/b``, extension ``c.jpg``). The key is the image id;
  img2dataset makes it unique across shards (shard number + row), and a key seen twice is refused.
- Caption: the ``.txt`` member, else the json's ``data.caption_column`` field, which may also be a list of
  captions (several per image, as COCO or Flickr30k converted to WebDataset carry them): each becomes a caption
  row. A sample with neither, or a blank one (img2dataset writes an empty .txt for a missing caption), keeps its
  image and has its caption recorded as dropped, as the table readers do.
- Split, in this order: the json's ``data.split_column`` field; else, when ``data.hash_split_val`` or
  ``data.hash_split_test`` is set, a hash of the key (sha256 of the UTF-8 key, first 8 bytes as an integer over
  2**64: below test -> test, below test + val -> val, else train), which keeps a sample's split whatever shard
  it sits in and however the shards are listed; else ``data.default_split``; else the dataset is refused.
- Samples the shard's parquet lists as downloaded (status "success") that the tar lacks (a shard cut short)
  become image rows whose read fails as "missing from shard", so `dsmd data check` records them; their caption
  and split come from the parquet. Samples not downloaded are counted only.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import bucket
from pipeline.data.rows import DroppedRow, SourceBuilder
from pipeline.data.shards import ABSENT, IndexedMember, ShardError, index_shard
from pipeline.errors import DsmdError

__all__ = ["IMAGE_EXTENSIONS", "ShardRows", "WebDatasetSummary", "list_shards", "hash_split", "iter_shards"]

# In order of preference, for a sample that holds the image in several encodings.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_TEXT_LIMIT = 1 << 20  # a caption or metadata member larger than this is not a caption: refuse, do not load


def list_shards(source: Path) -> list[Path]:
    """The shards of ``source``: the directory's ``*.tar`` files in name order, or the one ``.tar`` given."""
    if source.is_file():
        return [source]
    shards = sorted(p for p in source.iterdir() if p.name.endswith(".tar") and not p.name.startswith("."))
    if not shards:
        compressed = sorted(p.name for p in source.iterdir() if ".tar." in p.name)
        hint = f" (found compressed {compressed[0]}: decompress the shards first)" if compressed else ""
        raise DsmdError(f"data.source {str(source)!r}: no .tar shards in this directory{hint}")
    return shards


def hash_split(key: str, val: float, test: float) -> str:
    """The split of ``key`` under the hash rule (module notes)."""
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if position < test:
        return "test"
    return "val" if position < test + val else "train"


def _split_key(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, extension.lower() if dot else ""


@dataclass
class _Sample:
    image: IndexedMember | None = None
    image_rank: int = len(IMAGE_EXTENSIONS)
    texts: dict[str, IndexedMember] = field(default_factory=dict)


def _group(members: list[IndexedMember]) -> dict[str, _Sample]:
    samples: dict[str, _Sample] = {}
    for member in members:
        key, extension = _split_key(member.name)
        sample = samples.setdefault(key, _Sample())
        if extension in IMAGE_EXTENSIONS:
            rank = IMAGE_EXTENSIONS.index(extension)
            if rank < sample.image_rank:
                sample.image, sample.image_rank = member, rank
        elif extension in ("txt", "json"):
            sample.texts[extension] = member
    return samples


@dataclass
class _Rules:
    caption_field: str
    split_field: str
    default_split: str
    val: float
    test: float

    def split(self, key: str, given: Any, where: str) -> Any:
        if isinstance(given, str) and given.strip():
            return given
        if given is not None and not isinstance(given, str):
            return given  # the builder names the wrong type
        if self.val > 0 or self.test > 0:
            return hash_split(key, self.val, self.test)
        if self.default_split:
            return self.default_split
        raise DsmdError(
            f"{where}: no split (json field {self.split_field!r}); set data.hash_split_val / data.hash_split_test "
            "to split by a hash of the key, or data.default_split"
        )


class _ShardReader:
    """The small members (captions, metadata) of one shard, read by offset."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def text(self, member: IndexedMember, where: str) -> str | None:
        if member.size > _TEXT_LIMIT:
            raise DsmdError(f"{where}: {member.name} is {member.size:,} bytes, too large for a caption or metadata")
        data = os.pread(self.fd, member.size, member.offset)
        if len(data) < member.size:
            return None  # cut off by a truncated shard: as if absent
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DsmdError(f"{where}: {member.name} is not UTF-8 text ({exc.reason}); re-encode it") from None

    def metadata(self, member: IndexedMember | None, where: str) -> dict:
        if member is None:
            return {}
        text = self.text(member, where)
        if text is None:
            return {}
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DsmdError(f"{where}: {member.name} is not valid JSON ({exc.msg}); fix or drop the member") from None
        if not isinstance(value, dict):
            raise DsmdError(f"{where}: {member.name} must hold a JSON object, got {type(value).__name__}")
        return value


def _downloaded_table(shard: Path, rules: _Rules) -> tuple[list[dict], int]:
    """The rows of the shard's img2dataset parquet with status "success", and how many others it lists."""
    path = shard.with_suffix(".parquet")
    if not path.is_file():
        return [], 0
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc}); restore it or remove it") from None
    names = table.column_names
    if "key" not in names or "status" not in names:
        return [], 0  # not img2dataset's table: nothing to compare the tar with
    wanted = [n for n in ("key", "status", rules.caption_field, rules.split_field) if n in names]
    rows = table.select(wanted).to_pylist()
    success = [row for row in rows if row.get("status") == "success"]
    return success, len(rows) - len(success)


@dataclass
class WebDatasetSummary:
    shards: int = 0
    truncated_shards: list[str] = field(default_factory=list)
    not_downloaded: int = 0
    missing_from_tar: int = 0

    def add(self, shard: ShardRows) -> None:
        self.shards += 1
        if shard.truncated:
            self.truncated_shards.append(shard.path)
        self.not_downloaded += shard.not_downloaded
        self.missing_from_tar += shard.missing_from_tar

    def to_dict(self) -> dict:
        return {
            "shards": self.shards,
            "truncated_shards": self.truncated_shards,
            "not_downloaded": self.not_downloaded,
            "missing_from_tar": self.missing_from_tar,
        }


@dataclass
class ShardRows:
    """One shard's rows: ``builder`` holds its images and captions, with ids local to the shard (0..n-1), and the
    member lists say where each of its images lies in the tar."""

    path: str  # relative to the images root
    size: int
    builder: SourceBuilder
    sha256: str = ""  # a shard in a bucket: of the copy indexed, which later cached copies must match
    members: list[str] = field(default_factory=list)
    offsets: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))
    truncated: bool = False
    not_downloaded: int = 0
    missing_from_tar: int = 0

    def add_image(self, key: str, name: str, offset: int, size: int, split: Any, row: str) -> int:
        image = self.builder.image(key, f"{self.path}/{name}", split, row, unique=True)
        self.members.append(name)
        self.offsets.append(offset)
        self.sizes.append(size)
        return image


def _rules(cfg: Any) -> _Rules:
    rules = _Rules(
        caption_field=cfg.caption_column,
        split_field=cfg.split_column,
        default_split=getattr(cfg, "default_split", "") or "",
        val=float(getattr(cfg, "hash_split_val", 0.0)),
        test=float(getattr(cfg, "hash_split_test", 0.0)),
    )
    if rules.val + rules.test >= 1:
        raise DsmdError(
            f"data.hash_split_val + data.hash_split_test = {rules.val + rules.test:g} leaves no training data; "
            "keep their sum below 1"
        )
    return rules


def iter_shards(source: Path | str, images_root: Path | str, cfg: Any, scratch: Path | None = None
                ) -> Iterator[ShardRows]:
    """Index the shards of ``source`` one after the other (``cfg`` is the `DataConfig`); each is handed out
    whole and then forgotten, so memory is one shard's whatever the dataset's size. Keys repeated across
    shards are not seen here: the caller checks them (pipeline/data/streamed.py).

    ``source`` and ``images_root`` may be s3:// URLs (pipeline/data/bucket.py): each shard is then downloaded
    into ``scratch`` (a local directory), indexed there and deleted."""
    rules = _rules(cfg)
    if bucket.is_url(source):
        yield from _bucket_shards(str(source), str(images_root), rules, scratch)
        return
    for shard in list_shards(Path(source)):
        builder = SourceBuilder(source=Path(source), images_root=Path(images_root))
        rows = ShardRows(builder.normalize_path(str(shard.absolute()), f"shard {shard.name}"), shard.stat().st_size,
                         builder)
        _read_shard(shard, rules, rows)
        yield rows


def _bucket_shards(source: str, root: str, rules: _Rules, scratch: Path | None) -> Iterator[ShardRows]:
    if scratch is None:
        raise ValueError("shards in a bucket need a scratch directory to be indexed in")
    for url, size in bucket.list_tar_objects(source):
        relative = bucket.relative_to_root(url, root, "data.source")
        local = scratch / posixpath.basename(url)
        table = local.with_suffix(".parquet")
        try:
            bucket.download(url, local)
            if local.stat().st_size != size:
                raise ShardError(f"{url}: downloaded {local.stat().st_size:,} of {size:,} bytes (changed while read?)")
            bucket.download(url[: -len(".tar")] + ".parquet", table, optional=True)
            # Member paths are checked against the scratch copy: the same rules as for a local shard.
            builder = SourceBuilder(source=source, images_root=scratch)  # type: ignore[arg-type]
            rows = ShardRows(relative, size, builder, sha256=bucket.file_sha256(local))
            _read_shard(local, rules, rows)
        except ShardError as exc:  # name the shard the user has, not its temporary copy
            raise ShardError(str(exc).replace(str(local), url)) from None
        finally:
            local.unlink(missing_ok=True)
            table.unlink(missing_ok=True)
        yield rows


def _read_shard(shard: Path, rules: _Rules, rows: ShardRows) -> None:
    builder = rows.builder
    members, rows.truncated = index_shard(shard)
    reader = _ShardReader(shard)
    try:
        samples = _group(members)
        del members
        for key, sample in samples.items():
            row = f"shard {rows.path}, sample {key!r}"
            where = builder.where(row)
            if sample.image is None:
                builder.dropped.append(DroppedRow(row, "no image member (jpg, jpeg, png or webp)", key))
                continue
            metadata = reader.metadata(sample.texts.get("json"), where)
            split = rules.split(key, metadata.get(rules.split_field), where)
            image = rows.add_image(key, sample.image.name, sample.image.offset, sample.image.size, split, row)
            caption = reader.text(sample.texts["txt"], where) if "txt" in sample.texts else metadata.get(
                rules.caption_field)
            _add_captions(builder, image, caption, row)
    finally:
        reader.close()
    downloaded, rows.not_downloaded = _downloaded_table(shard, rules)
    for record in downloaded:
        key = str(record["key"])
        if key in samples:
            continue
        row = f"shard {rows.path}, sample {key!r} (listed in {shard.with_suffix('.parquet').name})"
        split = rules.split(key, record.get(rules.split_field), builder.where(row))
        image = rows.add_image(key, key, ABSENT, 0, split, row)
        _add_captions(builder, image, record.get(rules.caption_field), row)
        rows.missing_from_tar += 1


def _add_captions(builder, image: int, caption, row: str) -> None:
    """One caption, or each of a list of them; an empty list counts as a missing caption."""
    if not isinstance(caption, list):
        builder.caption(image, caption, row)
        return
    for position, text in enumerate(caption or [None]):
        builder.caption(image, text, f"{row}, caption {position}" if len(caption) > 1 else row)
