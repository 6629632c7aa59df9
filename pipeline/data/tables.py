"""Readers for simple tables (CSV/TSV, JSONL, Parquet) with one row per caption.

Columns (names from `DataConfig`): the image path and the caption are required; the image id and the split
are optional.
- Without an image id column, rows are grouped by image path (the path becomes the key).
- Without a split column, every row gets ``data.default_split``; when that is empty too the table is refused,
  because silently calling a whole dataset "train" (or "test") would make evaluation meaningless.
  A blank split cell is likewise filled from ``data.default_split`` or refused.
Rows are numbered as the user sees them: "line N" of a CSV/JSONL file (header = line 1), "row N" (from 1) of
a Parquet table.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.rows import SourceBuilder
from pipeline.errors import DsmdError

__all__ = ["read_table_source"]

_MISSING = object()


def _missing_column(source: Path, column: str, setting: str, found: list[str]) -> DsmdError:
    return DsmdError(
        f"{source}: no column {column!r} (found: {', '.join(map(repr, found)) or 'none'}); rename the column or "
        f"set data.{setting}"
    )


def _not_utf8(source: Path, first: UnicodeDecodeError) -> DsmdError:
    """The error for a file that is not UTF-8, naming the line and column of its first bad byte.

    Text readers decode blocks of several kilobytes, so the line a reader had reached when decoding failed can
    lie hundreds of lines before the bad byte: the raw bytes are scanned again to find it. Lines are counted as
    the readers count them (a line ends at LF, CR LF or a lone CR).
    """
    breaks = re.compile(rb"\r\n|\r|\n")
    line = 1
    with source.open("rb") as handle:
        for raw in handle:  # binary lines end at LF, a byte that never occurs inside a UTF-8 sequence
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                ends = list(breaks.finditer(raw, 0, exc.start))
                start = ends[-1].end() if ends else 0
                column = len(raw[start : exc.start].decode("utf-8")) + 1
                return DsmdError(
                    f"{source}, line {line + len(ends)}, column {column}: not UTF-8 text (byte "
                    f"0x{raw[exc.start]:02x}: {exc.reason}); save the file as UTF-8"
                )
            line += len(breaks.findall(raw))
    return DsmdError(f"{source}: not UTF-8 text ({first.reason}); save the file as UTF-8")


def _text_lines(source: Path, encoding: str) -> Iterator[str]:
    """The lines of a text file, ends kept; a byte that is not UTF-8 becomes an error naming its line."""
    with source.open("r", encoding=encoding, newline="") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as exc:
            raise _not_utf8(source, exc) from None


def _iter_csv(source: Path, wanted: list[str]) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    delimiter = "\t" if source.suffix.lower() == ".tsv" else ","
    lines = _text_lines(source, "utf-8-sig")
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        columns = list(reader.fieldnames or [])
    except csv.Error as exc:
        lines.close()
        raise DsmdError(f"{source}, line 1: cannot read the CSV header ({exc})") from None

    def rows() -> Iterator[tuple[str, dict]]:
        with closing(lines):
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise DsmdError(f"{source}, line {reader.line_num}: malformed CSV ({exc})") from None
                where = f"line {reader.line_num}"
                if None in record:
                    raise DsmdError(
                        f"{source}, {where}: more fields than the header has columns; quote "
                        "fields that contain the delimiter"
                    )
                if any(record.get(name, "") is None for name in wanted):
                    raise DsmdError(f"{source}, {where}: fewer fields than the header has columns")
                yield where, record

    return columns, rows()


def _iter_jsonl(source: Path, wanted: list[str]) -> tuple[list[str] | None, Iterator[tuple[str, dict]]]:
    def rows() -> Iterator[tuple[str, dict]]:
        with closing(_text_lines(source, "utf-8")) as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DsmdError(f"{source}, {where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise DsmdError(f"{source}, {where}: expected a JSON object, got {type(record).__name__}")
                yield where, record

    # JSONL has no header: columns are checked row by row.
    return None, rows()


def _iter_parquet(source: Path, wanted: list[str]) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DsmdError(f"{source}: not a readable Parquet file ({exc})") from None
    columns = list(parquet.schema_arrow.names)
    present = [name for name in wanted if name in columns]

    def rows() -> Iterator[tuple[str, dict]]:
        number = 0
        for batch in parquet.iter_batches(columns=present, batch_size=65536):
            values = {name: batch.column(name).to_pylist() for name in present}
            for offset in range(batch.num_rows):
                number += 1
                yield f"row {number}", {name: values[name][offset] for name in present}

    return columns, rows()


def _check_type(value: Any, kinds: tuple[type, ...], source: Path, where: str, column: str) -> None:
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kinds)
        raise DsmdError(
            f"{source}, {where}: column {column!r} must hold {expected}, got {type(value).__name__} {value!r}"
        )


def read_table_source(source: Path, fmt: str, cfg: Any, builder: SourceBuilder) -> None:
    """Read a table source into ``builder``; ``cfg`` is the `DataConfig` (column names, default split)."""
    image_col, caption_col = cfg.image_column, cfg.caption_column
    id_col, split_col = cfg.image_id_column, cfg.split_column
    default_split = getattr(cfg, "default_split", "") or ""
    wanted = [image_col, caption_col, id_col, split_col]
    readers = {"csv": _iter_csv, "jsonl": _iter_jsonl, "parquet": _iter_parquet}
    if fmt not in readers:
        raise DsmdError(f"data.format {fmt!r} is not a table format (csv, jsonl, parquet)")
    columns, rows = readers[fmt](source, wanted)

    has_id = has_split = True
    if columns is not None:
        for column, setting in ((image_col, "image_column"), (caption_col, "caption_column")):
            if column not in columns:
                raise _missing_column(source, column, setting, columns)
        has_id = id_col in columns
        has_split = split_col in columns
        if not has_split and not default_split:
            raise DsmdError(
                f"{source}: no column {split_col!r} and data.default_split is empty; add a split column "
                "(train/val/test) or set data.default_split"
            )

    for where, record in rows:
        path = record.get(image_col, _MISSING)
        if path is _MISSING or path is None or path == "":
            raise DsmdError(f"{source}, {where}: missing image path (column {image_col!r})")
        _check_type(path, (str,), source, where, image_col)
        if caption_col not in record:
            raise DsmdError(f"{source}, {where}: missing field {caption_col!r} (the caption)")

        split = record.get(split_col) if has_split else None
        if split is None or (isinstance(split, str) and not split.strip()):
            if not default_split:
                raise DsmdError(
                    f"{source}, {where}: no split (column {split_col!r}); fill it in or set data.default_split"
                )
            split = default_split
        _check_type(split, (str,), source, where, split_col)

        image_id = record.get(id_col) if has_id else None
        if image_id is None or image_id == "":
            if columns is not None and has_id:
                raise DsmdError(
                    f"{source}, {where}: empty image id (column {id_col!r}); fill it in or drop "
                    "the column to group rows by path"
                )
            key = None
        else:
            _check_type(image_id, (str, int), source, where, id_col)
            key = str(image_id).strip()

        if key is None:
            # Group by path: normalise first so 'a.jpg' and './a.jpg' are the same image.
            key = builder.normalize_path(path, where)
        index = builder.image(key, path, split, where)
        builder.caption(index, record[caption_col], where)
