"""Metrics laid out for DVC: a directory with one small JSON file per measure, keyed by model.

`dvc metrics show` draws one row per metrics file and one column per key. A single file nested by model (the
stages' metrics.json / summary.json) is therefore one row of every model x measure, hundreds of characters wide;
one file per measure keyed by model (``rsum.json`` = ``{"student": 236.4, "teacher": 233.0, ...}``) draws the
models as columns and the measures as rows, the shape of the report's table, as narrow as the number of models.

`dvc exp show` (and dvc.api.exp_show) names those columns ``<directory>/<measure>.json:<model>``, since every
model key occurs in several files; ``from_exp_row`` turns them back into ``<model>.<measure>``.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["write_by_measure", "from_exp_row"]


def write_by_measure(directory: str | Path, groups: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Write ``directory/<measure>.json`` holding ``{group: value}`` for every number of every group.

    Text and None are left out (DVC compares numbers). JSON files already in ``directory`` are removed first:
    a measure no longer reported (e.g. R@50 after evaluate.ks changed) must not linger as a stale row.
    Returns the written paths, sorted.
    """
    directory = Path(directory)
    by_measure: dict[str, dict[str, float | int]] = {}
    for group, values in groups.items():
        for measure, value in values.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                by_measure.setdefault(measure, {})[group] = value.item() if hasattr(value, "item") else value
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.json"):
        stale.unlink()
    written = []
    for measure in sorted(by_measure):
        path = directory / f"{measure}.json"
        path.write_text(json.dumps(by_measure[measure], indent=1) + "\n")
        written.append(path)
    return written


def from_exp_row(row: Mapping[str, Any], directory: str) -> dict[str, Any]:
    """``{"<group>.<measure>": value}`` for the columns of one dvc.api.exp_show row that come from the files
    ``write_by_measure`` wrote into ``directory`` (a path relative to the repository root, as DVC shows it)."""
    wanted = PurePosixPath(str(directory).replace("\\", "/").removeprefix("./"))
    found = {}
    for key, value in row.items():
        path, colon, group = str(key).rpartition(":")
        if not colon or not path.endswith(".json"):
            continue
        file = PurePosixPath(path)
        if file.parent == wanted:
            found[f"{group}.{file.stem}"] = value
    return found
