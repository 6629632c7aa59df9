"""The evaluation report: metrics for DVC, plot data, and a readable report (Markdown and one-file HTML).

``write_report`` takes plain inputs (dicts, arrays, paths), so it can be fed by the evaluate stage or by hand,
and writes into ``out_dir``:
- ``metrics.json``: the whole record, nested by model: ``student``, ``teacher``, ``teachers`` (one group per
  further teacher), ``chance``, each with its Recall@K (``i2t_r1`` ...), ``rsum`` and the facts ``extra`` gives
  it (parameter count, latency), and ``run`` for what is not about one model (split, image and caption counts,
  ``rsum_ratio`` = student / teacher RSUM);
- ``metrics/``: the same numbers per model, one file per measure (pipeline.dvc_metrics), for ``dvc metrics``;
- ``plots/recall_at_k.csv``: Recall@K for K = 1..50, one row per K and model (columns ``k``, ``model``, ``i2t``,
  ``t2i``), for ``dvc plots`` (dvc.yaml draws one line per model);
- ``report.md`` with its figures in ``figures/``, and ``report.html``, self-contained: figures and thumbnails
  are embedded as base64 PNG, nothing is fetched.

Figures: Recall@K curves; the training curves of the distill log (losses, balancer weights w_* and
magnitudes a_*, learning rate); a 2-D PCA of teacher and student features (paper Figure 2: a good student
overlaps its teacher); example queries with their top results.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dvc_metrics import write_by_measure
from pipeline.errors import DsmdError

__all__ = ["write_report", "metrics_document", "read_train_log", "pca_2d", "PAPER_RESULTS"]

# Reported results of the DSMD paper (METHOD.md), in percent.
PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "flickr30k": {
        "BEiT-3 teacher (paper)": {
            "i2t_r1": 98.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
            "t2i_r1": 90.3, "t2i_r5": 98.7, "t2i_r10": 99.5, "rsum": 586.5,
        },
        "DSMD student (paper)": {
            "i2t_r1": 82.0, "i2t_r5": 95.5, "i2t_r10": 97.7,
            "t2i_r1": 68.4, "t2i_r5": 90.8, "t2i_r10": 94.4, "rsum": 528.8,
        },
    },
    "coco": {
        "DSMD student, 5K (paper)": {
            "i2t_r1": 62.1, "i2t_r5": 85.9, "i2t_r10": 92.0,
            "t2i_r1": 48.0, "t2i_r5": 75.6, "t2i_r10": 84.5, "rsum": 448.1,
        },
    },
}  # fmt: skip

_FIXED_LOG_COLUMNS = ("step", "epoch", "lr")
_THUMBNAIL_PX = 112
_PCA_POINTS = 2000


def _paper_key(dataset_name: str) -> str | None:
    name = dataset_name.lower().replace("-", "").replace("_", "")
    if "flickr30k" in name or "f30k" in name:
        return "flickr30k"
    if "coco" in name:
        return "coco"
    return None


def _metric_label(key: str) -> str:
    if key == "rsum":
        return "RSUM"
    direction, _, k = key.partition("_r")
    if k.isdigit() and direction in ("i2t", "t2i"):
        return f"{'image→text' if direction == 'i2t' else 'text→image'} R@{k}"
    return key


def _scalar(where: str, value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DsmdError(f"report extra: {where} is a {type(value).__name__}; give a number or text")


def _leaves(tree: dict[str, Any], prefix: str = ""):
    """(dotted path, key, value) of every non-dict value of a nested dict, in order."""
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _leaves(value, path)
        else:
            yield path, key, value


# ---------------------------------------------------------------- inputs


def read_train_log(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of the distill log CSV (step, epoch, lr, losses, w_*, a_*) as float arrays; blanks are NaN."""
    path = Path(path)
    if not path.is_file():
        raise DsmdError(f"{path}: training log not found; pass the distill run's log CSV or leave it out")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise DsmdError(f"{path}: expected a header with a 'step' column, got {reader.fieldnames}")
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames}
        for row_number, row in enumerate(reader, start=2):
            for name in reader.fieldnames:
                cell = (row.get(name) or "").strip()
                try:
                    columns[name].append(float(cell) if cell else math.nan)
                except ValueError:
                    raise DsmdError(f"{path}: row {row_number}, column {name!r}: {cell!r} is not a number") from None
    if not columns["step"]:
        raise DsmdError(f"{path}: the training log has a header but no rows")
    return {name: np.asarray(values) for name, values in columns.items()}


