"""The report's distillation-gain section: which runs it takes, mean and spread over seeds, the 3x-spread bar."""

import statistics

import pytest

from stages.evaluate.gain import gain_section, headline_runs, summarise


def row(name, method, seed, rsum, cd=True, params=1_200_000):
    values = {"experiment": name, "distill.method": method, "distill.seed": float(seed), "distill.losses.cd": cd,
              "student.rsum": rsum, "student.i2t_r1": rsum / 10, "student.parameters": params,
              "teacher.rsum": 400.0, "teacher.i2t_r1": 50.0, "teacher.parameters": 8_400_000,
              "chance.rsum": 3.0, "chance.i2t_r1": 0.1}
    return values


def document(rows):
    return {"varying": ["distill.losses.cd", "distill.method", "distill.seed"], "rows": rows}


ROWS = [
    row("main", "dsmd", 0, 370.0),
    row("d1", "dsmd", 1, 374.0),
    row("d2", "dsmd", 2, 366.0),
    row("no-cd", "dsmd", 0, 300.0, cd=False),  # an ablation: not a headline run
    row("b0", "supervised", 0, 300.0),
    row("b1", "supervised", 1, 310.0),
    row("b2", "supervised", 2, 305.0),
    row("b2-again", "supervised", 2, 1.0),  # the same seed twice counts once (the first listed)
    row("m0", "mcad", 0, 320.0),
    row("m1", "mcad", 1, 330.0),
]


def test_headline_runs_are_the_method_and_seed_variations_of_the_baseline():
    runs = headline_runs(document(ROWS))
    assert {m: [r["experiment"] for r in rows] for m, rows in runs.items()} == {
        "dsmd": ["main", "d1", "d2"], "supervised": ["b0", "b1", "b2"], "mcad": ["m0", "m1"]}


def test_summary_is_mean_and_sample_standard_deviation():
    summary = summarise(headline_runs(document(ROWS))["dsmd"])
    assert summary["rsum"]["mean"] == pytest.approx(370.0)
    # Hand-computed: deviations 0, 4, -4 -> sum of squares 32, over n - 1 = 2 -> sqrt(16) = 4.
    assert summary["rsum"]["spread"] == pytest.approx(4.0)
    assert summary["rsum"]["n"] == 3 and summary["parameters"]["mean"] == 1_200_000
    single = summarise([ROWS[0]])
    assert single["rsum"]["spread"] is None


def test_section_judges_each_gain_against_three_times_the_larger_spread():
    md, parts = gain_section(document(ROWS))
    text = "\n".join(md)
    assert md[0] == "## Distillation gain"
    assert "| DSMD student | 1.20M | 3 | 37.0 ± 0.4 |" in text
    assert "| teacher | 8.40M | 1 fit | 50.0 |" in text
    # DSMD 370 vs baseline 305 (spread 5): +65 = 13x -> holds. MCAD 325 (spread 7.07): +20 = 2.8x -> does not.
    assert "DSMD student minus baseline: +65.0 RSUM = 13.0x the larger seed spread (5.0); the bar of 3x holds" in text
    mcad_spread = statistics.stdev([320.0, 330.0])
    assert (f"+20.0 RSUM = {20 / mcad_spread:.1f}x the larger seed spread ({mcad_spread:.1f}); the bar of 3x "
            "does NOT hold") in text
    assert "92.5% of the teacher's RSUM with 1/7.0 of its parameters" in text
    assert '<table class="gain" id="gain">' in "".join(parts)


def test_no_section_without_a_baseline_or_without_a_distilled_student():
    assert gain_section(document([r for r in ROWS if r["distill.method"] != "supervised"])) == ([], [])
    assert gain_section(document([r for r in ROWS if r["distill.method"] == "supervised"])) == ([], [])
    assert gain_section(None) == ([], [])


def test_readme_demo_table_is_the_shipped_experiments():
    """The README's demo table is the gain section of results/ablations.json, line for line."""
    from paths import REPO
    from readme_tables import assert_readme_quotes

    from stages.evaluate.experiments import load_saved

    md, _ = gain_section(load_saved(REPO / "results" / "ablations.json"))
    assert_readme_quotes(md, "teacher / DSMD / baseline runs")
