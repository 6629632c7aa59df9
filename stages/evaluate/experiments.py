"""`dsmd experiments`: the finished DVC experiments (e.g. the ablation grid) in one comparison table.

Rows come from DVC itself (dvc.api.exp_show): the baseline commit and every experiment with metrics (the
workspace too, when its results differ from the baseline's). Columns are the parameters that differ between
those rows, then the student's recalls, RSUM, the teacher's RSUM and the student/teacher ratio, named by their
place in the evaluate stage's metrics.json (``student.rsum``, ``run.rsum_ratio``); DVC reads them from the
stage's metrics/ directory (one file per measure, pipeline.dvc_metrics).

The table is also saved as JSON at evaluate.ablations (a file kept in git, a dependency of the evaluate stage),
from which the evaluation report renders its ablation section: gathering new experiments reruns only evaluate.
"""

from __future__ import annotations

import csv
import html
import json
import time
from pathlib import Path

from pipeline.dvc_metrics import from_exp_row
from pipeline.errors import DsmdError
from stages.evaluate.gain import GAIN_METRICS, gain_section
from stages.evaluate.groups import groups_section

METRICS = ["student.i2t_r1", "student.t2i_r1", "student.rsum", "teacher.rsum", "run.rsum_ratio"]
ALWAYS = ("distill.method", "distill.seed")
PARAM_PREFIXES = ("distill.", "student.", "teacher.", "demo.", "extract.")


def collect(
    repo: str = ".", metrics_dir: str = "runs/evaluate/metrics", revs: list[str] | None = None
) -> tuple[list[str], list[dict]]:
    """(varying parameter names, rows) for every finished DVC experiment of the repository that has metrics.

    ``metrics_dir``: the evaluate stage's metrics/ directory, relative to the repository (evaluate.out_dir).
    ``revs``: the commits whose experiments to gather (DVC lists those of HEAD only by default), so runs queued
    on an earlier commit stay in the table after later commits. A parameter a commit did not have yet counts as
    its default (a setting is added with the value that behaves as before it existed), and a commit's own row
    that repeats a newer commit's settings and results is left out."""
    import dvc.api

    try:
        raw = dvc.api.exp_show(repo=repo, revs=revs or None)
    except Exception as exc:  # dvc raises many kinds; all mean "not a usable DVC repository here"
        raise DsmdError(f"cannot list DVC experiments in {repo}: {exc}") from None
    return table_from_exp_rows(raw, metrics_dir)


def table_from_exp_rows(raw: list[dict], metrics_dir: str) -> tuple[list[str], list[dict]]:
    """collect's table from dvc.api.exp_show's rows."""
    # Queued and running experiments show their baseline's metrics: not results yet.
    raw = [row for row in raw if row.get("State") in (None, "Success")]
    rows = [(row, metrics_of(row, metrics_dir)) for row in raw]
    rows = [(row, metrics) for row, metrics in rows if isinstance(metrics.get("student.rsum"), (int, float))]
    if not rows:
        raise DsmdError(
            f"no experiment with evaluation metrics in {metrics_dir} yet: run `dvc repro` or `dvc exp run` first"
        )
    params = sorted({k for row, _ in rows for k in row if k.startswith(PARAM_PREFIXES)})
    settings = [{k: plain_value(row.get(k, MISSING), k) for k in params} for row, _ in rows]
    varying = [k for k in params if len({str(s[k]) for s in settings}) > 1]
    table = []
    for (row, metrics), values in zip(rows, settings, strict=True):
        name = row.get("Experiment") or row.get("rev") or "?"
        # Method and seed always, so the distillation gain can group the runs even where all share one value.
        table.append({"experiment": name, "rev": row.get("rev"), "created": row.get("Created"),
                      **{k: values.get(k) for k in ALWAYS}, **{k: values[k] for k in varying},
                      **{m: metrics.get(m) for m in METRICS},
                      **{m: metrics.get(m) for m in GAIN_METRICS if m not in METRICS}})
    baselines = [not row.get("Experiment") for row, _ in rows]
    return varying, _without_repeated_baselines(varying, table, baselines)


MISSING = object()


def plain_value(value, key: str):
    """A parameter as the table keeps it: DVC's integral floats (seeds, K) as ints, and a parameter the commit
    did not have as the schema's default."""
    # dvc.api.exp_show writes the string "None" for a parameter a commit's params.yaml lacks.
    if value is MISSING or value is None or value == "None":
        value = schema_default(key)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def schema_default(key: str):
    """The default of a dotted setting (``extract.views``), or None where the schema has no such setting."""
    import dataclasses

    from pipeline.config.schema import Config

    node = Config()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node


