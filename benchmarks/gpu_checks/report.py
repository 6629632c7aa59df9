"""The acceptance report: one JSON and one Markdown file, rewritten after every section, so that a run cut short
(device time out, a crash) still leaves everything measured until then.

JSON: {"schema", "dry_run", "meta": {device, torch, ...}, "budget_s", "elapsed_s", "sections": {name: {status,
seconds, results | error | reason}}, "targets": [{name, wanted, value, unit, passed}]}. The targets are the
figures of /work/shared/ANCHORS.md and issue 18; in a dry run their verdict is null (tiny models on a CPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_NAME = "gpu_acceptance.json"
MD_NAME = "gpu_acceptance.md"
SCHEMA = 1


@dataclass(frozen=True)
class Target:
    name: str
    section: str
    path: tuple[str, ...]  # where the value sits in the section's results
    wanted: str  # for people
    unit: str
    minimum: float | None = None
    maximum: float | None = None

    def value(self, sections: dict) -> float | None:
        node: Any = sections.get(self.section, {}).get("results")
        for key in self.path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return float(node) if isinstance(node, (int, float)) else None

    def passed(self, value: float | None) -> bool | None:
        if value is None:
            return None
        if self.minimum is not None and value < self.minimum:
            return False
        return not (self.maximum is not None and value > self.maximum)


TARGETS = (
    Target("teacher images/s, BEiT-3 giant 384 px bf16, model only", "teacher_model", ("ours", "images_per_s"),
           ">= 240 (official implementation: 130)", "img/s", minimum=240),
    Target("teacher end to end / model only (dsmd extract)", "teacher_end_to_end", ("ratio",), ">= 0.80", "",
           minimum=0.8),
    Target("student full step, ViT-B/16 + BERT-base, batch 256 bf16", "student_step", ("full_samples_per_s",),
           ">= 1700", "samples/s", minimum=1700),
    Target("student full step / bare step", "student_step", ("full_over_bare",), ">= 0.90", "", minimum=0.9),
    Target("teacher load peak RSS / checkpoint (float32 run)", "teacher_load_memory", ("new", "ratio"), "<= 1.2",
           "x", maximum=1.2),
)


class Report:
    def __init__(self, out: Path, *, dry_run: bool, budget_s: float, meta: dict, started: float) -> None:
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.dry_run = dry_run
        self.budget_s = budget_s
        self.meta = meta
        self.started = started  # time.monotonic() at the start of the script
        self.sections: dict[str, dict] = {}

    def record(self, name: str, entry: dict) -> None:
        self.sections[name] = entry
        self.write()

    def targets(self) -> list[dict]:
        rows = []
        for target in TARGETS:
            value = target.value(self.sections)
            rows.append({
                "name": target.name,
                "section": target.section,
                "wanted": target.wanted,
                "value": value,
                "unit": target.unit,
                # A dry run measures tiny models on a CPU: its numbers say nothing about the targets.
                "passed": None if self.dry_run else target.passed(value),
            })
        return rows

    def document(self) -> dict:
        return {
            "schema": SCHEMA,
            "dry_run": self.dry_run,
            "meta": self.meta,
            "budget_s": self.budget_s,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "sections": self.sections,
            "targets": self.targets(),
        }

    def write(self) -> None:
        doc = self.document()
        _replace(self.out / JSON_NAME, json.dumps(doc, indent=1, default=str) + "\n")
        _replace(self.out / MD_NAME, markdown(doc))


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "/").replace("\n", " ")


def _flat(results: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flat(value, name + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for index, item in enumerate(value):
                rows += _flat(item, f"{name}[{index}].")
        else:
            rows.append((name, value))
    return rows


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    title = "GPU acceptance" + (" (dry run: tiny models on the CPU, not a measurement)" if doc["dry_run"] else "")
    lines = [f"# {title}", ""]
    lines += [f"- device: {_fmt(meta.get('device'))}",
              f"- torch {_fmt(meta.get('torch'))}, CUDA {_fmt(meta.get('cuda'))}, Python {_fmt(meta.get('python'))}",
              f"- bf16 peak (datasheet, dense): {_fmt(meta.get('bf16_peak_tflops'))} TFLOP/s; measured "
              f"{_fmt(meta.get('matmul_n'))}^3 matrix product: {_fmt(meta.get('matmul_tflops'))} TFLOP/s",
              f"- started {_fmt(meta.get('started'))}; {doc['elapsed_s']} s of a {doc['budget_s']:.0f} s budget", ""]
    lines += ["## Targets", "", "| target | wanted | measured | passed |", "|---|---|---|---|"]
    for row in doc["targets"]:
        measured = "-" if row["value"] is None else f"{_fmt(row['value'])} {row['unit']}".strip()
        verdict = "n/a" if row["passed"] is None else ("PASS" if row["passed"] else "FAIL")
        lines.append(f"| {row['name']} | {row['wanted']} | {measured} | {verdict} |")
    lines += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, entry in doc["sections"].items():
        note = entry.get("error") or entry.get("reason") or ""
        lines.append(f"| {name} | {entry['status']} | {_fmt(entry.get('seconds'))} | {_fmt(note)} |")
    for name, entry in doc["sections"].items():
        results = entry.get("results")
        if not results:
            continue
        lines += ["", f"### {name}", "", "| measure | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in _flat(results)]
    return "\n".join(lines) + "\n"
