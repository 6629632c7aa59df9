"""The report's "distillation gain" section: what the teacher adds over training the same student without it.

From the gathered experiments (evaluate.ablations) it takes the headline runs, those that differ from the
baseline commit's row only in distill.method and distill.seed (an ablation that switches a loss off is not
one), and puts side by side, per metric: the teacher, the DSMD student, the MCAD student, the no-teacher
baseline (distill.method=supervised) and chance, with parameter counts.

Each student method is summarised over its seeds as mean and spread; the spread is the sample standard
deviation over seeds (n - 1). A gain "counts" when the difference of means is at least GAIN_FACTOR times the
larger spread of the two methods compared, the bar issue 15 sets. The teacher is one fit (experiments never
refit it: it is a DVC output upstream of them), so its figures carry no spread.
"""

from __future__ import annotations

import html
import statistics

__all__ = ["GAIN_METRICS", "GAIN_FACTOR", "headline_runs", "summarise", "figure", "gain_section"]

MEASURES = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
# Gathered into every experiments row (beside experiments.METRICS, which the table shows).
GAIN_METRICS = [f"{model}.{m}" for model in ("student", "teacher", "chance") for m in MEASURES] + [
    "student.parameters", "teacher.parameters"]
GAIN_FACTOR = 3.0
METHODS = (("dsmd", "DSMD student"), ("mcad", "MCAD student"), ("supervised", "baseline student (no teacher)"))
# Parameters that may differ between headline runs; any other difference makes a run an ablation.
FREE = ("distill.method", "distill.seed")


def headline_runs(document: dict) -> dict[str, list[dict]]:
    """Method -> its headline rows (one per seed; a seed run twice counts once, the newest first listed)."""
    rows = document.get("rows", [])
    if not rows:
        return {}
    reference = next((r for r in rows if r.get("experiment") not in ("workspace",)), rows[0])
    fixed = [k for k in document.get("varying", []) if k not in FREE]
    runs: dict[str, list[dict]] = {}
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if any(str(row.get(k)) != str(reference.get(k)) for k in fixed):
            continue
        if not isinstance(row.get("student.rsum"), (int, float)):
            continue
        method = str(row.get("distill.method") or "dsmd")
        key = (method, str(row.get("distill.seed")))
        if key in seen:
            continue
        seen.add(key)
        runs.setdefault(method, []).append(row)
    return runs


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(rows: list[dict], model: str = "student") -> dict[str, dict]:
    """Measure -> {"mean", "spread", "n"} over ``rows`` for ``model``'s figures."""
    summary = {}
    for measure in [*MEASURES, "parameters"]:
        values = [float(r[f"{model}.{measure}"]) for r in rows if isinstance(r.get(f"{model}.{measure}"), (int, float))]
        if values:
            summary[measure] = {"mean": statistics.fmean(values), "spread": _spread(values), "n": len(values)}
    return summary


def figure(entry: dict | None) -> str:
    """A summarise() entry as the report prints it: mean, and ± spread where there are several seeds."""
    if not entry:
        return "-"
    text = f"{entry['mean']:.1f}"
    return text if entry["spread"] is None else f"{text} ± {entry['spread']:.1f}"


def _params(entry: dict | None) -> str:
    return "-" if not entry else f"{entry['mean'] / 1e6:.2f}M"


def _verdict(name: str, a: dict, b: dict) -> str:
    diff = a["mean"] - b["mean"]
    spreads = [s for s in (a["spread"], b["spread"]) if s is not None]
    if not spreads:
        return f"{name}: {diff:+.1f} RSUM (a single seed each: no spread to judge it by)"
    spread = max(spreads)
    times = diff / spread if spread > 0 else float("inf")
    holds = "holds" if diff >= GAIN_FACTOR * spread else "does NOT hold"
    return (f"{name}: {diff:+.1f} RSUM = {times:.1f}x the larger seed spread ({spread:.1f}); the bar of "
            f"{GAIN_FACTOR:g}x {holds}")


def gain_section(document: dict | None) -> tuple[list[str], list[str]]:
    """(Markdown lines, HTML parts); empty when the gathered runs hold no baseline or no distilled student."""
    runs = headline_runs(document or {})
    if "supervised" not in runs or not ({"dsmd", "mcad"} & set(runs)):
        return [], []
    students = {method: summarise(runs[method]) for method, _ in METHODS if method in runs}
    any_rows = [r for rows in runs.values() for r in rows]
    teacher = summarise(any_rows[:1], "teacher")  # one fit: every run reads the same teacher
    chance = summarise(any_rows[:1], "chance")
    header = ["model", "parameters", "seeds", *MEASURES]
    table = [["teacher", _params(teacher.get("parameters")), "1 fit",
              *(figure(teacher.get(m)) for m in MEASURES)]]
    for method, label in METHODS:
        if method in students:
            s = students[method]
            table.append([label, _params(s.get("parameters")), str(s["rsum"]["n"]),
                          *(figure(s.get(m)) for m in MEASURES)])
    table.append(["chance", "-", "-", *(figure(chance.get(m)) for m in MEASURES)])
    notes = []
    base = students["supervised"]["rsum"]
    for method, label in METHODS[:2]:
        if method in students:
            notes.append(_verdict(f"{label} minus baseline", students[method]["rsum"], base))
    t_rsum, t_params = teacher.get("rsum"), teacher.get("parameters")
    for method, label in METHODS[:2]:
        if method in students and t_rsum:
            s = students[method]
            notes.append(f"{label}: {100 * s['rsum']['mean'] / t_rsum['mean']:.1f}% of the teacher's RSUM with "
                         f"1/{t_params['mean'] / s['parameters']['mean']:.1f} of its parameters"
                         if t_params and s.get("parameters") else
                         f"{label}: {100 * s['rsum']['mean'] / t_rsum['mean']:.1f}% of the teacher's RSUM")
    title = "Distillation gain"
    intro = ("Test split, recall in percent, mean ± sample standard deviation over seeds. Headline runs only: "
             "they differ from the baseline commit in distill.method and distill.seed alone. The baseline student "
             "is the same student trained on the same pairs and schedule with CLIP's InfoNCE and no teacher.")
    md = [f"## {title}", "", intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    md += ["", *(f"- {note}" for note in notes), ""]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table)
    parts = [f"<h2>{title}</h2>", f"<p>{html.escape(intro)}</p>",
             f'<table class="gain" id="gain"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>',
             "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    return md, parts
