"""Source rows checked into canonical rows: the split names, the two tables' schemas, image paths kept under the
images root, and the SourceBuilder that every source reader (karpathy, tables) fills row by row.

Below both the readers and pipeline/data/canonical.py, which writes and loads what the builder collects.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import DsmdError

__all__ = [
    "SPLITS",
    "IMAGES_SCHEMA",
    "CAPTIONS_SCHEMA",
    "RootGuard",
    "resolve_under_root",
    "normalize_image_path",
    "normalize_split",
    "DroppedRow",
    "SourceBuilder",
]

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

IMAGES_SCHEMA = pa.schema(
    [("image_id", pa.int64()), ("key", pa.string()), ("path", pa.string()), ("split", pa.string())]
)
CAPTIONS_SCHEMA = pa.schema(
    [("caption_id", pa.int64()), ("image_id", pa.int64()), ("text", pa.string()), ("split", pa.string())]
)


# Captions kept as Python strings while reading a source; each full batch moves into Arrow (about half the size).
_TEXT_CHUNK = 16384

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
    caption_texts: list[str] = field(default_factory=list)  # the latest ones; earlier ones are in _text_chunks
    _text_chunks: list[pa.Array] = field(default_factory=list)
    dropped: list[DroppedRow] = field(default_factory=list)
    _by_key: dict[str, int] = field(default_factory=dict)
    _by_path: dict[str, int] = field(default_factory=dict)
    # Tables repeat an image's path on every caption row; resolving it once is enough.
    _normalized: dict[str, str] = field(default_factory=dict)
    _guard: RootGuard | None = None

    def where(self, row: str) -> str:
        return f"{self.source}, {row}"

    def normalize_path(self, raw_path: Any, row: str, *, cache: bool = True) -> str:
        if isinstance(raw_path, str) and raw_path in self._normalized:
            return self._normalized[raw_path]
        if self._guard is None:
            self._guard = RootGuard(self.images_root, cache_dirs=True)
        relative = normalize_image_path(raw_path, self._guard, self.where(row))
        if cache:
            self._normalized[raw_path] = relative
        return relative

    def image(self, key: str, raw_path: Any, raw_split: Any, row: str, *, unique: bool = False) -> int:
        """Index of the image ``key`` (added on first sight). ``unique``: a repeated key is an error."""
        where = self.where(row)
        # A source of unique ids names each path once (a repeat is refused below): caching it would only hold
        # two more strings per image for the whole run (~0.1 KB per image).
        path = self.normalize_path(raw_path, row, cache=not unique)
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
        if len(self.caption_texts) >= _TEXT_CHUNK:
            self._text_chunks.append(pa.array(self.caption_texts, pa.string()))
            self.caption_texts = []

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
        captions = pa.table(
            {
                "caption_id": pa.array(np.arange(len(image_ids), dtype=np.int64)),
                "image_id": pa.array(image_ids),
                "text": pa.concat_arrays([*self._text_chunks, pa.array(self.caption_texts, pa.string())]),
                # Taken in Arrow: a Python list of a split per caption would double this step's peak memory.
                "split": images.column("split").take(pa.array(image_ids)),
            },
            schema=CAPTIONS_SCHEMA,
        )
        return images, captions
