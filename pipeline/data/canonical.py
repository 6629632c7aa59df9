"""The canonical dataset: every source format is turned into the same two tables and a small JSON card.

Layout of a canonical directory (see docs/architecture.md):

- ``images.parquet``: image_id (dense 0..N-1, first appearance in the source), key (the source's own id, or
  the path when the source has none), path (POSIX, relative to the images root), split (train | val | test).
- ``captions.parquet``: caption_id (dense 0..M-1, source order), image_id, text, split (the image's split).
- ``dataset.json``: schema_version, name, images_root, fingerprint, counts, source (path, format, sha256 and
  the reader settings) and the rows that were dropped, each with its reason.

Decisions:
- An image whose captions were all dropped stays an image row: it is still part of the gallery that
  text-to-image retrieval searches. `dsmd data check` reports it, and image-to-text evaluation has no query
  for it.
- The fingerprint covers the tables only (ids, keys, paths, splits, texts), not the name or images root, so
  moving the images does not invalidate extracted features, while any change of content does.
- Image paths never leave the images root: '..' components, absolute paths outside the root and symlinks
  that point outside are refused when the dataset is prepared and again when a path is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DsmdError

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "CanonicalDataset",
    "SourceBuilder",
    "prepare_dataset",
    "load_or_prepare",
    "detect_format",
    "fingerprint_tables",
    "normalize_split",
    "resolve_under_root",
]

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
# Spellings of the three splits found in the wild. Karpathy's "restval" (COCO) is training data.
_SPLIT_ALIASES = {
    "train": "train",
    "restval": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
IMAGES_FILE = "images.parquet"
CAPTIONS_FILE = "captions.parquet"
CARD_FILE = "dataset.json"
# Written by `dsmd data check`; removed by prepare whenever the content it describes changes.
BAD_IMAGES_FILE = "bad_images.parquet"
CHECK_REPORT_FILE = "check_report.json"

IMAGES_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("key", pa.string()), ("path", pa.string()), ("split", pa.string())]
)
CAPTIONS_SCHEMA = pa.schema(
    [("caption_id", pa.int64()), ("image_id", pa.int64()), ("text", pa.string()), ("split", pa.string())]
)


# --------------------------------------------------------------------------------------------- paths


class RootGuard:
    """Keeps image paths under one root, following symlinks.

    ``cache_dirs`` remembers each directory's real path: right while preparing (the files do not change
    meanwhile, and COCO has 123k images in two directories), wrong for long-lived readers, which leave it off.
    """

    def __init__(self, root: str | Path, cache_dirs: bool = False):
        self.root = os.path.realpath(root)
        self._prefix = self.root if self.root.endswith("/") else self.root + "/"
        self._real_dirs: dict[str, str] | None = {} if cache_dirs else None

    def contains(self, real_path: str) -> bool:
        return real_path == self.root or real_path.startswith(self._prefix)

    def _real_dir(self, directory: str) -> str:
        if self._real_dirs is None:
            return os.path.realpath(os.path.join(self.root, directory))
        real = self._real_dirs.get(directory)
        if real is None:
            real = self._real_dirs[directory] = os.path.realpath(os.path.join(self.root, directory))
        return real

    def resolve(self, relative: str) -> str:
        """The real path of ``root/relative``; ValueError when it lies outside the root."""
        directory, name = posixpath.split(relative)
        target = os.path.join(self._real_dir(directory), name)
        if os.path.islink(target):
            target = os.path.realpath(target)
        if not self.contains(target):
            raise ValueError(f"resolves to {target}, outside the images root {self.root}")
        return target


def resolve_under_root(root: Path, relative: str) -> Path:
    """``root / relative`` resolved (symlinks followed); raise ValueError if it ends up outside ``root``."""
    return Path(RootGuard(root).resolve(relative))


def normalize_image_path(raw: Any, guard: RootGuard, where: str) -> str:
    """Check one image path from a source row and return it as a clean POSIX path relative to the root.

    ``where`` names the source file and row for the error message.
    """
    fix = "write image paths relative to data.images_root, without '..'"
    if not isinstance(raw, str):
        raise DsmdError(f"{where}: image path must be a string, got {type(raw).__name__} {raw!r}")
    text = raw.strip()
    if not text:
        raise DsmdError(f"{where}: empty image path; every row needs one")
    if "\x00" in text:
        raise DsmdError(f"{where}: image path {raw!r} contains a NUL character")
    if text.startswith("/"):
        # Resolve the directory only: a symlinked file keeps its own name (and is checked below).
        directory, name = posixpath.split(text)
        real = os.path.join(os.path.realpath(directory or "/"), name)
        if not guard.contains(real) or real == guard.root:
            raise DsmdError(f"{where}: absolute image path {raw!r} is outside the images root {guard.root}; {fix}")
        text = real[len(guard._prefix) :]
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise DsmdError(f"{where}: image path {raw!r} uses '..' to leave the images root; {fix}")
    if not parts:
        raise DsmdError(f"{where}: image path {raw!r} names the images root itself, not a file")
    relative = "/".join(parts)
    try:
        guard.resolve(relative)
    except ValueError as exc:
        raise DsmdError(
            f"{where}: image path {raw!r} {exc} (through a symlink); copy the image under the root or "
            "point data.images_root at a directory that contains it"
        ) from None
    return relative


def normalize_split(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DsmdError(f"{where}: split must be a string, got {type(value).__name__} {value!r}")
    split = _SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        allowed = ", ".join(sorted(_SPLIT_ALIASES))
        raise DsmdError(f"{where}: unknown split {value!r}; use one of {allowed}")
    return split


# ------------------------------------------------------------------------------------------ builder


@dataclass
class DroppedRow:
    where: str
    reason: str
    image_key: str | None = None

    def to_dict(self) -> dict:
        return {"where": self.where, "reason": self.reason, "image_key": self.image_key}


@dataclass
class SourceBuilder:
    """Collects images and captions from a reader, checking each row as it arrives.

    Images are identified by key; a key seen again must come with the same path and split.
    """

    source: Path
    images_root: Path
    keys: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    caption_images: list[int] = field(default_factory=list)
    caption_texts: list[str] = field(default_factory=list)
    dropped: list[DroppedRow] = field(default_factory=list)
    _by_key: dict[str, int] = field(default_factory=dict)
    _by_path: dict[str, int] = field(default_factory=dict)
    # Tables repeat an image's path on every caption row; resolving it once is enough.
    _normalized: dict[str, str] = field(default_factory=dict)
    _guard: RootGuard | None = None

    def where(self, row: str) -> str:
        return f"{self.source}, {row}"

    def normalize_path(self, raw_path: Any, row: str) -> str:
        if isinstance(raw_path, str) and raw_path in self._normalized:
            return self._normalized[raw_path]
        if self._guard is None:
            self._guard = RootGuard(self.images_root, cache_dirs=True)
        relative = normalize_image_path(raw_path, self._guard, self.where(row))
        self._normalized[raw_path] = relative
        return relative

    def image(self, key: str, raw_path: Any, raw_split: Any, row: str, *, unique: bool = False) -> int:
        """Index of the image ``key`` (added on first sight). ``unique``: a repeated key is an error."""
        where = self.where(row)
        path = self.normalize_path(raw_path, row)
        split = normalize_split(raw_split, where)
        index = self._by_key.get(key)
        if index is not None:
            if unique:
                raise DsmdError(f"{where}: image id {key!r} appears twice; image ids must be unique")
            if self.paths[index] != path:
                raise DsmdError(
                    f"{where}: image id {key!r} has path {path!r} here but {self.paths[index]!r} earlier; "
                    "one id must always name the same file"
                )
            if self.splits[index] != split:
                raise DsmdError(
                    f"{where}: image id {key!r} is in split {split!r} here but {self.splits[index]!r} "
                    "earlier; all captions of an image belong to the image's split"
                )
            return index
        other = self._by_path.get(path)
        if other is not None:
            raise DsmdError(
                f"{where}: image path {path!r} already belongs to image id {self.keys[other]!r}; the same "
                f"file twice in the gallery makes retrieval ambiguous; give both rows the same image id"
            )
        index = len(self.keys)
        self._by_key[key] = index
        self._by_path[path] = index
        self.keys.append(key)
        self.paths.append(path)
        self.splits.append(split)
        return index

    def caption(self, image_index: int, text: Any, row: str) -> None:
        """Add a caption; a missing or blank one is dropped and recorded rather than failing the dataset."""
        if text is None:
            self.dropped.append(DroppedRow(row, "caption is missing (null)", self.keys[image_index]))
            return
        if not isinstance(text, str):
            raise DsmdError(f"{self.where(row)}: caption must be a string, got {type(text).__name__} {text!r}")
        cleaned = text.strip()
        if not cleaned:
            self.dropped.append(DroppedRow(row, "empty caption", self.keys[image_index]))
            return
        self.caption_images.append(image_index)
        self.caption_texts.append(cleaned)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        if not self.keys:
            raise DsmdError(f"{self.source}: no images found; is this the right file and format?")
        images = pa.table(
            {
                "image_id": pa.array(np.arange(len(self.keys), dtype=np.int64)),
                "key": pa.array(self.keys, pa.string()),
                "path": pa.array(self.paths, pa.string()),
                "split": pa.array(self.splits, pa.string()),
            },
            schema=IMAGES_SCHEMA,
        )
        image_ids = np.asarray(self.caption_images, dtype=np.int64)
        image_splits = np.asarray(self.splits, dtype=object)
        captions = pa.table(
            {
                "caption_id": pa.array(np.arange(len(image_ids), dtype=np.int64)),
                "image_id": pa.array(image_ids),
                "text": pa.array(self.caption_texts, pa.string()),
                "split": pa.array(image_splits[image_ids].tolist() if len(image_ids) else [], pa.string()),
            },
            schema=CAPTIONS_SCHEMA,
        )
        return images, captions


# -------------------------------------------------------------------------------------- fingerprint


def _hash_int_column(digest: Any, column: pa.ChunkedArray | pa.Array) -> None:
    values = np.asarray(column.to_numpy(), dtype="<i8")
    digest.update(len(values).to_bytes(8, "little"))
    digest.update(values.tobytes())


def _hash_string_column(digest: Any, column: pa.ChunkedArray | pa.Array) -> None:
    """Hash strings through Arrow's buffers: (relative int64 offsets, utf-8 bytes), no Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
    column = column.cast(pa.large_string())
    if column.null_count:
        raise DsmdError("canonical tables must not hold nulls")
    digest.update(len(column).to_bytes(8, "little"))
    if len(column) == 0:
        return
    _, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype="<i8", count=len(column) + 1, offset=column.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    digest.update((offsets - start).astype("<i8").tobytes())
    if data_buffer is not None:
        digest.update(memoryview(data_buffer)[start:end])


