"""The files of a canonical directory (see pipeline/data/canonical.py) and how they are replaced: each is staged
beside its final name and moved into place, dataset.json last, so that a crash leaves a card that does not match
its tables, which loading refuses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data.fingerprint import SCHEMA_VERSION
from pipeline.errors import DsmdError

__all__ = [
    "IMAGES_FILE",
    "CAPTIONS_FILE",
    "CARD_FILE",
    "BAD_IMAGES_FILE",
    "CHECK_REPORT_FILE",
    "TAR_INDEX_FILE",
    "make_card",
    "staged_path",
    "commit",
    "read_card",
    "make_directory",
    "refuse_file_in_the_way",
]

IMAGES_FILE = "images.parquet"
CAPTIONS_FILE = "captions.parquet"
CARD_FILE = "dataset.json"
# Written by `dsmd data check`; removed by prepare whenever the content it describes changes.
BAD_IMAGES_FILE = "bad_images.parquet"
CHECK_REPORT_FILE = "check_report.json"
TAR_INDEX_FILE = "tar_index.parquet"


def refuse_file_in_the_way(directory: Path) -> None:
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


def make_directory(directory: Path) -> Path:
    refuse_file_in_the_way(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DsmdError(
            f"data.canonical_dir {str(directory)!r}: cannot create it ({exc.strerror or exc}); set "
            "data.canonical_dir to a writable directory"
        ) from None
    return directory


def make_card(name: str, images_root: Path | str, fingerprint: str, counts: dict, info: dict) -> dict:
    """dataset.json: the fixed fields, then the extra facts (source, dropped rows) of ``info``."""
    fixed = ("schema_version", "name", "images_root", "fingerprint", "counts")
    return {"schema_version": SCHEMA_VERSION, "name": name, "images_root": str(images_root),
            "fingerprint": fingerprint, "counts": counts, **{k: v for k, v in info.items() if k not in fixed}}


def staged_path(directory: Path, name: str) -> Path:
    """Where a canonical file is written before `commit` moves it into place."""
    return directory / f".{name}.tmp"


def commit(directory: Path, staged: dict[str, Path | None], card: dict) -> None:
    """Move the staged files into place (None: remove that file) and write dataset.json last, so that a crash
    leaves a card that does not match its tables, which load() refuses."""
    previous = read_card(directory) if (directory / CARD_FILE).exists() else None
    for name, path in staged.items():
        if path is None:
            (directory / name).unlink(missing_ok=True)
        else:
            os.replace(path, directory / name)
    if previous is None or any(previous.get(k) != card[k] for k in ("fingerprint", "images_root")):
        # An earlier check describes other content (or other files): it must not be trusted.
        for stale in (BAD_IMAGES_FILE, CHECK_REPORT_FILE):
            (directory / stale).unlink(missing_ok=True)
    text = json.dumps(card, indent=2, ensure_ascii=False) + "\n"
    temporary = staged_path(directory, CARD_FILE)
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, directory / CARD_FILE)


def read_card(directory: Path) -> dict:
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
