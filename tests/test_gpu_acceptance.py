"""benchmarks/gpu_acceptance.py: the dry run (tiny models on the CPU) as the GPU image would run it, with the
packages that image lacks made unimportable; the report's content; the budget, failure and timeout handling;
and the reference the teacher is timed against (same function, FLOPs counted right).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from paths import REPO
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(REPO))

from benchmarks.gpu_checks.common import Run, beit3_flops  # noqa: E402
from benchmarks.gpu_checks.naive_attention import NaiveSelfAttention, naive_attention  # noqa: E402
from benchmarks.gpu_checks.report import TARGETS, Report  # noqa: E402
from pipeline.models.beit3 import BEiT3Config, BEiT3Retrieval  # noqa: E402

# Not on the GPU image (/work/.library/device/KINDS.md) and not carried: an import of any of them on the
# acceptance path would fail there.
ABSENT = ("zarr", "numcodecs", "dask", "distributed", "dvc", "faiss", "donfig")
# Not on the image either, so `make gpu-wheels` carries it: import name -> distribution.
CARRIED = {"google_crc32c": "google-crc32c"}
SECTIONS = ["teacher_model", "student_step", "teacher_end_to_end", "teacher_load_memory", "demo_distill",
            "student_step_compiled"]

SITECUSTOMIZE = """
import atexit, os, sys

ABSENT = {absent!r}


class _Absent:
    # As if the package were not installed: every import of it or of its submodules fails.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU image)", name=name)
        return None


sys.meta_path.insert(0, _Absent())


@atexit.register
def _record():
    out = os.environ.get("DSMD_IMPORTED")
    if out and os.getpid() == int(os.environ.get("DSMD_IMPORTED_PID", "0") or 0):
        with open(out, "w") as handle:
            handle.write("\\n".join(sorted({{m.split(".")[0] for m in sys.modules}})))
