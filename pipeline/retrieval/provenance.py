"""Which student and dataset a search index, an export or a bundle was built from, checked where they are used.

A gallery of embeddings only answers queries from the student that encoded it: another student (a retrained
one, one of another dataset) still returns scores and ids, just meaningless ones. So every index ``dsmd
evaluate`` saves, every export and every bundle records its provenance, and ``dsmd search``, ``dsmd export``
and the bundle reader refuse a pair that does not belong together, naming both sides.

A provenance record (JSON)::

    {"student": {"sha256": <sha256 of model.safetensors>, "path": <student dir, for messages>},
     "dataset": {"name": <dataset name>, "fingerprint": <canonical tables' fingerprint>}}

The student is identified by its weights file alone: the card can be edited or copied, the weights are what
encodes. The dataset is the canonical dataset's fingerprint (pipeline/data/canonical.py), as the student's card
and the feature store record it. No torch here: the bundle reader (`dsmd search --bundle`) checks too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.errors import DsmdError

__all__ = [
    "INDEX_FIX",
    "PROVENANCE_KEY",
    "STUDENT_CARD_FILE",
    "STUDENT_WEIGHTS_FILE",
    "check_belongs",
    "file_sha256",
    "recorded",
    "student_provenance",
]

# The saved student's files (pipeline/models/student.py names them from here, so that both agree).
STUDENT_WEIGHTS_FILE = "model.safetensors"
STUDENT_CARD_FILE = "card.json"
# Where an index's meta, export.json and bundle.json keep the record.
PROVENANCE_KEY = "provenance"
# The fix for an index that does not belong to the student it is used with.
INDEX_FIX = (
    "rebuild the index from this student with `dsmd evaluate` (it reads distill.out_dir/student, writes "
    "evaluate.out_dir/index), or pass the --student and --index that belong together"
)
# Hex digits of a digest or fingerprint shown in messages: enough to tell two apart at a glance.
SHOWN = 12
_BLOCK = 1 << 22


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def student_provenance(student_dir: str | Path) -> dict[str, Any]:
    """The provenance record of a saved student: its weights' digest and the dataset its card names."""
    student_dir = Path(student_dir)
    weights = student_dir / STUDENT_WEIGHTS_FILE
    card_path = student_dir / STUDENT_CARD_FILE
    if not weights.is_file() or not card_path.is_file():
        missing = weights.name if not weights.is_file() else card_path.name
        raise DsmdError(f"{student_dir} is not a saved student: {missing} is missing; pass the directory "
                        "`dsmd distill` wrote (distill.out_dir/student)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DsmdError(f"{card_path}: not readable JSON ({exc}); save the student again") from None
    dataset = card.get("dataset") if isinstance(card, dict) else None
    dataset = dataset if isinstance(dataset, dict) else {}
    return {
        "student": {"sha256": file_sha256(weights), "path": str(student_dir)},
        "dataset": {"name": dataset.get("name"), "fingerprint": dataset.get("fingerprint")},
    }


def recorded(record: Any, what: str, fix: str) -> dict[str, Any]:
    """The provenance record kept in ``record`` (an index's meta, export.json, bundle.json), or an error saying
    that ``what`` was written before provenance was recorded, with ``fix``."""
    found = record.get(PROVENANCE_KEY) if isinstance(record, dict) else None
    student = found.get("student") if isinstance(found, dict) else None
    if not isinstance(student, dict) or not student.get("sha256") or not isinstance(found.get("dataset"), dict):
        raise DsmdError(f"{what} records no student and dataset (written before dsmd recorded them), so it "
                        f"cannot be checked; {fix}")
    return found


def _dataset_words(record: dict[str, Any]) -> str:
    dataset = record["dataset"]
    return f"dataset {dataset.get('name')!r} (fingerprint {str(dataset.get('fingerprint'))[:SHOWN]})"


def check_belongs(built: dict[str, Any], built_what: str, given: dict[str, Any], given_what: str, fix: str) -> None:
    """Refuse ``given`` (e.g. the student passed to search) for something ``built`` from another student or
    dataset (e.g. the index), in one line naming both sides and ``fix``.

    The datasets are compared first (when both name one), as a student of another dataset is the likelier
    mix-up and the plainer message; then the weights' digests.
    """
    built_fp, given_fp = built["dataset"].get("fingerprint"), given["dataset"].get("fingerprint")
    if built_fp and given_fp and built_fp != given_fp:
        raise DsmdError(f"{built_what} was built on {_dataset_words(built)}, but {given_what} comes from "
                        f"{_dataset_words(given)}; {fix}")
    built_sha, given_sha = built["student"]["sha256"], given["student"]["sha256"]
    if built_sha != given_sha:
        raise DsmdError(f"{built_what} was built from the student with weights sha256 {built_sha[:SHOWN]} "
                        f"({built['student'].get('path')}), but {given_what} has weights sha256 "
                        f"{given_sha[:SHOWN]}; {fix}")