def metrics_of(row: dict, metrics_dir: str) -> dict:
    """One exp_show row's evaluation metrics by their metrics.json names, with the student / teacher RSUM
    ratio (not a DVC metric: metrics/ holds the models' own numbers)."""
    metrics = from_exp_row(row, metrics_dir)
    student, teacher = metrics.get("student.rsum"), metrics.get("teacher.rsum")
    if isinstance(student, (int, float)) and isinstance(teacher, (int, float)) and teacher:
        metrics["run.rsum_ratio"] = student / teacher
    return metrics


def _without_repeated_baselines(varying: list[str], table: list[dict], baselines: list[bool]) -> list[dict]:
    """The workspace row when it repeats any other row, and a commit's row when it repeats a newer commit's row
    (DVC lists the newest first): the same run listed again adds nothing."""
    keys = [*varying, *METRICS]

    def same(a: dict, b: dict) -> bool:
        return all(a.get(k) == b.get(k) for k in keys)

    kept = []
    for index, (row, baseline) in enumerate(zip(table, baselines, strict=True)):
        if row["experiment"] == "workspace" and any(same(row, other) for other in table[index + 1 :]):
            continue
        if baseline and any(same(row, other) for other, b in zip(table[:index], baselines, strict=False)
                            if b and other["experiment"] != "workspace"):
            continue
        kept.append(row)
    return kept


def save_for_report(path: Path, varying: list[str], rows: list[dict]) -> Path:
    """The table as the evaluate stage's report reads it (evaluate.ablations)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "gathered": time.strftime("%Y-%m-%d %H:%M %Z"),
        "varying": varying,
        "metrics": METRICS,
        "rows": rows,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def load_saved(path: str | Path) -> dict | None:
    """The saved table, or None when evaluate.ablations is empty or names no file."""
    if not path or not Path(path).is_file():
        return None
    try:
        document = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DsmdError(f"{path}: not valid JSON ({exc}); regenerate it with `dsmd experiments`") from None
    if not isinstance(document, dict) or not isinstance(document.get("rows"), list):
        raise DsmdError(f"{path}: not an experiments table (no rows list); regenerate it with `dsmd experiments`")
    flat = [name for name in document.get("metrics", METRICS) if "." not in str(name)]
    if flat:
        # Tables gathered before metrics.json was nested by model name their columns student_rsum, rsum_ratio.
        raise DsmdError(
            f"{path}: metric {flat[0]!r} is a name of the older flat metrics.json; regenerate the table with "
            "`dsmd experiments`, or rename its metrics as metrics.json nests them (student.rsum, run.rsum_ratio)"
        )
    return document


def report_section(document: dict | None, source: str) -> tuple[list[str], list[str]]:
    """(Markdown lines, HTML parts) of the report's experiments section."""
    title = "Ablations and other experiments (DVC experiments)"
    if document is None or not document["rows"]:
        text = ("No experiments gathered yet: queue the ablation grid with `dvc exp run --queue` (README, "
                f"Experiments), then `dsmd experiments` writes {source} and `dvc repro` puts it here.")
        return [f"## {title}", "", text, ""], [f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(text)}</p>"]
    varying, metrics = document.get("varying", []), document.get("metrics", METRICS)
    gain_md, gain_html = gain_section(document)
    groups_md, groups_html = groups_section(document)
    header, cells = _cells(document["rows"], varying, metrics)
    text = (f"{len(cells)} runs, each a real `dvc exp run` of this pipeline, gathered by `dsmd experiments` on "
            f"{document.get('gathered', '?')} into {source}. Columns: the parameters that differ between the runs, "
            "then test-split metrics (RSUM and recall in percent; ratio = student RSUM / teacher RSUM).")
    return (
        [*gain_md, *groups_md, f"## {title}", "", text, "", *_markdown(header, cells), ""],
        [*gain_html, *groups_html, f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(text)}</p>",
         _html(header, cells)],
    )


def _cells(rows: list[dict], varying: list[str], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["experiment", *varying, *metrics]
    return header, [[cell_text(row.get(h), h in metrics) for h in header] for row in rows]


def _markdown(header: list[str], cells: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]


def _html(header: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f'<table class="experiments" id="experiments"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def cell_text(value, metric: bool = True) -> str:
    if isinstance(value, float) and not metric:
        # DVC hands back some integer parameters (e.g. seeds) as floats: show them as written.
        return str(int(value)) if value.is_integer() else f"{value:g}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def write_table(out_dir: Path, varying: list[str], rows: list[dict]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    header, cells = _cells(rows, varying, METRICS)
    paths = {"csv": out_dir / "experiments.csv", "md": out_dir / "experiments.md", "html": out_dir / "experiments.html"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text("# Experiments\n\n" + "\n".join(_markdown(header, cells)) + "\n")
    paths["html"].write_text(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>dsmd experiments</title>'
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem}</style></head>"
        f"<body><h1>Experiments</h1>{_html(header, cells)}</body></html>\n"
    )
    return paths