def fingerprint_tables(images: pa.Table, captions: pa.Table) -> str:
    """sha256 (hex) of the canonical content: every id, key, path, split and caption text, in row order."""
    digest = hashlib.sha256(f"dsmd-canonical-v{SCHEMA_VERSION}".encode())
    for table, schema in ((images, IMAGES_SCHEMA), (captions, CAPTIONS_SCHEMA)):
        for column in schema:
            digest.update(column.name.encode() + b"\x00")
            if pa.types.is_integer(column.type):
                _hash_int_column(digest, table.column(column.name))
            else:
                _hash_string_column(digest, table.column(column.name))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- the class


def _check_tables(images: pa.Table, captions: pa.Table, where: str) -> tuple[pa.Table, pa.Table]:
    """Cast to the canonical schemas and check the invariants other stages rely on."""
    try:
        images = images.select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA)
        captions = captions.select(CAPTIONS_SCHEMA.names).cast(CAPTIONS_SCHEMA)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DsmdError(
            f"{where}: canonical tables have the wrong columns ({exc}); rerun `dsmd data prepare`"
        ) from None
    image_ids = images.column("image_id").to_numpy()
    caption_ids = captions.column("caption_id").to_numpy()
    if not np.array_equal(image_ids, np.arange(len(image_ids))) or not np.array_equal(
        caption_ids, np.arange(len(caption_ids))
    ):
        raise DsmdError(f"{where}: ids are not dense 0..N-1 in row order; rerun `dsmd data prepare`")
    owners = captions.column("image_id").to_numpy()
    if len(owners) and (owners.min() < 0 or owners.max() >= len(image_ids)):
        raise DsmdError(f"{where}: a caption points at an image id that does not exist; rerun prepare")
    return images, captions


