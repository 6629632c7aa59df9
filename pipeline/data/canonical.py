"""The canonical dataset: every source format is turned into the same two tables and a small JSON card.

Layout of a canonical directory (see docs/architecture.md):

- ``images.parquet``: image_id (dense 0..N-1, first appearance in the source), key (the source's own id, or
  the path when the source has none), path (POSIX, relative to the images root), split (train | val | test).
- ``captions.parquet``: caption_id (dense 0..M-1, source order), image_id, text, split (the image's split).
- ``dataset.json``: schema_version, name, images_root, fingerprint, counts, source (path, format, sha256 and
  the reader settings) and the rows that were dropped, each with its reason.
- ``tar_index.parquet``, for a WebDataset source only: where each image lies inside its tar shard
  (`pipeline.data.shards.TarIndex`); the ``path`` column then reads ``<shard>/<member>``.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import karpathy, tables, webdataset
from pipeline.data.rows import CAPTIONS_SCHEMA, IMAGES_SCHEMA, SPLITS, RootGuard, SourceBuilder
from pipeline.data.shards import TarIndex, TarMember, check_shard
from pipeline.errors import DsmdError

__all__ = [
    "SCHEMA_VERSION",
    "CanonicalDataset",
    "prepare_dataset",
    "load_or_prepare",
    "detect_format",
    "fingerprint_tables",
    "split_codes",
]

SCHEMA_VERSION = 1
IMAGES_FILE = "images.parquet"
CAPTIONS_FILE = "captions.parquet"
CARD_FILE = "dataset.json"
# Written by `dsmd data check`; removed by prepare whenever the content it describes changes.
BAD_IMAGES_FILE = "bad_images.parquet"
CHECK_REPORT_FILE = "check_report.json"
TAR_INDEX_FILE = "tar_index.parquet"


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


def split_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, tuple[str, ...]]:
    """A split column as int8 codes into the returned names: SPLITS first (code = SPLITS.index), then any other
    value in order of first appearance, which tables built by hand may hold and which is kept, not refused."""
    values = _combined(column).cast(pa.string()).dictionary_encode()
    dictionary = values.dictionary.to_pylist()
    names = (*SPLITS, *(value for value in dictionary if value not in SPLITS))
    if len(names) > 127:
        raise DsmdError(f"{len(names)} different split names; use {', '.join(SPLITS)}")
    mapping = np.asarray([names.index(value) for value in dictionary], dtype=np.int8)
    indices = values.indices.to_numpy(zero_copy_only=False)
    return (mapping[indices] if len(indices) else np.zeros(0, np.int8)), names


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One contiguous Arrow array (indexing a ChunkedArray searches its chunks on every call)."""
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column


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
        tar_index: TarIndex | None = None,
    ):
        self.images, self.captions = _check_tables(images, captions, name)
        self.name = name
        self.images_root = Path(images_root).resolve()
        # Extra facts from dataset.json (source, dropped rows); not part of the fingerprint.
        self.info = dict(info or {})
        self.directory = None if directory is None else Path(directory)
        self.fingerprint = fingerprint_tables(self.images, self.captions)
        # Splits as one-byte codes and paths left in Arrow: Python strings per row cost ~0.3 KB per image and
        # caption at 100k images (benchmarks/webdataset_scale), held by every stage and worker.
        self._image_split, self._image_split_names = split_codes(self.images.column("split"))
        self._caption_split, _ = split_codes(self.captions.column("split"))
        self._caption_image = self.captions.column("image_id").to_numpy().astype(np.int64)
        self._paths = _combined(self.images.column("path"))
        self._texts: list[str] | None = None
        # No directory cache: readers live long, and a symlink may change under them.
        self._guard = RootGuard(self.images_root)
        self.tar_index = tar_index
        self._shard_paths: list[Path] = []
        if tar_index is not None:
            if len(tar_index) != self.num_images:
                raise DsmdError(f"{name}: the tar index has {len(tar_index)} rows for {self.num_images} images")
            for shard in tar_index.shards:
                try:
                    self._shard_paths.append(Path(self._guard.resolve(shard)))
                except ValueError as exc:
                    raise DsmdError(f"{name}: shard {shard!r} {exc}") from None

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
        return np.flatnonzero(self._image_split == SPLITS.index(split)).astype(np.int64)

    def caption_ids(self, split: str | None = None) -> np.ndarray:
        """Caption ids (int64, ascending), of one split or all."""
        self._check_split(split)
        if split is None:
            return np.arange(self.num_captions, dtype=np.int64)
        return np.flatnonzero(self._caption_split == SPLITS.index(split)).astype(np.int64)

    def caption_image_ids(self) -> np.ndarray:
        """The image id of every caption row (int64, length num_captions); index it with caption ids."""
        return self._caption_image.copy()

    def split_of_image(self, image_id: int) -> str:
        return self._image_split_names[int(self._image_split[self._image_index(image_id)])]

    def _image_index(self, image_id: int) -> int:
        index = int(image_id)
        if not 0 <= index < self.num_images:
            raise DsmdError(f"{self.name}: image id {image_id} does not exist (0..{self.num_images - 1})")
        return index

    def image_relpath(self, image_id: int) -> str:
        return self._paths[self._image_index(image_id)].as_py()

    def image_path(self, image_id: int) -> Path:
        """The image file, resolved; checked again here in case a symlink changed after prepare."""
        relative = self.image_relpath(image_id)
        if self.tar_index is not None:
            raise DsmdError(f"{self.name}: image {image_id} lies inside a tar shard; read it through image_source")
        try:
            return Path(self._guard.resolve(relative))
        except ValueError as exc:
            raise DsmdError(f"{self.name}: image {image_id} ({relative!r}) {exc}") from None

    def image_source(self, image_id: int) -> Path | TarMember:
        """Where to read an image: its file, or its member in a tar shard (what `load_rgb` takes either way)."""
        if self.tar_index is None:
            return self.image_path(image_id)
        index, at = self.tar_index, self._image_index(image_id)
        shard = int(index.shard_of[at])
        return TarMember(
            shard=self._shard_paths[shard],
            name=index.member(at),
            offset=int(index.offsets[at]),
            size=int(index.sizes[at]),
            shard_size=index.shard_sizes[shard],
        )

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
                "images": int((self._image_split == code).sum()),
                "captions": int((self._caption_split == code).sum()),
            }
            for code, split in enumerate(SPLITS)
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
        if self.tar_index is not None:
            _write_atomic(directory / TAR_INDEX_FILE, lambda p: pq.write_table(self.tar_index.to_table(), p))
        else:
            (directory / TAR_INDEX_FILE).unlink(missing_ok=True)
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
            in_tars = card.get("source", {}).get("format") == "webdataset"
            tar_index = (
                TarIndex.from_table(pq.read_table(directory / TAR_INDEX_FILE), str(directory)) if in_tars else None
            )
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
            tar_index=tar_index,
        )
        if dataset.fingerprint != card.get("fingerprint"):
            raise DsmdError(
                f"{directory}: the tables do not match the fingerprint in {CARD_FILE} (changed by hand or an "
                "interrupted write); rerun `dsmd data prepare`"
            )
        dataset.check_shards()
        return dataset

    def check_shards(self) -> None:
        """For a dataset in tar shards: refuse, in one line, a shard that is missing or changed since it was
        indexed. Done on loading, so that no stage meets it first inside a loader or Dask worker."""
        if self.tar_index is not None:
            for path, size in zip(self._shard_paths, self.tar_index.shard_sizes, strict=True):
                check_shard(path, size)


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
    if source.is_dir() or (suffixes and suffixes[-1] == ".tar"):
        return "webdataset"
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
            f"{source}: cannot tell the format from the name; set data.format to one of karpathy, csv, jsonl, "
            "parquet, webdataset"
        )
    return fmt


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shards_digest(source: Path) -> str:
    """sha256 over the shards' and their tables' names, sizes and modification times: hashing the bytes of a
    100k-image WebDataset each time `dsmd data check` asks whether it is up to date would take minutes."""
    digest = hashlib.sha256()
    for shard in webdataset.list_shards(source):
        for path in (shard, shard.with_suffix(".parquet")):
            if path.exists():
                stat = path.stat()
                digest.update(f"{path.name}\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _source_record(cfg: Any, fmt: str) -> dict:
    source = Path(cfg.source).resolve()
    settings: dict[str, Any] = {}
    if fmt == "webdataset":
        settings = {
            "caption_column": cfg.caption_column,
            "split_column": cfg.split_column,
            "default_split": cfg.default_split,
            "hash_split_val": cfg.hash_split_val,
            "hash_split_test": cfg.hash_split_test,
        }
        return {"path": str(source), "format": fmt, "listing_sha256": _shards_digest(source), "settings": settings}
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
    if not (source.is_file() or (source.is_dir() and cfg.format in ("auto", "webdataset"))):
        raise DsmdError(f"data.source {cfg.source!r}: no such file; set data.source (or run `dsmd demo data`)")
    root = Path(cfg.images_root)
    if not root.is_dir():
        raise DsmdError(f"data.images_root {cfg.images_root!r}: no such directory; set data.images_root")
    return source, root, detect_format(source, cfg.format)


def prepare_dataset(cfg: Any) -> CanonicalDataset:
    """Read ``cfg.source`` (a `DataConfig`), check every row and write the canonical directory."""
    source, root, fmt = _checked_inputs(cfg)
    _refuse_file_in_the_way(Path(cfg.canonical_dir))  # before reading a source that may take minutes
    builder = SourceBuilder(source=source, images_root=root)
    tar_index, extra = None, {}
    if fmt == "karpathy":
        karpathy.read_karpathy(source, builder)
    elif fmt == "webdataset":
        tar_index, summary = webdataset.read_webdataset_source(source, cfg, builder)
        extra = {"webdataset": summary.to_dict()}
    else:
        tables.read_table_source(source, fmt, cfg, builder)
    images, captions = builder.tables()
    dropped = [row.to_dict() for row in builder.dropped]
    del builder  # its per-row lists and lookup dicts (~1 KB per image) are not needed once the tables exist
    info = {
        "source": _source_record(cfg, fmt),
        "images_root_given": str(cfg.images_root),
        "dropped": dropped,
        **extra,
    }
    dataset = CanonicalDataset(images, captions, name=cfg.name, images_root=root, info=info, tar_index=tar_index)
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
