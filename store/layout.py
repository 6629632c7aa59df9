"""The store's logical schema: row spaces, array kinds, shards, dtypes and tolerances (no I/O here)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from store.errors import StoreError

SCHEMA_VERSION = 1
# Each kind lives in one row space; rows are canonical dataset ids (row i = id i).
# image_view: K teacher rows per image (K x D side by side, each unit norm: the array's "views" attribute is K);
# image_view_box: the K crop boxes (x0, y0, x1, y1 in the image's pixels) those rows were encoded from, float32,
# not normalised (its "normalisation" attribute is "none").
KINDS = ("image", "text", "pair", "image_view", "image_view_box")
ROW_SPACE = {"image": "image", "text": "caption", "pair": "caption", "image_view": "image", "image_view_box": "image"}
DTYPES = ("float16", "float32")
# Largest |norm - 1| accepted for a valid row. float16 keeps 11 significant bits: rounding each element of a
# unit vector moves its norm by up to ~5e-4, so 2e-3 leaves room without letting unnormalised rows through.
NORM_TOLERANCE = {"float16": 2e-3, "float32": 1e-4}
# Keys of the caller's provenance that may change between a run and its resume without changing the features.
VOLATILE_PROVENANCE_KEYS = frozenset(
    {"created", "created_at", "started", "started_at", "host", "hostname", "pid", "dsmd_version", "device"}
)

_TEACHER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_teacher(teacher: str) -> str:
    if not isinstance(teacher, str) or not _TEACHER_NAME.match(teacher):
        raise StoreError(
            f"teacher name {teacher!r} is not usable in a store: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit), e.g. 'beit3-large'"
        )
    return teacher


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise StoreError(f"unknown array kind {kind!r}: the store holds {', '.join(KINDS)}")
    return kind


def check_dtype(dtype: object) -> str:
    name = str(dtype)
    if name not in DTYPES:
        raise StoreError(f"store dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class Layout:
    """Row counts and shard geometry shared by every array of one store."""

    n_images: int
    n_captions: int
    rows_per_shard: int
    rows_per_chunk: int

    def __post_init__(self) -> None:
        for name in ("n_images", "n_captions", "rows_per_shard", "rows_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StoreError(f"{name} must be a positive integer, got {value!r}")
        if self.rows_per_shard % self.rows_per_chunk:
            raise StoreError(
                f"rows_per_shard ({self.rows_per_shard}) must be a multiple of rows_per_chunk "
                f"({self.rows_per_chunk}): a shard is a whole number of chunks"
            )

    def rows(self, kind: str) -> int:
        return self.n_images if ROW_SPACE[check_kind(kind)] == "image" else self.n_captions

    def num_shards(self, kind: str) -> int:
        return -(-self.rows(kind) // self.rows_per_shard)

    def shard_rows(self, kind: str, shard: int) -> tuple[int, int]:
        n_shards = self.num_shards(kind)
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < n_shards:
            raise StoreError(f"shard {shard!r} does not exist: {kind} arrays have shards 0..{n_shards - 1}")
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.rows(kind))

    def to_dict(self) -> dict:
        return {
            "n_images": self.n_images,
            "n_captions": self.n_captions,
            "rows_per_shard": self.rows_per_shard,
            "rows_per_chunk": self.rows_per_chunk,
        }


def split_kind(kind_or_teacher_kind: str) -> str:
    """'image', 'caption', 'text', 'pair' or 'teacher/kind' -> the kind whose row space it names."""
    kind = kind_or_teacher_kind.rsplit("/", 1)[-1]
    if kind == "caption":
        return "text"
    return check_kind(kind)


def stable_provenance(provenance: dict) -> dict:
    """The part of the caller's provenance that identifies the features (compared on resume)."""
    return {k: v for k, v in provenance.items() if k not in VOLATILE_PROVENANCE_KEYS}