class CanonicalDataset:
    """The canonical tables plus what is needed to find the images; read-only once built."""

    def __init__(
        self,
        images: pa.Table,
        captions: pa.Table,
        *,
        name: str,
        images_root: str | Path,
        info: dict | None = None,
        directory: str | Path | None = None,
    ):
        self.images, self.captions = _check_tables(images, captions, name)
        self.name = name
        self.images_root = Path(images_root).resolve()
        # Extra facts from dataset.json (source, dropped rows); not part of the fingerprint.
        self.info = dict(info or {})
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = fingerprint_tables(self.images, self.captions)
        self._image_split = np.asarray(self.images.column("split").to_pylist(), dtype=object)
        self._caption_split = np.asarray(self.captions.column("split").to_pylist(), dtype=object)
        self._caption_image = self.captions.column("image_id").to_numpy().astype(np.int64)
        self._paths: list[str] = self.images.column("path").to_pylist()
        self._texts: list[str] | None = None
        # No directory cache: readers live long, and a symlink may change under them.
        self._guard = RootGuard(self.images_root)

    # ---------------------------------------------------------------- sizes and ids
    @property
    def num_images(self) -> int:
        return self.images.num_rows

    @property
    def num_captions(self) -> int:
        return self.captions.num_rows

    @property
    def dropped(self) -> list[dict]:
        return list(self.info.get("dropped", []))

    def _check_split(self, split: str | None) -> None:
        if split is not None and split not in SPLITS:
            raise DsmdError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")

    def image_ids(self, split: str | None = None) -> np.ndarray:
        """Image ids (int64, ascending), of one split or all."""
        self._check_split(split)
        if split is None:
            return np.arange(self.num_images, dtype=np.int64)
        return np.flatnonzero(self._image_split == split).astype(np.int64)

    def caption_ids(self, split: str | None = None) -> np.ndarray:
        """Caption ids (int64, ascending), of one split or all."""
        self._check_split(split)
        if split is None:
            return np.arange(self.num_captions, dtype=np.int64)
        return np.flatnonzero(self._caption_split == split).astype(np.int64)

    def caption_image_ids(self) -> np.ndarray:
        """The image id of every caption row (int64, length num_captions); index it with caption ids."""
        return self._caption_image.copy()

    def split_of_image(self, image_id: int) -> str:
        return str(self._image_split[self._image_index(image_id)])

    def _image_index(self, image_id: int) -> int:
        index = int(image_id)
        if not 0 <= index < self.num_images:
            raise DsmdError(f"{self.name}: image id {image_id} does not exist (0..{self.num_images - 1})")
        return index

    def image_relpath(self, image_id: int) -> str:
        return self._paths[self._image_index(image_id)]

    def image_path(self, image_id: int) -> Path:
        """The image file, resolved; checked again here in case a symlink changed after prepare."""
        relative = self.image_relpath(image_id)
        try:
            return Path(self._guard.resolve(relative))
        except ValueError as exc:
            raise DsmdError(f"{self.name}: image {image_id} ({relative!r}) {exc}") from None

    def texts(self, caption_ids: Sequence[int] | np.ndarray) -> list[str]:
        if self._texts is None:
            self._texts = self.captions.column("text").to_pylist()
        ids = np.asarray(caption_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_captions):
            raise DsmdError(f"{self.name}: caption ids must be in 0..{self.num_captions - 1}")
        return [self._texts[i] for i in ids.tolist()]

    def counts(self) -> dict:
        per_split = {
            split: {
                "images": int((self._image_split == split).sum()),
                "captions": int((self._caption_split == split).sum()),
            }
            for split in SPLITS
        }
        return {
            "images": self.num_images,
            "captions": self.num_captions,
            "splits": per_split,
            "dropped_rows": len(self.dropped),
        }

    # ---------------------------------------------------------------- files
    def card(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "images_root": str(self.images_root),
            "fingerprint": self.fingerprint,
            "counts": self.counts(),
            **{
                k: v
                for k, v in self.info.items()
                if k not in ("schema_version", "name", "images_root", "fingerprint", "counts")
            },
        }

    def save(self, directory: str | Path) -> Path:
        """Write the three files. dataset.json goes last, so a crash leaves a directory load() refuses."""
        directory = _make_directory(Path(directory))
        previous = _read_card(directory) if (directory / CARD_FILE).exists() else None
        _write_atomic(directory / IMAGES_FILE, lambda p: pq.write_table(self.images, p))
        _write_atomic(directory / CAPTIONS_FILE, lambda p: pq.write_table(self.captions, p))
        if (
            previous is None
            or previous.get("fingerprint") != self.fingerprint
            or previous.get("images_root") != str(self.images_root)
        ):
            # An earlier check describes other content (or other files): it must not be trusted.
            for stale in (BAD_IMAGES_FILE, CHECK_REPORT_FILE):
                (directory / stale).unlink(missing_ok=True)
        text = json.dumps(self.card(), indent=2, ensure_ascii=False) + "\n"
        _write_atomic(directory / CARD_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))
        self.directory = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, images_root: str | Path | None = None) -> CanonicalDataset:
        """Read a canonical directory; ``images_root`` overrides the recorded one (images moved)."""
        directory = Path(directory)
        card = _read_card(directory)
        try:
            images = pq.read_table(directory / IMAGES_FILE)
            captions = pq.read_table(directory / CAPTIONS_FILE)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DsmdError(
                f"{directory}: cannot read the canonical tables ({exc}); rerun `dsmd data prepare`"
            ) from None
        dataset = cls(
            images,
            captions,
            name=str(card.get("name", directory.name)),
            images_root=images_root if images_root is not None else card["images_root"],
            info={k: v for k, v in card.items() if k not in ("counts",)},
            directory=directory,
        )
        if dataset.fingerprint != card.get("fingerprint"):
            raise DsmdError(
                f"{directory}: the tables do not match the fingerprint in {CARD_FILE} (changed by hand or an "
                "interrupted write); rerun `dsmd data prepare`"
            )
        return dataset


