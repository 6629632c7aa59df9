"""The report's seed groups: runs pooled over seeds by their settings, each judged against the baseline's group."""

from __future__ import annotations

from stages.evaluate.groups import groups_section, seed_groups


def row(name, seed, rsum, views=0, mode="plain"):
    recall = {} if rsum is None else {"student.i2t_r1": rsum / 20, "student.t2i_r1": rsum / 25}
    return {"experiment": name, "distill.seed": seed, "extract.views": views, "distill.views": mode,
            "student.rsum": rsum, **recall}


VARYING = ["distill.seed", "distill.views", "extract.views"]
ROWS = [
    row("workspace", 0, 1.0),  # never the reference
    row("main", 0, 150.0),
    row("v8-0", 0, 196.0, 8, "replay"),
    row("v8-1", 1, 200.0, 8, "replay"),
    row("v8-1-again", 1, 5.0, 8, "replay"),  # a seed listed twice counts once, the first listed
    row("d1", 1, 154.0),
    row("d2", 2, 146.0),
    row("m8-0", 0, 151.0, 8, "mismatch"),
    row("no-result", 3, None),
]


def test_groups_pool_the_seeds_of_equal_settings_baseline_first():
    groups = seed_groups({"varying": VARYING, "rows": ROWS})
    assert [[r["experiment"] for r in rows] for _, rows in groups] == [
        ["workspace", "d1", "d2"], ["v8-0", "v8-1"], ["m8-0"]]
    # The workspace row shares the baseline's settings and seed 0; it is listed first, so it stands for seed 0.
    assert groups[0][0] == {"distill.views": "plain", "extract.views": 0}


def test_section_figures_and_verdicts_by_hand():
    rows = [r for r in ROWS if r["experiment"] != "workspace"]
    md, html_parts = groups_section({"varying": VARYING, "rows": rows})
    table = [line for line in md if line.startswith("| ")]
    # Baseline: 150, 154, 146 -> mean 150, sample sd 4. Views: 196, 200 -> mean 198, sd 2.83.
    assert table[1] == "| the baseline commit's settings | 3 | 150.0 ± 4.0 | 7.5 ± 0.2 | 6.0 ± 0.2 | - |"
    assert table[2] == ("| distill.views=replay extract.views=8 | 2 | 198.0 ± 2.8 | 9.9 ± 0.1 | 7.9 ± 0.1 | "
                        "+48.0 = +12.0x the larger spread (4.0): beyond 3x |")
    # One seed has no spread of its own: judged by the baseline's.
    assert table[3].endswith("| +1.0 = +0.2x the larger spread (4.0): within 3x |")
    assert 'id="groups"' in "".join(html_parts)


def test_no_section_without_a_group_of_several_seeds():
    single = [row("main", 0, 150.0), row("v8", 0, 190.0, 8, "replay")]
    assert groups_section({"varying": VARYING, "rows": single}) == ([], [])
    assert groups_section(None) == ([], [])


def test_readme_groups_table_is_the_shipped_experiments():
    """The README's seed-groups table (stored views, block order) is the report's section of
    results/ablations.json, line for line."""
    from paths import REPO
    from readme_tables import assert_readme_quotes

    from stages.evaluate.experiments import load_saved

    md, _ = groups_section(load_saved(REPO / "results" / "ablations.json"))
    assert_readme_quotes(md, "seed groups")