def pca_2d(teacher_emb: np.ndarray, student_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project both feature sets on the two main axes of their union (centred, via SVD).

    Returns (teacher_xy, student_xy, explained variance ratio of the two axes).
    """
    teacher_emb = np.asarray(teacher_emb, dtype=np.float64)
    student_emb = np.asarray(student_emb, dtype=np.float64)
    if teacher_emb.ndim != 2 or student_emb.ndim != 2 or teacher_emb.shape[1] != student_emb.shape[1]:
        raise DsmdError(
            f"PCA features: teacher {teacher_emb.shape} and student {student_emb.shape} must be 2-D with the same dim"
        )
    both = np.concatenate([teacher_emb, student_emb])
    both -= both.mean(axis=0)
    _, singular, axes = np.linalg.svd(both, full_matrices=False)
    xy = both @ axes[:2].T
    explained = singular[:2] ** 2 / max(float((singular**2).sum()), 1e-30)
    return xy[: len(teacher_emb)], xy[len(teacher_emb) :], explained


# ---------------------------------------------------------------- figures


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _new_figure(width: float, height: float):
    # Figure objects straight from matplotlib.figure: no pyplot, no global figure registry.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


_MODEL_STYLE = {"student": ("tab:blue", "-"), "teacher": ("tab:orange", "-"), "chance": ("gray", "--")}


def _recall_figure(curves: dict[str, dict[str, Sequence[float]]]) -> bytes:
    figure = _new_figure(10, 3.8)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, direction, title in zip(axes, ("i2t", "t2i"), ("image → text", "text → image"), strict=True):
        for model, per_direction in curves.items():
            values = per_direction.get(direction)
            if values is None:
                continue
            color, style = _MODEL_STYLE.get(model, (None, "-"))
            ax.plot(np.arange(1, len(values) + 1), values, style, color=color, label=model)
        ax.set_title(f"Recall@K, {title}")
        ax.set_xlabel("K")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[0].legend(loc="lower right")
    return _png(figure)


def _train_figure(log: dict[str, np.ndarray]) -> bytes:
    step = log["step"]
    # The balanced (top-level) losses are the ones with a weight column; their parts (cd_v, hnd_vt, ...) and the
    # throughput column would bury them.
    balanced = [n[2:] for n in log if n.startswith("w_") and n[2:] in log]
    others = [n for n in log if n not in _FIXED_LOG_COLUMNS and not n.startswith(("w_", "a_", "r_"))]
    losses = [*balanced, "total"] if balanced and "total" in log else [n for n in others if n != "samples_per_s"]
    groups = {
        "losses (raw)": losses,
        "balancer weights w": [n for n in log if n.startswith("w_")],
        "magnitude factors a": [n for n in log if n.startswith("a_")],
        "loss rates r": [n for n in log if n.startswith("r_")],
        "learning rate": [n for n in log if n == "lr"],
    }
    groups = {title: names for title, names in groups.items() if names}
    columns = 2
    rows = math.ceil(len(groups) / columns)
    figure = _new_figure(10, 3.2 * rows)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, (title, names) in zip(axes, groups.items(), strict=False):
        for name in names:
            values = log[name]
            shown = np.isfinite(values)
            ax.plot(step[shown], values[shown], label=name.removeprefix("w_").removeprefix("a_").removeprefix("r_"))
        finite = np.concatenate([log[n][np.isfinite(log[n])] for n in names])
        if title in ("losses (raw)", "learning rate") and finite.size and (finite > 0).all():
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1 or title != "learning rate":
            ax.legend(fontsize="small")
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    return _png(figure)


def _pca_figure(teacher_emb: np.ndarray, student_emb: np.ndarray) -> bytes:
    rng = np.random.default_rng(0)

    def sample(x):
        x = np.asarray(x)
        return x if len(x) <= _PCA_POINTS else x[np.sort(rng.choice(len(x), _PCA_POINTS, replace=False))]

    teacher_xy, student_xy, explained = pca_2d(sample(teacher_emb), sample(student_emb))
    figure = _new_figure(5.5, 5)
    ax = figure.subplots()
    ax.scatter(*teacher_xy.T, s=6, alpha=0.5, color="tab:orange", label="teacher")
    ax.scatter(*student_xy.T, s=6, alpha=0.5, color="tab:blue", label="student")
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f} % of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f} % of variance)")
    ax.set_title("PCA of teacher and student features")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(figure)


def _thumbnail(path: str | Path) -> bytes | None:
    """A small PNG of the image at path, or None if it cannot be read (the report shows a placeholder)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((_THUMBNAIL_PX, _THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, ValueError):
        return None


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- tables


def _metric_table(
    dataset_name: str, student: dict, teacher: dict | None, chance: dict, others: dict[str, dict] | None = None
) -> tuple[list[str], list[list[str]]]:
    columns: list[tuple[str, dict]] = [("student", student)]
    if teacher:
        columns.append(("teacher", teacher))
    columns.extend((f"teacher {name}", values) for name, values in (others or {}).items())
    columns.append(("chance", chance))
    paper = _paper_key(dataset_name)
    if paper:
        columns.extend(PAPER_RESULTS[paper].items())
    header = ["metric"] + [name for name, _ in columns]
    rows = []
    for key in student:
        cells = [_metric_label(key)]
        for name, values in columns:
            value = values.get(key)
            cells.append("–" if value is None else f"{value:.2f}" if name == "chance" else f"{value:.1f}")
        rows.append(cells)
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _html_table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------- outputs


_GROUPS = ("student", "teacher", "teachers", "chance", "run")


def metrics_document(
    student: dict[str, float],
    teacher: dict[str, float] | None,
    chance: dict[str, float],
    other_teachers: dict[str, dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of metrics.json: a group per model with its recalls and the facts ``extra`` gives it
    (``{"student": {...}, "teacher": {...}, "teachers": {name: {...}}, "run": {...}}``), and the run group."""
    from pipeline.retrieval.metrics import ratios

    def numbers(values: dict[str, float]) -> dict[str, float]:
        return {key: float(value) for key, value in values.items()}

    document: dict[str, Any] = {"student": numbers(student)}
    if teacher:
        document["teacher"] = numbers(teacher)
    if other_teachers:
        document["teachers"] = {name: numbers(values) for name, values in other_teachers.items()}
    document["chance"] = numbers(chance)
    headline = ratios(student, teacher).get("rsum_ratio") if teacher else None
    document["run"] = {} if headline is None else {"rsum_ratio": headline}
    for group, facts in (extra or {}).items():
        if group == "teachers":
            if not isinstance(facts, dict):
                raise DsmdError("report extra: teachers must map each teacher's name to its facts")
            for name, values in facts.items():
                _add_facts(document.setdefault("teachers", {}).setdefault(name, {}), values, f"teachers.{name}")
        elif group in ("student", "teacher", "run"):
            _add_facts(document.setdefault(group, {}), facts, group)
        else:
            raise DsmdError(f"report extra: {group!r} is not a group of metrics.json (student, teacher, teachers, run)")
    return {group: document[group] for group in _GROUPS if group in document}


def _add_facts(target: dict[str, Any], facts: Any, where: str) -> None:
    if not isinstance(facts, dict):
        raise DsmdError(f"report extra: {where} must map names to values, got a {type(facts).__name__}")
    for key, value in facts.items():
        if key in target:
            raise DsmdError(f"report extra: {where}.{key} would overwrite a metric; rename it")
        value = _scalar(f"{where}.{key}", value)
        if value is not None:
            target[key] = value


def _write_metrics(out_dir: Path, document: dict[str, Any]) -> None:
    """metrics.json, and its models' numbers one file per measure in metrics/ for `dvc metrics show`."""
    (out_dir / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    models = {group: document[group] for group in ("student", "teacher") if group in document}
    models.update({f"teachers.{name}": values for name, values in document.get("teachers", {}).items()})
    models["chance"] = document["chance"]
    write_by_measure(out_dir / "metrics", models)


def _write_curves_csv(path: Path, curves: dict[str, dict[str, Sequence[float]]]) -> None:
    """One row per K and model: the long form lets dvc.yaml draw a line per model without naming the models
    (further teachers differ between recipes)."""
    lengths = {
        f"{model} {direction}": len(values)
        for model, per_direction in curves.items()
        for direction, values in per_direction.items()
    }
    if len(set(lengths.values())) > 1:
        raise DsmdError(f"recall curves must all have the same length (K = 1..max), got {lengths}")
    n = next(iter(lengths.values()), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["k", "model", "i2t", "t2i"])
        for model, per_direction in curves.items():
            for k in range(n):
                cells = [f"{per_direction[d][k]:.4f}" if d in per_direction else "" for d in ("i2t", "t2i")]
                writer.writerow([k + 1, model, *cells])


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
img.figure { max-width: 100%; display: block; margin: 0.5rem 0; }
.query { margin: 1rem 0; } .query p { margin: 0.2rem 0; }
.results { display: flex; gap: 0.6rem; flex-wrap: wrap; }
.result { text-align: center; font-size: 0.8rem; }
.result img, .result .missing, .result .text { border: 4px solid #c62828; display: block; }
.result.correct img, .result.correct .missing, .result.correct .text { border-color: #2e7d32; }
.result .missing { width: 112px; height: 112px; line-height: 112px; background: #eee; color: #888; }
.result .text { width: 220px; padding: 0.3rem; text-align: left; }
"""


def write_report(
    out_dir: str | Path,
    *,
    dataset_name: str,
    student: dict[str, float],
    teacher: dict[str, float] | None,
    chance: dict[str, float],
    curves: dict[str, dict[str, Sequence[float]]],
    train_log: str | Path | None = None,
    pca_feats: tuple[np.ndarray, np.ndarray] | None = None,
    examples: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    other_teachers: dict[str, dict[str, float]] | None = None,
    experiments: tuple[list[str], list[str]] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, metrics/, plots/recall_at_k.csv, figures/, report.md and report.html into ``out_dir``.

    - ``student``, ``teacher``, ``chance``: flat metric dicts as ``recall_from_ranks`` / ``chance_metrics``
      return them (``teacher`` may be None).
    - ``curves``: ``{"student": {"i2t": [R@1, R@2, ...], "t2i": [...]}, "teacher": ..., "chance": ...}`` in
      percent (``recall_curves`` / ``chance_curves``); a key per line drawn (e.g. ``"teacher beit3_small"``).
    - ``train_log``: the distill log CSV (step, epoch, lr, loss columns, w_<loss>, a_<loss>), optional.
    - ``pca_feats``: (teacher features, student features) of the same items, optional.
    - ``examples``: ``[{"query": text, "query_path": optional image, "results": [{"path" or "text",
      "score", "correct"}]}]``, optional.
    - ``extra``: facts added to metrics.json and the details table, by group: ``{"student": {"parameters": n,
      "query_ms": t}, "teacher": {...}, "teachers": {name: {...}}, "run": {"split": ..., "n_images": ...}}``;
      numbers or text (None is left out), never a recall of the same group.
    - ``other_teachers``: name -> metrics of further teachers on the same items (a column each, and
      ``teachers.<name>`` in metrics.json), optional.
    - ``experiments``: the experiments section, (Markdown lines, HTML parts) from experiments.report_section.
    Returns the written paths by name.
    """
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    if figures_dir.is_dir():
        shutil.rmtree(figures_dir)  # figures of an earlier report (e.g. one with more examples) must not linger
    figures_dir.mkdir(parents=True)
    written: dict[str, Path] = {}

    document = metrics_document(student, teacher, chance, other_teachers, extra)
    _write_metrics(out_dir, document)
    written["metrics"] = out_dir / "metrics.json"
    written["metrics_by_measure"] = out_dir / "metrics"
    _write_curves_csv(out_dir / "plots" / "recall_at_k.csv", curves)
    written["curves"] = out_dir / "plots" / "recall_at_k.csv"

    figures: list[tuple[str, str, bytes]] = []  # (file stem, caption, png)
    figures.append(("recall_at_k", f"Recall@K for K = 1..{_curve_length(curves)}", _recall_figure(curves)))
    if train_log is not None:
        figures.append(
            ("training", f"Training curves ({Path(train_log).name})", _train_figure(read_train_log(train_log)))
        )
    if pca_feats is not None:
        figures.append(("pca", "PCA of teacher and student features", _pca_figure(*pca_feats)))
    for stem, _, png in figures:
        (figures_dir / f"{stem}.png").write_bytes(png)

    header, rows = _metric_table(dataset_name, student, teacher, chance, other_teachers)
    # Everything in metrics.json that the retrieval table does not already show.
    details = [[path, _format_value(value)] for path, key, value in _leaves(document) if key not in student]
    example_blocks = _render_examples(examples or [], figures_dir)

    title = f"dsmd evaluation: {dataset_name}"
    md = [f"# {title}", "", "## Retrieval (percent)", "", _markdown_table(header, rows), ""]
    if details:
        md += ["## Details", "", _markdown_table(["key", "value"], details), ""]
    for stem, caption, _ in figures:
        md += [f"## {caption}", "", f"![{caption}](figures/{stem}.png)", ""]
    if experiments:
        md += experiments[0]
    if example_blocks:
        md += ["## Example queries", "", *[block["md"] for block in example_blocks]]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    written["markdown"] = out_dir / "report.md"

    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Retrieval (percent)</h2>", _html_table(header, rows, "metrics")]
    if details:
        body += ["<h2>Details</h2>", _html_table(["key", "value"], details, "details")]
    for stem, caption, png in figures:
        body += [
            f"<h2>{html.escape(caption)}</h2>",
            f'<img class="figure" id="fig-{stem}" alt="{html.escape(caption)}" src="{_data_uri(png)}">',
        ]
    if experiments:
        body += experiments[1]
    if example_blocks:
        body += ["<h2>Example queries</h2>", *[block["html"] for block in example_blocks]]
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    (out_dir / "report.html").write_text(document)
    written["html"] = out_dir / "report.html"
    return written


def _curve_length(curves: dict) -> int:
    return max((len(v) for per in curves.values() for v in per.values()), default=0)


def _render_examples(examples: list[dict[str, Any]], figures_dir: Path) -> list[dict[str, str]]:
    """HTML (thumbnails inline) and Markdown (thumbnails in figures/examples/) for each example query."""
    blocks = []
    thumbs_dir = figures_dir / "examples"
    for q, example in enumerate(examples):
        if "results" not in example:
            raise DsmdError(f"report examples[{q}]: needs 'results' (a list of {{path or text, score, correct}})")
        query = str(example.get("query", ""))
        html_parts = [f'<div class="query"><p><b>Query {q + 1}:</b> {html.escape(query)}</p>']
        md_cells, md_captions = [], []
        query_md = ""
        if example.get("query_path"):
            png = _thumbnail(example["query_path"])
            if png:
                html_parts.append(f'<img alt="query image" src="{_data_uri(png)}">')
                thumbs_dir.mkdir(parents=True, exist_ok=True)
                (thumbs_dir / f"q{q + 1}.png").write_bytes(png)
                query_md = f"![query {q + 1}](figures/examples/q{q + 1}.png)\n\n"
        html_parts.append('<div class="results">')
        for r, result in enumerate(example["results"]):
            correct = bool(result.get("correct", False))
            score = result.get("score")
            label = ("✓ " if correct else "✗ ") + (f"{float(score):.3f}" if score is not None else "")
            css = "result correct" if correct else "result"
            if "path" in result:
                png = _thumbnail(result["path"])
                if png is None:
                    inner = '<div class="missing">unreadable</div>'
                    md_cells.append(f"(unreadable: {Path(result['path']).name})")
                else:
                    inner = f'<img alt="result {r + 1}" src="{_data_uri(png)}">'
                    thumbs_dir.mkdir(parents=True, exist_ok=True)
                    (thumbs_dir / f"q{q + 1}_r{r + 1}.png").write_bytes(png)
                    md_cells.append(f"![result {r + 1}](figures/examples/q{q + 1}_r{r + 1}.png)")
            else:
                text = str(result.get("text", ""))
                inner = f'<div class="text">{html.escape(text)}</div>'
                md_cells.append(text.replace("|", "\\|"))
            html_parts.append(f'<div class="{css}">{inner}<span>{html.escape(label)}</span></div>')
            md_captions.append(label)
        html_parts.append("</div></div>")
        md = f"**Query {q + 1}:** {query.replace('<', '&lt;').replace('>', '&gt;')}\n\n" + query_md
        if md_cells:
            md += _markdown_table([f"#{i + 1}" for i in range(len(md_cells))], [md_cells, md_captions]) + "\n"
        blocks.append({"html": "".join(html_parts), "md": md})
    return blocks
