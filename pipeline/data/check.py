"""Scan a canonical dataset: decode every image, look at every caption, and record what is wrong.

Bad images are written to ``bad_images.parquet`` in the canonical directory (tagged with the dataset
fingerprint), so that extraction skips exactly the images the check found, and says why.
Nothing found here is fatal: a dataset with bad images is still checked completely and later stages skip them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.files import BAD_IMAGES_FILE, CARD_FILE, CHECK_REPORT_FILE
from pipeline.data.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, BadImageError, DecodeMemory, load_rgb
from pipeline.data.refs import ImageRef
from pipeline.data.rows import SPLITS
from pipeline.data.shards import ShardError
from pipeline.data.spill import BUFFER_ROWS, SpilledGroups
from pipeline.errors import DsmdError

__all__ = ["BadImage", "CaptionWarning", "CheckReport", "check_dataset", "load_bad_images", "caption_warnings"]

# Teachers truncate captions at 64 tokens; a caption of more words than that is certainly cut.
LONG_CAPTION_WORDS = 64
# Decodes running at once may hold this much between them (by `decode_cost`): eight threads of ordinary photos
# run side by side, while a few very large images in a row decode a handful at a time instead of all eight.
DEFAULT_DECODE_MEMORY = 2 * 2**30
# Captions turned into Python strings at once by the caption checks: enough to amortise the per-batch work.
_TEXT_BATCH = 8192
_BAD_SCHEMA = pa.schema([("image_id", pa.int64()), ("path", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class BadImage:
    image_id: int
    path: str
    reason: str


@dataclass(frozen=True)
class CaptionWarning:
    caption_id: int
    image_id: int
    kind: str  # "duplicate_in_image" | "shared_across_images" | "long"
    detail: str


@dataclass
class CheckReport:
    name: str
    fingerprint: str
    num_images: int
    num_captions: int
    bad_images: list[BadImage] = field(default_factory=list)
    caption_warnings: list[CaptionWarning] = field(default_factory=list)
    images_without_captions: list[int] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    @property
    def num_good_images(self) -> int:
        return self.num_images - len(self.bad_images)

    def warning_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for warning in self.caption_warnings:
            counts[warning.kind] += 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_images": self.num_images,
            "num_captions": self.num_captions,
            "num_bad_images": len(self.bad_images),
            "warning_counts": self.warning_counts(),
            "bad_images": [asdict(b) for b in self.bad_images],
            "images_without_captions": self.images_without_captions,
            "dropped_rows": self.dropped,
            "caption_warnings": [asdict(w) for w in self.caption_warnings],
        }


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


_CAPTION_RECORD = np.dtype(
    [("hash", "<u8"), ("low", "<u8"), ("caption_id", "<i8"), ("image_id", "<i8"), ("split", "i1")]
)


class _SplitCodes:
    """Split names as int8 codes, the same in every batch: SPLITS first (code = SPLITS.index), then any other
    value in order of first appearance (tables built by hand may hold one; it is kept, not refused)."""

    def __init__(self):
        self.names = list(SPLITS)

    def codes(self, column: pa.Array) -> np.ndarray:
        values = column.cast(pa.string()).dictionary_encode()
        for name in values.dictionary.to_pylist():
            if name not in self.names:
                self.names.append(name)
        if len(self.names) > 127:
            raise DsmdError(f"{len(self.names)} different split names; use {', '.join(SPLITS)}")
        mapping = np.asarray([self.names.index(v) for v in values.dictionary.to_pylist()], dtype=np.int8)
        indices = values.indices.to_numpy(zero_copy_only=False)
        return mapping[indices] if len(indices) else np.zeros(0, np.int8)


def _text_records(batch: pa.RecordBatch, splits: _SplitCodes, long_words: int, on_long) -> np.ndarray:
    """128-bit blake2b of every normalized text of the batch (hash = its first half), with the caption's ids and
    split; ``on_long(caption_id, image_id, words)`` for each text of more than ``long_words`` words."""
    texts = batch.column("text").to_pylist()
    records = np.empty(len(texts), _CAPTION_RECORD)
    records["caption_id"] = batch.column("caption_id").to_numpy()
    records["image_id"] = batch.column("image_id").to_numpy()
    records["split"] = splits.codes(batch.column("split"))
    digests = bytearray()
    for row, text in enumerate(texts):
        digests += hashlib.blake2b(_normalized(text).encode("utf-8"), digest_size=16).digest()
        words = len(text.split())
        if words > long_words:
            on_long(int(records["caption_id"][row]), int(records["image_id"][row]), words)
    pairs = np.frombuffer(bytes(digests), dtype="<u8").reshape(-1, 2)
    records["hash"], records["low"] = pairs[:, 0], pairs[:, 1]
    return records


def _group_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal keys begins, given key columns already sorted together (bool per row)."""
    starts = np.ones(len(sorted_keys[0]), dtype=bool)
    for key in sorted_keys:
        starts[1:] &= key[1:] == key[:-1]
    starts[1:] = ~starts[1:]
    return starts