"""


def _device_like_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE.format(absent=set(ABSENT))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "PYTHONUNBUFFERED": "1"}
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-acceptance")
    env = _device_like_env(tmp)
    out, imported = tmp / "out", tmp / "imported.txt"
    script = (
        "import os, runpy, sys; os.environ['DSMD_IMPORTED_PID'] = str(os.getpid()); "
        f"sys.argv = ['gpu_acceptance.py', '--dry-run', '--out', {str(out)!r}]; "
        f"runpy.run_path({str(REPO / 'benchmarks' / 'gpu_acceptance.py')!r}, run_name='__main__')"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp, env={**env, "DSMD_IMPORTED": str(imported)},
                          capture_output=True, text=True, timeout=400, check=False)
    seconds = time.monotonic() - started
    return {"proc": proc, "out": out, "seconds": seconds, "imported": imported, "env": env}


def test_the_absent_packages_really_are_unimportable_under_the_poison(dry_run):
    for name in ("zarr", "dask.distributed"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], env=dry_run["env"], capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode != 0 and "absent on the GPU image" in proc.stderr, name


def test_dry_run_passes_without_the_packages_the_gpu_image_lacks(dry_run):
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert dry_run["seconds"] < 240, dry_run["seconds"]  # the issue asks for < 2 min on a CPU; slack for CI load
    doc = json.loads((dry_run["out"] / "gpu_acceptance.json").read_text())
    assert doc["dry_run"] is True and doc["schema"] == 1
    assert list(doc["sections"]) == SECTIONS
    failed = {name: entry.get("error") for name, entry in doc["sections"].items() if entry["status"] != "ok"}
    assert not failed, failed
    imported = set(dry_run["imported"].read_text().split())
    assert not imported & set(ABSENT)
    # Each carried package the run needs is in the Makefile's wheel list.
    wheels = re.search(r"^GPU_WHEELS\s*:?=(.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    for module, dist in CARRIED.items():
        if module in imported:
            assert dist in wheels, dist


def test_dry_run_report_holds_every_measure(dry_run):
    doc = json.loads((dry_run["out"] / "gpu_acceptance.json").read_text())
    meta = doc["meta"]
    assert meta["torch"] == torch.__version__ and meta["device"].startswith("cpu") and meta["matmul_tflops"] > 0
    res = {name: entry["results"] for name, entry in doc["sections"].items()}

    teacher = res["teacher_model"]
    for side in ("ours", "reference"):
        for key in ("images_per_s", "captions_per_s", "image_tflops", "text_tflops"):
            assert teacher[side][key] > 0, (side, key)
    # fp32 on the CPU: the reference computes the same function.
    assert teacher["min_cosine_ours_vs_reference"] > 0.9999
    assert teacher["speedup_images"] == pytest.approx(
        teacher["ours"]["images_per_s"] / teacher["reference"]["images_per_s"])

    for name in ("student_step", "student_step_compiled"):
        step = res[name]
        assert step["bare_samples_per_s"] > 0 and step["full_samples_per_s"] > 0 and step["gflop_per_sample"] > 0
        assert step["full_over_bare"] == pytest.approx(step["full_samples_per_s"] / step["bare_samples_per_s"])
        assert step["steps_measured"] >= 1
    assert res["student_step"]["compiled"] is False and res["student_step_compiled"]["compiled"]

    e2e = res["teacher_end_to_end"]
    assert e2e["extract_rows_encoded"] == e2e["images"] + e2e["captions"] and e2e["extract_skipped"] == 0
    assert e2e["stored_rows_unit_norm"] is True
    assert e2e["ratio"] == pytest.approx(e2e["model_only_seconds"] / e2e["extract_fill_seconds"])

    memory = res["teacher_load_memory"]
    assert {"old", "new", "new-bf16"} <= set(memory)
    assert memory["new-bf16"]["dtype"] == "bfloat16" and memory["new"]["dtype"] == "float32"
    assert all(memory[m]["ratio"] >= 0 for m in ("old", "new", "new-bf16"))

    demo = res["demo_distill"]
    assert len(demo["val_rsum_per_epoch"]) == demo["distill_epochs"] and demo["distill_steps"] > 0
    assert 0 < demo["val_rsum_chance"] < 600

    # Targets: every one found its value; a dry run judges none of them.
    assert [t["name"] for t in doc["targets"]] == [t.name for t in TARGETS]
    assert all(t["value"] is not None and t["passed"] is None for t in doc["targets"])

    md = (dry_run["out"] / "gpu_acceptance.md").read_text()
    assert md.startswith("# GPU acceptance (dry run")
    assert "## Targets" in md and md.count("| n/a |") == len(TARGETS)
    for name in SECTIONS:
        assert f"| {name} | ok |" in md and f"### {name}" in md
    assert "torch " + torch.__version__ in md


# ------------------------------------------------------------------------------- budget, failures, timeouts


def _run(tmp_path, seconds_left: float) -> Run:
    return Run(dry=True, device=torch.device("cpu"), work=tmp_path, deadline=time.monotonic() + seconds_left)


def test_sections_are_skipped_stopped_or_failed_without_losing_the_others(tmp_path):
    import benchmarks.gpu_acceptance as acceptance

    report = Report(tmp_path / "out", dry_run=True, budget_s=10, meta={}, started=time.monotonic())

    def fails(run):
        raise RuntimeError("boom\nsecond line")

    def sleeps(run):
        time.sleep(30)

    def swallows(run):
        try:
            time.sleep(30)
        except Exception:  # noqa: BLE001 - as torch.compile does, falling back to eager on any error
            pass
        return {"x": 1}

    def wraps(run):
        try:
            time.sleep(30)
        except Exception as exc:  # noqa: BLE001 - as inductor does, raising its own error around it
            raise ValueError(f"compilation failed: {exc}") from exc

    acceptance.run_section(acceptance.Section("fails", fails, 1), _run(tmp_path, 60), report)
    acceptance.run_section(acceptance.Section("ok", lambda run: {"value": 2.5}, 1), _run(tmp_path, 60), report)
    acceptance.run_section(acceptance.Section("short", lambda run: {}, 4), _run(tmp_path, 3), report)
    acceptance.run_section(acceptance.Section("sleeps", sleeps, 1), _run(tmp_path, 3), report)
    acceptance.run_section(acceptance.Section("swallows", swallows, 1), _run(tmp_path, 2), report)
    acceptance.run_section(acceptance.Section("wraps", wraps, 1), _run(tmp_path, 2), report)

    doc = json.loads((tmp_path / "out" / "gpu_acceptance.json").read_text())
    sections = doc["sections"]
    assert sections["fails"]["status"] == "failed" and sections["fails"]["error"] == "RuntimeError: boom"
    assert sections["ok"] == {"status": "ok", "results": {"value": 2.5}, "seconds": sections["ok"]["seconds"]}
    assert sections["short"]["status"] == "skipped" and "budget" in sections["short"]["reason"]
    assert sections["sleeps"]["status"] == "timeout" and 2 <= sections["sleeps"]["seconds"] < 8
    assert sections["swallows"]["status"] == "timeout" and sections["swallows"]["results"] == {"x": 1}
    assert sections["swallows"]["seconds"] < 6
    assert sections["wraps"]["status"] == "timeout" and "ValueError: compilation failed" in sections["wraps"]["error"]


def test_targets_judge_minimum_and_maximum():
    by_name = {t.section + "/" + ".".join(t.path): t for t in TARGETS}
    images = by_name["teacher_model/ours.images_per_s"]
    assert images.passed(240.0) and not images.passed(239.9) and images.passed(None) is None
    memory = by_name["teacher_load_memory/new.ratio"]
    assert memory.passed(1.2) and not memory.passed(1.21)
    assert images.value({"teacher_model": {"results": {"ours": {"images_per_s": 250}}}}) == 250.0
    assert images.value({"teacher_model": {"status": "failed"}}) is None


# ------------------------------------------------------------------------- the reference and the FLOPs


def test_reference_arithmetic_is_the_same_function_and_flops_are_counted_right():
    torch.manual_seed(0)
    cfg = BEiT3Config(embed_dim=64, heads=4, ffn_dim=128, layers=2, img_size=32, vocab_size=100)
    model = BEiT3Retrieval(cfg).eval()
    model.init_weights()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.randint(3, 100, (3, 9))
    pad = torch.zeros(3, 9, dtype=torch.long)
    pad[0, 6:] = 1  # a padded caption: the mask must be applied the same way
    with torch.no_grad():
        ours = (model.encode_image(pixels), model.encode_text(ids, pad), model.encode_pair(pixels, ids, pad))
        with naive_attention(model):
            assert isinstance(model.beit3.encoder.layers[0].self_attn, NaiveSelfAttention)
            with FlopCounterMode(display=False) as counter:
                ref_image = model.encode_image(pixels)
            image_flops = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                ref_text = model.encode_text(ids, pad)
            text_flops = counter.get_total_flops()
            ref_pair = model.encode_pair(pixels, ids, pad)
    # The context restores our modules; the reference shares the weights (nothing was copied).
    assert not isinstance(model.beit3.encoder.layers[0].self_attn, NaiveSelfAttention)
    for got, ref in zip(ours, (ref_image, ref_text, ref_pair), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # The reference's attention is plain bmm, which the counter sees: our formula must give the same count.
    assert image_flops == beit3_flops(cfg, 3, cfg.num_patches + 1, image=True)
    assert text_flops == beit3_flops(cfg, 3, 9, image=False)
