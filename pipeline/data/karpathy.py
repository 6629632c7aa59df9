"""Reader for Karpathy split JSON files (dataset_flickr30k.json, dataset_coco.json, our shapes world).

Each entry of ``images`` becomes one image; its path is ``filepath/filename`` (COCO keeps train2014/val2014
in ``filepath``) and its key is ``imgid`` (or the path when there is none). A sentence's text is ``raw``, or
its ``tokens`` joined by spaces when ``raw`` is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.data.rows import SourceBuilder
from pipeline.errors import DsmdError

__all__ = ["read_karpathy"]


def _load_json(source: Path) -> Any:
    try:
        with source.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DsmdError(
            f"{source}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}); fix or re-download the file"
        ) from None
    except UnicodeDecodeError as exc:
        raise DsmdError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _field(entry: dict, name: str, kinds: tuple[type, ...], where: str, required: bool = True) -> Any:
    if name not in entry or entry[name] is None:
        if required:
            raise DsmdError(f"{where}: missing field {name!r}; every Karpathy image entry needs it")
        return None
    value = entry[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kinds)
        raise DsmdError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def _sentence_text(sentence: Any, where: str) -> Any:
    if not isinstance(sentence, dict):
        raise DsmdError(f"{where}: a sentence must be an object with 'raw', got {type(sentence).__name__}")
    if sentence.get("raw") is not None:
        return sentence["raw"]  # type errors are reported by the builder, with the row
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens)
    raise DsmdError(f"{where}: sentence has neither 'raw' text nor a 'tokens' list of strings")


def read_karpathy(source: Path, builder: SourceBuilder) -> None:
    data = _load_json(source)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DsmdError(
            f"{source}: not a Karpathy split file (expected an object with an 'images' list); for a table "
            "set data.format to csv, jsonl or parquet"
        )
    for index, entry in enumerate(data["images"]):
        row = f"images[{index}]"
        where = builder.where(row)
        if not isinstance(entry, dict):
            raise DsmdError(f"{where}: expected an object, got {type(entry).__name__}")
        filename = _field(entry, "filename", (str,), where)
        filepath = _field(entry, "filepath", (str,), where, required=False)
        path = f"{filepath.rstrip('/')}/{filename}" if filepath else filename
        split = _field(entry, "split", (str,), where)
        imgid = _field(entry, "imgid", (int, str), where, required=False)
        sentences = _field(entry, "sentences", (list,), where)
        key = str(imgid) if imgid is not None else path
        image_index = builder.image(key, path, split, f"{row} (filename {filename!r})", unique=True)
        for number, sentence in enumerate(sentences):
            sentence_row = f"images[{index}].sentences[{number}]"
            builder.caption(image_index, _sentence_text(sentence, builder.where(sentence_row)), sentence_row)
