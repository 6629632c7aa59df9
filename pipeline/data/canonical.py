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

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import bucket, karpathy, tables, webdataset
from pipeline.data.files import (
    BAD_IMAGES_FILE,
    CAPTIONS_FILE,
    CARD_FILE,
    CHECK_REPORT_FILE,
    IMAGES_FILE,
    TAR_INDEX_FILE,
    commit,
    make_card,
    make_directory,
    read_card,
    refuse_file_in_the_way,
    staged_path,
)
from pipeline.data.fingerprint import SCHEMA_VERSION, fingerprint_tables
from pipeline.data.refs import ImageRef, Locator, root_location, shard_cache_for
from pipeline.data.rows import CAPTIONS_SCHEMA, IMAGES_SCHEMA, SPLITS, SourceBuilder
from pipeline.data.scan import CanonicalScan
from pipeline.data.shards import TarIndex, TarMember
from pipeline.data.streamed import write_streamed
from pipeline.errors import DsmdError

__all__ = [
    "BAD_IMAGES_FILE",
    "CARD_FILE",
    "CHECK_REPORT_FILE",
    "TAR_INDEX_FILE",
    "SCHEMA_VERSION",
    "CanonicalDataset",
    "prepare",
    "prepare_dataset",
    "load_or_prepare",
    "scan_or_prepare",
    "detect_format",
    "fingerprint_tables",
    "split_codes",
]

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
        self.images_root = root_location(images_root)
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
        self.tar_index = tar_index
        if tar_index is not None and len(tar_index) != self.num_images:
            raise DsmdError(f"{name}: the tar index has {len(tar_index)} rows for {self.num_images} images")
        self._locator = Locator(name, self.images_root, None if tar_index is None else tar_index.shards,
                                None if tar_index is None else tar_index.shard_sizes,
                                None if tar_index is None else tar_index.shard_sha256)

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

    def image_relpaths(self, image_ids: list[int]) -> list[str]:
        return [self.image_relpath(i) for i in image_ids]

    def image_path(self, image_id: int) -> Path:
        """The image file, resolved; checked again here in case a symlink changed after prepare."""
        return self._locator.path(image_id, self.image_relpath(image_id))

    def image_source(self, image_id: int) -> Path | TarMember:
        """Where to read an image: its file, or its member in a tar shard (what `load_rgb` takes either way)."""
        return self._locator.source(self._ref(self._image_index(image_id)))

    def _ref(self, at: int) -> ImageRef:
        index = self.tar_index
        if index is None:
            return ImageRef(at, self._paths[at].as_py())
        return ImageRef(at, self._paths[at].as_py(), int(index.shard_of[at]), index.member(at),
                        int(index.offsets[at]), int(index.sizes[at]))

    # ---------------------------------------------------------------- passes over every row (as CanonicalScan)
    def image_refs(self, batch_rows: int = 8192) -> Iterator[list[ImageRef]]:
        for start in range(0, self.num_images, batch_rows):
            yield [self._ref(at) for at in range(start, min(start + batch_rows, self.num_images))]

    def locate(self, ref: ImageRef) -> Path | TarMember:
        return self._locator.source(ref)

    def caption_batches(self, batch_rows: int = 8192, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """caption_id, image_id, text, split (or ``columns``), a batch at a time."""
        table = self.captions if columns is None else self.captions.select(columns)
        yield from table.to_batches(max_chunksize=batch_rows)

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
        return make_card(self.name, self.images_root, self.fingerprint, self.counts(), self.info)

    def save(self, directory: str | Path) -> Path:
        """Write the three files. dataset.json goes last, so a crash leaves a directory load() refuses."""
        directory = make_directory(Path(directory))
        staged: dict[str, Path | None] = {}
        for name, table in ((IMAGES_FILE, self.images), (CAPTIONS_FILE, self.captions),
                            (TAR_INDEX_FILE, None if self.tar_index is None else self.tar_index.to_table())):
            staged[name] = None if table is None else staged_path(directory, name)
            if table is not None:
                pq.write_table(table, staged[name])
        commit(directory, staged, self.card())
        self.directory = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path, images_root: str | Path | None = None) -> CanonicalDataset:
        """Read a canonical directory; ``images_root`` overrides the recorded one (images moved)."""
        directory = Path(directory)
        card = read_card(directory)
        try:
            images = pq.read_table(directory / IMAGES_FILE)
            captions = pq.read_table(directory / CAPTIONS_FILE)
            in_tars = card.get("source", {}).get("format") == "webdataset"
            tar_index = (
                TarIndex.read(directory / TAR_INDEX_FILE, str(directory)) if in_tars else None
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
        """For a dataset in tar shards: refuse, in one line, a shard that is missing or changed since indexing."""
        self._locator.check_shards()

    def use_shard_cache(self, cache, *, in_order: bool) -> None:
        """How to read shards in a bucket from now on (pipeline/data/bucket.py): whole, through ``cache`` (a
        store.remote.ShardCache), when the stage reads them ``in_order`` or they all fit it; else a ranged GET
        per image. Nothing changes for local files and shards."""
        self._locator.use_shard_cache(shard_cache_for(self._locator.remote_bytes(), cache, in_order=in_order))


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


def _shards_digest(source: Path | str) -> str:
    """sha256 over the shards' and their tables' names, sizes and modification times (ETags in a bucket): hashing
    the bytes of a 100k-image WebDataset each time `dsmd data check` asks whether it is up to date would take
    minutes."""
    digest = hashlib.sha256()
    if bucket.is_url(source):
        for row in bucket.listing_digest_rows(str(source)):
            digest.update(row.encode() + b"\n")
        return digest.hexdigest()
    for shard in webdataset.list_shards(source):
        for path in (shard, shard.with_suffix(".parquet")):
            if path.exists():
                stat = path.stat()
                digest.update(f"{path.name}\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _source_record(cfg: Any, fmt: str) -> dict:
    source = bucket.root_url(cfg.source, "data.source") if bucket.is_url(cfg.source) else Path(cfg.source).resolve()
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
    return {"path": str(source), "format": fmt, "sha256": bucket.file_sha256(source), "settings": settings}


def _checked_inputs(cfg: Any) -> tuple[Path | str, Path | str, str]:
    if bucket.is_url(cfg.source) or bucket.is_url(cfg.images_root):
        return _checked_bucket_inputs(cfg)
    source = Path(cfg.source)
    if not (source.is_file() or (source.is_dir() and cfg.format in ("auto", "webdataset"))):
        raise DsmdError(f"data.source {cfg.source!r}: no such file; set data.source (or run `dsmd demo data`)")
    root = Path(cfg.images_root)
    if not root.is_dir():
        raise DsmdError(f"data.images_root {cfg.images_root!r}: no such directory; set data.images_root")
    return source, root, detect_format(source, cfg.format)


def _checked_bucket_inputs(cfg: Any) -> tuple[str, str, str]:
    """WebDataset shards in a bucket (pipeline/data/bucket.py): source and images root are both s3:// URLs."""
    if not (bucket.is_url(cfg.source) and bucket.is_url(cfg.images_root)):
        raise DsmdError(
            f"data.source {cfg.source!r} and data.images_root {cfg.images_root!r}: shards in a bucket need both to be "
            "s3:// URLs, the root a prefix of the source (e.g. s3://bucket/shards for both)"
        )
    if cfg.format not in ("auto", "webdataset"):
        raise DsmdError(f"data.format {cfg.format!r}: only WebDataset shards are read from a bucket; set it to "
                        "webdataset (or auto)")
    source = bucket.root_url(cfg.source, "data.source")
    root = bucket.root_url(cfg.images_root, "data.images_root")
    if source != root:
        bucket.relative_to_root(source, root, "data.source")
    return source, root, "webdataset"


def prepare(cfg: Any) -> Path:
    """Read ``cfg.source`` (a `DataConfig`), check every row and write the canonical directory; return it.

    A WebDataset source is read shard by shard and written as it goes (pipeline/data/streamed.py): its memory is
    one shard's, for sources of any size. The table formats are read whole by their readers, so the tables are
    built in memory."""
    source, root, fmt = _checked_inputs(cfg)
    directory = Path(cfg.canonical_dir)
    refuse_file_in_the_way(directory)  # before reading a source that may take minutes
    info = {"source": _source_record(cfg, fmt), "images_root_given": str(cfg.images_root)}
    if fmt == "webdataset":
        make_directory(directory)
        # Shards in a bucket are downloaded one at a time to be indexed: beside the canonical directory's files,
        # where there is room for them (a temporary directory may be small).
        scratch = tempfile.TemporaryDirectory(prefix=".download-", dir=directory) if bucket.is_url(source) else None
        with scratch or contextlib.nullcontext():
            shards = webdataset.iter_shards(source, root, cfg, scratch=Path(scratch.name) if scratch else None)
            write_streamed(shards, directory, name=cfg.name, source=source, images_root=root_location(root),
                           info=info)
        return directory
    _build_in_memory(cfg, source, root, fmt, info).save(directory)
    return directory


def _build_in_memory(cfg: Any, source: Path, root: Path, fmt: str, info: dict) -> CanonicalDataset:
    builder = SourceBuilder(source=source, images_root=root)
    if fmt == "karpathy":
        karpathy.read_karpathy(source, builder)
    else:
        tables.read_table_source(source, fmt, cfg, builder)
    images, captions = builder.tables()
    info = {**info, "dropped": [row.to_dict() for row in builder.dropped]}
    del builder  # its per-row lists and lookup dicts (~1 KB per image) are not needed once the tables exist
    return CanonicalDataset(images, captions, name=cfg.name, images_root=root, info=info)


def prepare_dataset(cfg: Any) -> CanonicalDataset:
    """`prepare`, then the dataset in memory (as `CanonicalDataset.load` gives it)."""
    return CanonicalDataset.load(prepare(cfg))


def is_up_to_date(cfg: Any) -> bool:
    """Whether cfg.canonical_dir was prepared from the same source bytes, settings, name and images root."""
    directory = Path(cfg.canonical_dir)
    try:
        card = read_card(directory)
        source, root, fmt = _checked_inputs(cfg)
    except DsmdError:
        return False
    recorded = card.get("source", {})
    return (
        card.get("name") == cfg.name
        and card.get("images_root") == str(root_location(root))
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


def scan_or_prepare(cfg: Any) -> tuple[CanonicalScan, bool]:
    """As `load_or_prepare`, but the dataset opened for a pass over every row (`CanonicalScan`), not held."""
    if is_up_to_date(cfg):
        try:
            return CanonicalScan(cfg.canonical_dir), False
        except DsmdError:
            pass
    return CanonicalScan(prepare(cfg)), True