def _group_warnings(records: np.ndarray, names: list[str]) -> Iterator[CaptionWarning]:
    """The repeated-text warnings among ``records``, which hold every caption of the texts they hold."""
    caption, owner, high, low, split = (records[n] for n in ("caption_id", "image_id", "hash", "low", "split"))
    # Same image and text: every caption after the first of its group repeats it.
    order = np.lexsort((caption, low, high, owner))
    starts = _group_starts(owner[order], high[order], low[order])
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))] if len(order) else order
    for at, earlier in zip(order[~starts].tolist(), first[~starts].tolist(), strict=True):
        yield CaptionWarning(int(caption[at]), int(owner[at]), "duplicate_in_image",
                             f"same text as caption {int(caption[earlier])}")
    # Only where it makes the right answer ambiguous: in training data a common caption is normal.
    unique = np.zeros(len(records), dtype=bool)
    unique[order[starts]] = True
    candidates = np.flatnonzero(unique & (split != SPLITS.index("train")))
    order = candidates[np.lexsort((caption[candidates], low[candidates], high[candidates], split[candidates]))]
    starts = np.flatnonzero(_group_starts(split[order], high[order], low[order]))
    ends = np.append(starts[1:], len(order))[: len(starts)]
    for begin, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if end - begin > 1:
            images = owner[order[begin:end]].tolist()
            shown = ", ".join(map(str, images[:5])) + (", ..." if len(images) > 5 else "")
            yield CaptionWarning(int(caption[order[begin]]), images[0], "shared_across_images",
                                 f"same text on {len(images)} {names[int(split[order[begin]])]} images (ids {shown})")


def caption_warnings(dataset, long_words: int = LONG_CAPTION_WORDS, *,
                     spill_rows: int = BUFFER_ROWS) -> list[CaptionWarning]:
    """Duplicates inside one image, texts shared by several images of one evaluation split (val or test: the
    query then has several right answers) and very long captions. ``dataset``: a `CanonicalDataset` or a
    `CanonicalScan`.

    Texts are compared by a 128-bit hash of their normalized form (a chance collision needs ~2**64 captions),
    grouped by sorting fixed-size records. The records go through `SpilledGroups` (to disk past ``spill_rows``),
    so memory stays bounded however many captions there are; texts become Python strings a batch at a time.
    """
    warnings: list[CaptionWarning] = []

    def on_long(caption_id: int, image_id: int, words: int) -> None:
        warnings.append(CaptionWarning(caption_id, image_id, "long", f"{words} words; teachers truncate long captions"))

    splits = _SplitCodes()
    spill_dir = dataset.directory if dataset.directory is not None else Path(tempfile.gettempdir())
    with SpilledGroups(_CAPTION_RECORD, spill_dir, buffer_rows=spill_rows) as groups:
        for batch in dataset.caption_batches(_TEXT_BATCH):
            groups.add(_text_records(batch, splits, long_words, on_long))
        for records in groups.groups():
            warnings.extend(_group_warnings(records, splits.names))
    warnings.sort(key=lambda w: (w.caption_id, w.kind))
    return warnings


def _scan_images(dataset, workers: int, limits: dict, progress: bool) -> Iterator[tuple[ImageRef, str | None]]:
    def check_one(ref: ImageRef) -> tuple[ImageRef, str | None]:
        try:
            load_rgb(dataset.locate(ref), **limits)
        except BadImageError as exc:
            return ref, exc.reason
        except ShardError:
            raise  # a whole shard gone or changed: one line naming it, not thousands of bad images
        except DsmdError as exc:  # the path now leaves the root (a symlink changed since prepare)
            return ref, f"path outside the images root: {exc}"
        return ref, None

    refs = (ref for batch in dataset.image_refs() for ref in batch)
    # Pillow releases the GIL while decoding, so threads give real parallelism without pickling the dataset.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = _bounded_map(pool, check_one, refs, ahead=8 * workers)
        if not progress:
            yield from results
            return
        from pipeline.console import track

        yield from track(results, total=dataset.num_images, description="checking images")


