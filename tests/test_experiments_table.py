"""The experiments table: rows gathered from DVC, saved for the report, rendered in the evaluation report."""

from __future__ import annotations

import json

import pytest
from paths import REPO
from test_report import report_inputs  # noqa: F401 - the report's inputs, a module fixture

from pipeline.dvc_metrics import from_exp_row, write_by_measure
from pipeline.errors import DsmdError
from stages.evaluate.experiments import (
    _without_repeated_baselines,
    load_saved,
    metrics_of,
    report_section,
    save_for_report,
    table_from_exp_rows,
)
from stages.evaluate.report import write_report

VARYING = ["distill.losses.cd", "distill.method", "distill.seed"]


def _row(name: str, cd: bool, method: str, rsum: float) -> dict:
    return {"experiment": name, "rev": name[:4], "created": "2026-11-25T20:00:00", "distill.losses.cd": cd,
            "distill.method": method, "distill.seed": 0.0, "student.i2t_r1": 10.0, "student.t2i_r1": 12.5,
            "student.rsum": rsum, "teacher.rsum": 233.0, "run.rsum_ratio": rsum / 233.0}


ROWS = [_row("main", True, "dsmd", 236.4), _row("no-cd", False, "dsmd", 230.1), _row("mcad", True, "mcad", 240.2)]


def test_workspace_row_is_dropped_only_when_it_repeats_a_result():
    workspace = {**ROWS[0], "experiment": "workspace", "rev": "workspace"}
    baselines = [True, True, False, False]
    kept = _without_repeated_baselines(VARYING, [workspace, *ROWS], baselines)
    assert [r["experiment"] for r in kept] == ["main", "no-cd", "mcad"]
    changed = {**workspace, "student.rsum": 200.0}
    assert _without_repeated_baselines(VARYING, [changed, *ROWS], baselines)[0]["experiment"] == "workspace"


def _exp_row(name, rev, rsum, state="Success", **params):
    return {"Experiment": name, "rev": rev, "State": state, "Created": "2026-12-02T14:00:00",
            "runs/evaluate/metrics/rsum.json:student": rsum, "runs/evaluate/metrics/rsum.json:teacher": 240.0,
            **params}


def test_runs_of_several_commits_make_one_table():
    """dvc.api.exp_show(revs=[HEAD, older]) rows: the older commit lacks a later setting (DVC says "None" or
    leaves the column out; its default counts),
    repeats HEAD's own run (dropped), and has runs of its own (kept); unfinished runs are not results."""
    raw = [
        _exp_row(None, "main", 152.9, state=None, **{"distill.seed": 0.0, "extract.views": 0.0}),
        _exp_row("views8-seed-0", "a9845b7", 195.9, **{"distill.seed": 0.0, "extract.views": 8.0}),
        _exp_row("views8-seed-1", "b464ece", 152.9, state="Running", **{"distill.seed": 1.0, "extract.views": 8.0}),
        _exp_row("views8-seed-2", "caf8333", 152.9, state="Queued", **{"distill.seed": 2.0, "extract.views": 8.0}),
        _exp_row(None, "1aeee7e", 152.9, state=None, **{"distill.seed": 0.0, "extract.views": "None"}),
        _exp_row("dsmd-seed-1", "d235562", 153.8, **{"distill.seed": 1.0}),
    ]
    varying, rows = table_from_exp_rows(raw, "runs/evaluate/metrics")
    assert varying == ["distill.seed", "extract.views"]
    assert [(r["experiment"], r["distill.seed"], r["extract.views"], r["student.rsum"]) for r in rows] == [
        ("main", 0, 0, 152.9), ("views8-seed-0", 0, 8, 195.9), ("dsmd-seed-1", 1, 0, 153.8)]
    assert all(isinstance(r["distill.seed"], int) for r in rows)  # DVC's 1.0 reads as the seed it is
    # The older commit's own run differs from HEAD's: it stays.
    raw[4]["runs/evaluate/metrics/rsum.json:student"] = 150.0
    assert [r["experiment"] for r in table_from_exp_rows(raw, "runs/evaluate/metrics")[1]] == [
        "main", "views8-seed-0", "1aeee7e", "dsmd-seed-1"]


def test_saved_table_round_trips_and_renders_every_row(tmp_path):
    path = save_for_report(tmp_path / "results" / "ablations.json", VARYING, ROWS)
    document = load_saved(path)
    assert document["rows"] == ROWS and document["varying"] == VARYING
    md, parts = report_section(document, "results/ablations.json")
    text = "\n".join(md)
    assert "| experiment | distill.losses.cd | distill.method | distill.seed | student.i2t_r1 |" in text
    # Parameters as written (DVC returns the seed as a float), metrics rounded.
    assert "| no-cd | False | dsmd | 0 | 10.0 | 12.5 | 230.1 | 233.0 | 0.988 |" in text
    assert "3 runs" in text
    page = "".join(parts)
    assert page.count("<tr>") == 1 + len(ROWS) and "mcad" in page


def test_missing_or_empty_table_says_how_to_make_one(tmp_path):
    assert load_saved("") is None and load_saved(tmp_path / "absent.json") is None
    for document in (None, {"rows": []}):
        md, parts = report_section(document, "results/ablations.json")
        assert "No experiments gathered yet" in md[2] and "dsmd experiments" in parts[1]