def _refuse_file_in_the_way(directory: Path) -> None:
    """A file where the canonical directory (or one of its parents) should be is refused in one line."""
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == directory else f"lies under {str(path)!r}, which is a file"
                raise DsmdError(
                    f"data.canonical_dir {str(directory)!r} {what}, not a directory; set data.canonical_dir "
                    "to a directory path (or move the file away)"
                )
            return


def _make_directory(directory: Path) -> Path:
    _refuse_file_in_the_way(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DsmdError(
            f"data.canonical_dir {str(directory)!r}: cannot create it ({exc.strerror or exc}); set "
            "data.canonical_dir to a writable directory"
        ) from None
    return directory


def _write_atomic(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _read_card(directory: Path) -> dict:
    card_path = directory / CARD_FILE
    if not card_path.exists():
        raise DsmdError(f"{directory}: no canonical dataset here ({CARD_FILE} missing); run `dsmd data prepare`")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DsmdError(f"{card_path}: unreadable ({exc}); rerun `dsmd data prepare`") from None
    if not isinstance(card, dict) or card.get("schema_version") != SCHEMA_VERSION:
        raise DsmdError(
            f"{card_path}: schema version {card.get('schema_version') if isinstance(card, dict) else '?'} is not "
            f"{SCHEMA_VERSION}; rerun `dsmd data prepare`"
        )
    if "images_root" not in card or "fingerprint" not in card:
        raise DsmdError(f"{card_path}: incomplete card; rerun `dsmd data prepare`")
    return card


# ------------------------------------------------------------------------------------------ prepare


def detect_format(source: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffixes = [s.lower() for s in source.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        raise DsmdError(f"{source}: compressed sources are not read directly; decompress it first")
    by_suffix = {
        ".json": "karpathy",
        ".csv": "csv",
        ".tsv": "csv",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
        ".parquet": "parquet",
        ".pq": "parquet",
    }
    fmt = by_suffix.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise DsmdError(
            f"{source}: cannot tell the format from the name; set data.format to one of karpathy, csv, jsonl, parquet"
        )
    return fmt


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_record(cfg: Any, fmt: str) -> dict:
    source = Path(cfg.source).resolve()
    settings: dict[str, Any] = {}
    if fmt != "karpathy":
        settings = {
            "image_column": cfg.image_column,
            "caption_column": cfg.caption_column,
            "image_id_column": cfg.image_id_column,
            "split_column": cfg.split_column,
            "default_split": getattr(cfg, "default_split", ""),
        }
    return {"path": str(source), "format": fmt, "sha256": _file_sha256(source), "settings": settings}


def _checked_inputs(cfg: Any) -> tuple[Path, Path, str]:
    source = Path(cfg.source)
    if not source.is_file():
        raise DsmdError(f"data.source {cfg.source!r}: no such file; set data.source (or run `dsmd data demo`)")
    root = Path(cfg.images_root)
    if not root.is_dir():
        raise DsmdError(f"data.images_root {cfg.images_root!r}: no such directory; set data.images_root")
    return source, root, detect_format(source, cfg.format)


def prepare_dataset(cfg: Any) -> CanonicalDataset:
    """Read ``cfg.source`` (a `DataConfig`), check every row and write the canonical directory."""
    from pipeline.data import karpathy, tables

    source, root, fmt = _checked_inputs(cfg)
    _refuse_file_in_the_way(Path(cfg.canonical_dir))  # before reading a source that may take minutes
    builder = SourceBuilder(source=source, images_root=root)
    if fmt == "karpathy":
        karpathy.read_karpathy(source, builder)
    else:
        tables.read_table_source(source, fmt, cfg, builder)
    images, captions = builder.tables()
    info = {
        "source": _source_record(cfg, fmt),
        "images_root_given": str(cfg.images_root),
        "dropped": [row.to_dict() for row in builder.dropped],
    }
    dataset = CanonicalDataset(images, captions, name=cfg.name, images_root=root, info=info)
    dataset.save(cfg.canonical_dir)
    return dataset


def is_up_to_date(cfg: Any) -> bool:
    """Whether cfg.canonical_dir was prepared from the same source bytes, settings, name and images root."""
    directory = Path(cfg.canonical_dir)
    try:
        card = _read_card(directory)
        source, root, fmt = _checked_inputs(cfg)
    except DsmdError:
        return False
    recorded = card.get("source", {})
    return (
        card.get("name") == cfg.name
        and card.get("images_root") == str(root.resolve())
        and recorded == _source_record(cfg, fmt)
    )


def load_or_prepare(cfg: Any) -> tuple[CanonicalDataset, bool]:
    """The canonical dataset for ``cfg``: loaded when up to date, else prepared. Returns (dataset, prepared)."""
    if is_up_to_date(cfg):
        try:
            return CanonicalDataset.load(cfg.canonical_dir), False
        except DsmdError:
            pass
    return prepare_dataset(cfg), True