def _bounded_map(pool: ThreadPoolExecutor, fn, items, ahead: int) -> Iterator:
    """pool.map in order, with at most ``ahead`` calls submitted and unread: Executor.map submits every item at
    once, a future per image held until read (about 2.6 KB per image at 100k images, benchmarks/webdataset_scale)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _images_without_captions(dataset) -> list[int]:
    with_captions = np.zeros(dataset.num_images, dtype=bool)
    for batch in dataset.caption_batches(1 << 16, columns=["image_id"]):
        with_captions[batch.column(0).to_numpy()] = True
    return np.flatnonzero(~with_captions).tolist()


def check_dataset(
    dataset,
    workers: int | None = None,
    *,
    progress: bool = True,
    write: bool = True,
    long_words: int = LONG_CAPTION_WORDS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    decode_memory: int = DEFAULT_DECODE_MEMORY,
    spill_rows: int = BUFFER_ROWS,
) -> CheckReport:
    """Decode every image and inspect every caption. With ``write``, store the results in the dataset's dir.

    ``dataset``: a `CanonicalDataset`, or a `CanonicalScan` (`dsmd data check`), which keeps memory bounded by a
    batch: the images are streamed, the captions grouped through `SpilledGroups` (``spill_rows``). What grows
    with the dataset is one byte per image (which have captions) and the problems found.
    ``decode_memory`` bounds the memory of the decodes running at once (see `DecodeMemory`).
    """
    workers = workers or min(8, os.cpu_count() or 1)
    limits = {"max_pixels": max_pixels, "max_decode_bytes": max_decode_bytes, "memory": DecodeMemory(decode_memory)}
    bad = [
        BadImage(ref.image_id, ref.relpath, reason)
        for ref, reason in _scan_images(dataset, workers, limits, progress)
        if reason is not None
    ]
    report = CheckReport(
        name=dataset.name,
        fingerprint=dataset.fingerprint,
        num_images=dataset.num_images,
        num_captions=dataset.num_captions,
        bad_images=bad,
        caption_warnings=caption_warnings(dataset, long_words, spill_rows=spill_rows),
        images_without_captions=_images_without_captions(dataset),
        dropped=dataset.dropped,
    )
    if write:
        if dataset.directory is None:
            raise DsmdError("the dataset has no canonical directory to write the check into; save it first")
        write_report(report, dataset.directory)
    return report


def write_report(report: CheckReport, directory: str | Path) -> None:
    directory = Path(directory)
    table = pa.table(
        {
            "image_id": pa.array([b.image_id for b in report.bad_images], pa.int64()),
            "path": pa.array([b.path for b in report.bad_images], pa.string()),
            "reason": pa.array([b.reason for b in report.bad_images], pa.string()),
        },
        schema=_BAD_SCHEMA.with_metadata({"dsmd_fingerprint": report.fingerprint}),
    )
    temporary = directory / f".{BAD_IMAGES_FILE}.tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, directory / BAD_IMAGES_FILE)
    text = json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n"
    (directory / CHECK_REPORT_FILE).write_text(text, encoding="utf-8")


def load_bad_images(canonical_dir: str | Path) -> dict[int, str]:
    """image_id -> reason from the last `dsmd data check`; empty when no check was run.

    A list written for other content (the dataset was prepared again since) is refused, not silently used.
    """
    directory = Path(canonical_dir)
    path = directory / BAD_IMAGES_FILE
    if not path.exists():
        return {}
    try:
        table = pq.read_table(path)
        card = json.loads((directory / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, pa.ArrowInvalid, json.JSONDecodeError) as exc:
        raise DsmdError(f"{path}: unreadable ({exc}); rerun `dsmd data check`") from None
    metadata = table.schema.metadata or {}
    written_for = metadata.get(b"dsmd_fingerprint", b"").decode()
    if written_for != card.get("fingerprint"):
        raise DsmdError(f"{path}: written for another version of the dataset; rerun `dsmd data check`")
    ids = table.column("image_id").to_pylist()
    reasons = table.column("reason").to_pylist()
    return dict(zip(ids, reasons, strict=True))
