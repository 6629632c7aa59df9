"""A canonical directory read a batch at a time: what a pass over every row (`dsmd data check`) needs, without
holding the tables. Memory is one batch whatever the dataset's size, where `CanonicalDataset` (random access by
id, which the training stages need) holds the tables whole.

Opening it checks what loading a `CanonicalDataset` checks: the fingerprint, computed from the files a batch at a
time, matches the card, the ids are dense, and every tar shard is where and as large as it was when indexed.
It offers the same pass methods as `CanonicalDataset`: `image_refs`, `locate`, `caption_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.files import CAPTIONS_FILE, IMAGES_FILE, TAR_INDEX_FILE, read_card
from pipeline.data.fingerprint import fingerprint_files
from pipeline.data.refs import ImageRef, Locator, root_location, shard_cache_for
from pipeline.data.shards import TAR_INDEX_SCHEMA, TarMember, shards_from_metadata
from pipeline.errors import DsmdError

__all__ = ["CanonicalScan"]


class CanonicalScan:
    def __init__(self, directory: str | Path, images_root: str | Path | None = None):
        self.directory = Path(directory)
        card = read_card(self.directory)
        self._card = card
        self.name = str(card.get("name", self.directory.name))
        self.images_root = root_location(images_root if images_root is not None else card["images_root"])
        self.info = {k: v for k, v in card.items() if k != "counts"}
        self.fingerprint, self.num_images, self.num_captions = fingerprint_files(
            self.directory / IMAGES_FILE, self.directory / CAPTIONS_FILE, str(self.directory))
        if self.fingerprint != card.get("fingerprint"):
            raise DsmdError(f"{self.directory}: the tables do not match the fingerprint in dataset.json (changed by "
                            "hand or an interrupted write); rerun `dsmd data prepare`")
        self._tar_path = self.directory / TAR_INDEX_FILE
        shards = sizes = shas = None
        if card.get("source", {}).get("format") == "webdataset":
            try:
                index = pq.ParquetFile(self._tar_path)
                shards, sizes, shas = shards_from_metadata(index.metadata.metadata, str(self.directory))
                rows = index.metadata.num_rows
            except (OSError, pa.ArrowInvalid) as exc:
                raise DsmdError(f"{self._tar_path}: unreadable ({exc}); rerun `dsmd data prepare`") from None
            if rows != self.num_images:
                raise DsmdError(f"{self.name}: the tar index has {rows} rows for {self.num_images} images")
        self._shard_names = shards or []
        self._locator = Locator(self.name, self.images_root, shards, sizes, shas)
        self._locator.check_shards()

    def use_shard_cache(self, cache) -> None:
        """Read shards in a bucket whole through ``cache`` (a scan reads them in order): see
        `CanonicalDataset.use_shard_cache`."""
        self._locator.use_shard_cache(shard_cache_for(self._locator.remote_bytes(), cache, in_order=True))

    @property
    def dropped(self) -> list[dict]:
        return list(self.info.get("dropped", []))

    def card(self) -> dict:
        return dict(self._card)

    def counts(self) -> dict:
        return self._card["counts"]

    def image_relpaths(self, image_ids: list[int]) -> list[str]:
        """The paths of a few images, in the order given (one pass over the table: not for random access)."""
        wanted = set(image_ids)
        found: dict[int, str] = {}
        for batch in self.image_refs():
            found.update((ref.image_id, ref.relpath) for ref in batch if ref.image_id in wanted)
        return [found[i] for i in image_ids]

    def image_refs(self, batch_rows: int = 8192) -> Iterator[list[ImageRef]]:
        """Every image row in id order. In tar shards the path is ``<shard>/<member>`` (as prepare writes it),
        so the tar index alone gives both."""
        if not self._locator.in_tars:
            start = 0
            for batch in pq.ParquetFile(self.directory / IMAGES_FILE).iter_batches(batch_rows, columns=["path"]):
                paths = batch.column(0).to_pylist()
                yield [ImageRef(start + i, path) for i, path in enumerate(paths)]
                start += len(paths)
            return
        names = self._shard_names
        columns = TAR_INDEX_SCHEMA.names
        for batch in pq.ParquetFile(self._tar_path).iter_batches(batch_rows, columns=columns):
            ids, shards, members, offsets, sizes = (batch.column(n).to_pylist() for n in columns)
            yield [ImageRef(i, f"{names[s]}/{m}", s, m, o, z)
                   for i, s, m, o, z in zip(ids, shards, members, offsets, sizes, strict=True)]

    def locate(self, ref: ImageRef) -> Path | TarMember:
        return self._locator.source(ref)

    def caption_batches(self, batch_rows: int = 8192, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """caption_id, image_id, text, split (or ``columns``), a batch at a time."""
        names = columns or ["caption_id", "image_id", "text", "split"]
        yield from pq.ParquetFile(self.directory / CAPTIONS_FILE).iter_batches(batch_rows, columns=names)
