"""`dsmd experiments`: the finished DVC experiments (e.g. the ablation grid) in one comparison table.

Rows come from DVC itself (dvc.api.exp_show): the workspace, the baseline commit and every experiment with
metrics. Columns are the parameters that differ between those rows, then the student's recalls, RSUM, the
teacher's RSUM and the student/teacher ratio.
"""

from __future__ import annotations

import csv
import html
from pathlib import Path

from pipeline.errors import DsmdError

METRICS = ["student_i2t_r1", "student_t2i_r1", "student_rsum", "teacher_rsum", "rsum_ratio"]
PARAM_PREFIXES = ("distill.", "student.", "teacher.", "demo.")


def collect(repo: str = ".") -> tuple[list[str], list[dict]]:
    """(varying parameter names, rows) for every DVC experiment of the repository that has metrics."""
    import dvc.api

    try:
        raw = dvc.api.exp_show(repo=repo)
    except Exception as exc:  # dvc raises many kinds; all mean "not a usable DVC repository here"
        raise DsmdError(f"cannot list DVC experiments in {repo}: {exc}") from None
    rows = [row for row in raw if isinstance(row.get("student_rsum"), (int, float))]
    if not rows:
        raise DsmdError("no experiment with evaluation metrics yet: run `dvc repro` or `dvc exp run` first")
    params = sorted({k for row in rows for k in row if k.startswith(PARAM_PREFIXES)})
    varying = [k for k in params if len({str(row.get(k)) for row in rows}) > 1]
    table = []
    for row in rows:
        name = row.get("Experiment") or row.get("rev") or "?"
        table.append({"experiment": name, **{k: row.get(k) for k in varying}, **{m: row.get(m) for m in METRICS}})
    return varying, table


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def write_table(out_dir: Path, varying: list[str], rows: list[dict]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["experiment", *varying, *METRICS]
    paths = {"csv": out_dir / "experiments.csv", "md": out_dir / "experiments.md", "html": out_dir / "experiments.html"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row.get(h)) for h in header) + " |" for row in rows]
    paths["md"].write_text("# Experiments\n\n" + "\n".join(lines) + "\n")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(h)))}</td>" for h in header) + "</tr>" for row in rows
    )
    paths["html"].write_text(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>dsmd experiments</title>'
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem}</style></head>"
        f"<body><h1>Experiments</h1><table id='experiments'><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>\n"
    )
    return paths
