"""GPU acceptance in one call: every GPU target of the project measured within a time budget, on the device image
as it is (python3.12, its own torch, transformers, timm, pyarrow, h5py; no zarr, dask, dvc or faiss), run from
the source tree.

Sections, in this order (the most wanted first; each guarded, so one failure loses only itself):
  teacher_model          BEiT-3 giant 384 px bf16: images/s and captions/s, ours vs the torchscale-style
                         attention at the same weights, TFLOP/s          (target >= 240 img/s)
  student_step           ViT-B/16 + BERT-base, batch 256, bf16: the trainer's full step vs the bare step
                                                                         (targets >= 1700 samples/s, >= 90%)
  teacher_end_to_end     `dsmd extract` on 2,000 generated JPEGs into an HDF5 store vs the model alone
                                                                         (target >= 80%)
  teacher_load_memory    peak host memory of loading the giant checkpoint (8.5 GB, float32), old vs new way
                                                                         (target <= 1.2 x the file)
  demo_distill           the demo: data, teacher fit (CPU), extract and distill on the GPU
  student_step_compiled  the student step again with the student under torch.compile

After every section the results are rewritten to OUT/gpu_acceptance.json and OUT/gpu_acceptance.md. A section
is skipped (and recorded so) when less budget is left than it needs; one that overruns the budget is stopped.

    python benchmarks/gpu_acceptance.py --out results/gpu            # on the GPU (README: "GPU acceptance")
    python benchmarks/gpu_acceptance.py --dry-run --out /tmp/dry      # tiny models on the CPU, under 2 minutes
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports: the budget counts from the start of the process

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_checks.common import Run, device_facts, free_memory, matmul_ceiling  # noqa: E402
from benchmarks.gpu_checks.demo import demo_distill  # noqa: E402
from benchmarks.gpu_checks.report import Report  # noqa: E402
from benchmarks.gpu_checks.student import student_step, student_step_compiled  # noqa: E402
from benchmarks.gpu_checks.teacher import teacher_end_to_end, teacher_load_memory, teacher_model  # noqa: E402


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Run], dict]
    needs_s: float  # budget it needs on the GPU to be worth starting (a dry run needs far less)


SECTIONS = (
    Section("teacher_model", teacher_model, 45),
    Section("student_step", student_step, 60),
    Section("teacher_end_to_end", teacher_end_to_end, 100),
    Section("teacher_load_memory", teacher_load_memory, 50),
    Section("demo_distill", demo_distill, 70),
    Section("student_step_compiled", student_step_compiled, 90),
)


class SectionTimeout(Exception):
    pass


_overran = False  # the alarm went off during the current section
_in_section = False  # a section's own code is running (only there may the alarm raise)


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    global _overran
    _overran = True
    if not _in_section:
        return
    # Some libraries catch every exception (torch.compile falls back to eager on one): fire again until the
    # section gives up.
    signal.alarm(3)
    raise SectionTimeout("stopped: the run's time budget ran out during this section")


def _call(section: Section, run: Run) -> dict:
    global _in_section
    _in_section = True
    try:
        return section.run(run)
    finally:
        _in_section = False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def run_section(section: Section, run: Run, report: Report) -> None:
    left = run.left()
    needs = min(5.0, section.needs_s) if run.dry else section.needs_s
    if left < needs:
        report.record(section.name, {"status": "skipped", "seconds": 0.0,
                                     "reason": f"budget: {left:.0f} s left, the section needs about {needs:.0f} s"})
        print(f"[{section.name}] skipped: {left:.0f} s left", flush=True)
        return
    print(f"[{section.name}] start ({left:.0f} s of budget left)", flush=True)
    started = time.monotonic()
    # The alarm stops a section that would overrun the whole budget, so that the report is still written.
    global _overran
    _overran = False
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(left)))
    try:
        results = _call(section, run)
        entry = {"status": "ok", "results": results}
    except SectionTimeout as exc:
        entry = {"status": "timeout", "error": str(exc)}
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one failing section must not lose the others
        entry = {"status": "failed", "error": _one_line(exc),
                 "traceback": traceback.format_exc().splitlines()[-12:]}
    finally:
        signal.alarm(0)
    if _overran and entry["status"] != "timeout":
        # The stop was swallowed or wrapped on the way (torch.compile falls back to eager, or raises its own
        # error around it): the figures, if any, are not the section's own. Keep them, but say so.
        note = f" ({entry['error']})" if "error" in entry else " (results partial)"
        entry["status"] = "timeout"
        entry["error"] = "the time budget ran out during this section" + note
    entry["seconds"] = round(time.monotonic() - started, 1)
    free_memory(run.device)
    report.record(section.name, entry)
    print(f"[{section.name}] {entry['status']} in {entry['seconds']} s"
          + (f": {entry['error']}" if "error" in entry else ""), flush=True)


def _summary(report: Report) -> str:
    lines = ["", "target | measured | verdict"]
    for row in report.targets():
        measured = "-" if row["value"] is None else f"{row['value']:.3g} {row['unit']}".strip()
        verdict = "n/a" if row["passed"] is None else ("PASS" if row["passed"] else "FAIL")
        lines.append(f"{row['name']} ({row['wanted']}) | {measured} | {verdict}")
    lines.append("sections: " + ", ".join(f"{k} {v['status']}" for k, v in report.sections.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_acceptance.json / .md")
    parser.add_argument("--dry-run", action="store_true", help="tiny configurations on the CPU (a test)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (default 540)")
    parser.add_argument("--sections", nargs="+", choices=[s.name for s in SECTIONS], help="only these")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; use --dry-run for the CPU check")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        # Tiny models: one intra-op thread, else OpenMP threads spin against each other on a small shared CPU.
        torch.set_num_threads(1)
    meta = device_facts(device)
    meta["started"] = datetime.now(UTC).isoformat(timespec="seconds")
    meta["matmul_n"] = 8192 if device.type == "cuda" else 256
    # Three significant figures: a loaded CPU in a dry run does a few GFLOP/s, which one decimal rounds to 0.
    meta["matmul_tflops"] = float(f"{matmul_ceiling(device, meta['matmul_n']):.3g}")
    report = Report(args.out, dry_run=args.dry_run, budget_s=args.budget, meta=meta, started=STARTED)
    report.write()
    print(f"{meta['device']}, torch {meta['torch']}: matrix product {meta['matmul_tflops']} TFLOP/s", flush=True)

    chosen = [s for s in SECTIONS if not args.sections or s.name in args.sections]
    with tempfile.TemporaryDirectory(prefix="dsmd-gpu-acceptance-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        run = Run(dry=args.dry_run, device=device, work=work, deadline=STARTED + args.budget,
                  peak_tflops=meta.get("bf16_peak_tflops"))
        for section in chosen:
            run_section(section, run, report)
    report.write()
    print(_summary(report), flush=True)
    print(f"report: {args.out / 'gpu_acceptance.md'}", flush=True)
    return 0 if all(entry["status"] == "ok" for entry in report.sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