def test_a_broken_table_is_a_clear_error(tmp_path):
    bad = tmp_path / "ablations.json"
    bad.write_text("{not json")
    with pytest.raises(DsmdError, match="ablations.json: not valid JSON.*dsmd experiments"):
        load_saved(bad)
    bad.write_text(json.dumps({"rows": "x"}))
    with pytest.raises(DsmdError, match="no rows list"):
        load_saved(bad)
    bad.write_text(json.dumps({"rows": [], "metrics": ["student.i2t_r1", "student_rsum"]}))
    with pytest.raises(DsmdError, match="'student_rsum' is a name of the older flat metrics.json.*dsmd experiments"):
        load_saved(bad)


def test_shipped_table_renders_every_run():
    """results/ablations.json (real runs, kept in git) in the current layout: the demo's report shows them all."""
    document = load_saved(REPO / "results" / "ablations.json")
    md, _ = report_section(document, "results/ablations.json")
    text = "\n".join(md)
    # The baseline commit, the nine headline seeds (dsmd, mcad, supervised x 3) and the three-seed groups of
    # stored views (K = 4, 8, mismatch) and the block order, gathered from four commits, as the README reports them.
    assert "22 runs" in text
    assert "| main | dsmd | shuffle | 0 | 8 | 0 | plain | 0 | 7.200 | 8.340 | 152.9 | 240.8 | 0.635 |" in text
    assert "| mcad-seed-0 | mcad | shuffle | 0 | 8 | 0 | plain | 0 | 8.700 | 9.820 | 167.0 | 240.8 | 0.694 |" in text
    assert "| views8-seed-1 | dsmd | shuffle | 0 | 8 | 1 | replay | 8 | 11.9 | 10.9 | 213.1 | 240.8 | 0.885 |" in text
    assert "| blocks-seed-0 | dsmd | blocks | 50 | 2 | 0 | plain | 0 | 9.300 | 9.920 | 173.1 | 240.8 | 0.719 |" in text
    assert text.index("## Distillation gain") < text.index("## Seed groups") < text.index("## Ablations and other")


def test_exp_show_columns_map_back_to_metrics_json_names(tmp_path):
    """What dvc.api.exp_show returns for metrics/ (columns <dir>/<measure>.json:<model>) read back by name."""
    written = write_by_measure(tmp_path / "runs/evaluate/metrics", {
        "student": {"rsum": 236.4, "i2t_r1": 14.1, "parameters": 5_000_000, "name": "not a number"},
        "teacher": {"rsum": 233.0, "i2t_r1": 15.0},
        "teachers.beit3_small": {"rsum": 200.0},
    })
    assert [path.name for path in written] == ["i2t_r1.json", "parameters.json", "rsum.json"]
    assert json.loads(written[2].read_text()) == {"student": 236.4, "teacher": 233.0, "teachers.beit3_small": 200.0}
    row = {"Experiment": "no-cd", "rev": "c9a5752", "distill.losses.cd": False, "params.yaml:student.img_size": 64,
           "runs/evaluate/metrics/rsum.json:student": 236.4, "runs/evaluate/metrics/rsum.json:teacher": 233.0,
           "runs/evaluate/metrics/rsum.json:teachers.beit3_small": 200.0,
           "runs/evaluate/metrics/i2t_r1.json:student": 14.1,
           "runs/distill/metrics/best_val_rsum.json:student": 240.0}
    assert from_exp_row(row, "runs/evaluate/metrics") == from_exp_row(row, "./runs/evaluate/metrics/") == {
        "student.rsum": 236.4, "teacher.rsum": 233.0, "teachers.beit3_small.rsum": 200.0, "student.i2t_r1": 14.1}
    assert metrics_of(row, "runs/evaluate/metrics")["run.rsum_ratio"] == pytest.approx(236.4 / 233.0)
    assert from_exp_row(row, "runs/distill/metrics") == {"student.best_val_rsum": 240.0}
    assert "run.rsum_ratio" not in metrics_of({"runs/evaluate/metrics/rsum.json:student": 1.0}, "runs/evaluate/metrics")


def test_report_holds_the_experiments_and_other_teachers(tmp_path, report_inputs):  # noqa: F811
    other = {k: v - 5 for k, v in report_inputs["teacher"].items()}
    section = report_section({"rows": ROWS, "varying": VARYING, "gathered": "today"}, "results/ablations.json")
    write_report(tmp_path, **{**report_inputs, "train_log": None, "pca_feats": None},
                 other_teachers={"small": other}, experiments=section)
    md = (tmp_path / "report.md").read_text()
    assert "| metric | student | teacher | teacher small | chance |" in md
    assert "## Ablations and other experiments (DVC experiments)" in md and "| mcad | True | mcad | 0 |" in md
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["student", "teacher", "teachers", "chance", "run"]
    assert metrics["teachers"]["small"]["rsum"] == pytest.approx(report_inputs["teacher"]["rsum"] - 5)
    rsum = json.loads((tmp_path / "metrics" / "rsum.json").read_text())
    assert list(rsum) == ["student", "teacher", "teachers.small", "chance"]
    page = (tmp_path / "report.html").read_text()
    assert 'id="experiments"' in page and page.index("Ablations") < page.index("Example queries")
