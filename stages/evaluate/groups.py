"""The report's "seed groups" section: the gathered runs grouped by their settings, seeds pooled.

Runs that differ only in distill.seed form a group; each group shows its mean ± sample standard deviation over
seeds and its difference to the group of the baseline commit, judged like the distillation gain: a difference
counts when it is at least GAIN_FACTOR times the larger spread of the two groups. This is where an ablation
run over seeds (stored views, the block order, a loss switched off) gets its verdict.
"""

from __future__ import annotations

import html

from stages.evaluate.gain import GAIN_FACTOR, figure, summarise

__all__ = ["seed_groups", "groups_section"]

SEED = "distill.seed"
SHOWN = ("rsum", "i2t_r1", "t2i_r1")


def seed_groups(document: dict) -> list[tuple[dict, list[dict]]]:
    """[(settings, rows)] in order of first appearance; the baseline commit's group first. A seed listed twice
    in a group counts once (the first listed, as DVC lists the newest first)."""
    rows = [r for r in document.get("rows", []) if isinstance(r.get("student.rsum"), (int, float))]
    keys = [k for k in document.get("varying", []) if k != SEED]
    groups: dict[tuple, tuple[dict, list[dict]]] = {}
    seen: set[tuple] = set()
    for row in rows:
        settings = {k: row.get(k) for k in keys}
        key = tuple(str(v) for v in settings.values())
        if (key, str(row.get(SEED))) in seen:
            continue
        seen.add((key, str(row.get(SEED))))
        groups.setdefault(key, (settings, []))[1].append(row)
    ordered = list(groups.values())
    reference = next((r for r in rows if r.get("experiment") != "workspace"), None)
    if reference is not None:
        first = tuple(str(reference.get(k)) for k in keys)
        ordered.sort(key=lambda group: tuple(str(v) for v in group[0].values()) != first)  # stable
    return ordered


def _label(settings: dict, reference: dict) -> str:
    changed = [f"{k}={_text(v)}" for k, v in settings.items() if str(v) != str(reference.get(k))]
    return " ".join(changed) or "the baseline commit's settings"


def _text(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _against(a: dict, b: dict) -> str:
    """Difference of means in units of the larger spread, and whether it clears GAIN_FACTOR, either way."""
    diff = a["mean"] - b["mean"]
    spreads = [s for s in (a["spread"], b["spread"]) if s is not None]
    if not spreads:
        return f"{diff:+.1f} (single seeds: no spread to judge by)"
    spread = max(spreads)
    beyond = abs(diff) >= GAIN_FACTOR * spread
    times = f"{diff / spread:+.1f}x" if spread > 0 else "inf x"
    return (f"{diff:+.1f} = {times} the larger spread ({spread:.1f}): "
            f"{'beyond' if beyond else 'within'} {GAIN_FACTOR:g}x")


def groups_section(document: dict | None) -> tuple[list[str], list[str]]:
    """(Markdown lines, HTML parts); empty unless some group has more than one seed."""
    groups = seed_groups(document or {})
    if not groups or max(len(rows) for _, rows in groups) < 2:
        return [], []
    reference_settings, reference_rows = groups[0]
    reference = summarise(reference_rows)
    header = ["runs", "seeds", "RSUM", "i2t R@1", "t2i R@1", "RSUM vs the baseline commit's group"]
    table = []
    for settings, rows in groups:
        summary = summarise(rows)
        against = "-" if rows is reference_rows else _against(summary["rsum"], reference["rsum"])
        table.append([_label(settings, reference_settings), str(summary["rsum"]["n"]),
                      *(figure(summary.get(m)) for m in SHOWN), against])
    title = "Seed groups"
    intro = ("Every gathered run, grouped by its settings with the seeds pooled: test split, mean ± sample "
             "standard deviation over seeds, each group against the group of the baseline commit's settings.")
    md = [f"## {title}", "", intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table]
    md.append("")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table)
    parts = [f"<h2>{title}</h2>", f"<p>{html.escape(intro)}</p>",
             f'<table class="groups" id="groups"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>']
    return md, parts
