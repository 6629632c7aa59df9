"""The evaluation report: metrics.json, plot data, Markdown, and an HTML page that really renders."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DsmdError
from pipeline.retrieval.metrics import chance_curves, chance_metrics, recall_curves, recall_from_ranks, retrieval_ranks
from stages.evaluate.report import pca_2d, read_train_log, write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_train_log(path: Path, steps: int = 60) -> Path:
    rng = np.random.default_rng(0)
    names = ["cd", "fd", "sd", "hnd"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "epoch", "lr", *names, *(f"w_{n}" for n in names), *(f"a_{n}" for n in names)])
        for step in range(steps):
            losses = [s * np.exp(-step / 30) + 0.01 * rng.random() for s in (5.0, 0.3, 0.5, 0.8)]
            weights = list(rng.dirichlet(np.ones(4)) * 4)
            magnitudes = [max(losses) / v for v in losses]
            lr = 1e-4 if step < 30 else 1e-5
            writer.writerow([step, step // 20, lr, *losses, *weights, *magnitudes])
    return path


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory):
    """A small but complete set of inputs, as the evaluate stage would pass them."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    n_images = 60
    caption_image = np.repeat(np.arange(n_images), 5)
    teacher_image = _unit(rng.standard_normal((n_images, 32)))
    teacher_text = _unit(teacher_image[caption_image] + 0.4 * rng.standard_normal((len(caption_image), 32)))
    student_image = _unit(teacher_image + 0.25 * rng.standard_normal(teacher_image.shape))
    student_text = _unit(teacher_text + 0.25 * rng.standard_normal(teacher_text.shape))
    teacher_ranks = retrieval_ranks(teacher_image, teacher_text, caption_image)
    student_ranks = retrieval_ranks(student_image, student_text, caption_image)
    image_dir = root / "images"
    image_dir.mkdir()
    paths = []
    for i in range(4):
        path = image_dir / f"img{i}.png"
        Image.new("RGB", (64 + 16 * i, 48), color=(60 * i, 200 - 40 * i, 120)).save(path)
        paths.append(str(path))
    examples = [
        {
            "query": "a red square <b>next to</b> a circle | with a pipe",
            "results": [
                {"path": paths[0], "score": 0.91, "correct": True},
                {"path": paths[1], "score": 0.85, "correct": False},
                {"path": str(image_dir / "missing.png"), "score": 0.80, "correct": False},
            ],
        },
        {
            "query": "image query",
            "query_path": paths[3],
            "results": [{"text": "a caption", "score": 0.7, "correct": True}],
        },
        {"query": "two blue triangles", "results": [{"path": paths[2], "score": 0.5, "correct": True}]},
    ]
    return {
        "dataset_name": "flickr30k",
        "student": recall_from_ranks(student_ranks),
        "teacher": recall_from_ranks(teacher_ranks),
        "chance": chance_metrics(n_images, caption_image),
        "curves": {
            "student": recall_curves(student_ranks),
            "teacher": recall_curves(teacher_ranks),
            "chance": chance_curves(n_images, caption_image),
        },
        "train_log": _write_train_log(root / "train_log.csv"),
        "pca_feats": (teacher_image, student_image),
        "examples": examples,
        "extra": {
            "student": {"parameters": 197_000_000, "query_ms": 2.1},
            "teacher": {"name": "beit3", "parameters": 1_900_000_000},
            "run": {"split": "test", "n_images": n_images, "unknown": None},
        },
    }


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, report_inputs):
    out = tmp_path_factory.mktemp("report")
    write_report(out, **report_inputs)
    return out


RECALLS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]


def test_metrics_json_is_nested_by_model(report_dir, report_inputs):
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert list(metrics) == ["student", "teacher", "chance", "run"]
    student, teacher = report_inputs["student"], report_inputs["teacher"]
    assert list(metrics["student"]) == [*RECALLS, "parameters", "query_ms"]
    for key in RECALLS:
        assert metrics["student"][key] == pytest.approx(student[key])
        assert metrics["teacher"][key] == pytest.approx(teacher[key])
    assert metrics["student"]["rsum"] == pytest.approx(sum(student[k] for k in RECALLS[:-1]))
    # 60 images with 5 captions each: a random ranking finds the right image in the top 10 for 10/60 captions.
    assert metrics["chance"]["t2i_r10"] == pytest.approx(100 * 10 / 60)
    assert metrics["student"]["parameters"] == 197_000_000 and metrics["student"]["query_ms"] == 2.1
    assert metrics["teacher"]["name"] == "beit3" and metrics["teacher"]["parameters"] == 1_900_000_000
    # The run group: what is about no single model; the None fact is left out.
    assert metrics["run"] == {"rsum_ratio": pytest.approx(student["rsum"] / teacher["rsum"]), "split": "test",
                              "n_images": 60}


def test_metrics_by_measure_for_dvc(report_dir, report_inputs):
    """metrics/: one file per measure keyed by model (what `dvc metrics show` draws as a row each)."""
    files = sorted(path.name for path in (report_dir / "metrics").iterdir())
    assert files == sorted([f"{key}.json" for key in RECALLS] + ["parameters.json", "query_ms.json"])
    rsum = json.loads((report_dir / "metrics" / "rsum.json").read_text())
    assert list(rsum) == ["student", "teacher", "chance"]
    assert rsum["teacher"] == pytest.approx(report_inputs["teacher"]["rsum"])
    assert json.loads((report_dir / "metrics" / "parameters.json").read_text()) == {
        "student": 197_000_000, "teacher": 1_900_000_000}
    assert json.loads((report_dir / "metrics" / "query_ms.json").read_text()) == {"student": 2.1}


def test_curves_csv(report_dir, report_inputs):
    with (report_dir / "plots" / "recall_at_k.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["k", "model", "i2t", "t2i"] and len(rows) == 3 * 50
    by_model = {(row["model"], int(row["k"])): row for row in rows}
    assert {model for model, _ in by_model} == {"student", "teacher", "chance"}
    assert sorted({k for _, k in by_model}) == list(range(1, 51))
    assert float(by_model["student", 5]["t2i"]) == pytest.approx(report_inputs["student"]["t2i_r5"], abs=1e-3)
    assert float(by_model["chance", 10]["t2i"]) == pytest.approx(100 * 10 / 60, abs=1e-3)


def test_markdown(report_dir):
    md = (report_dir / "report.md").read_text()
    assert "| metric | student | teacher | chance | BEiT-3 teacher (paper) | DSMD student (paper) |" in md
    assert "| RSUM |" in md and "528.8" in md and "586.5" in md
    # The details: every fact of metrics.json the retrieval table does not show, named by its place there.
    assert "| student.parameters | 197,000,000 |" in md and "| teacher.name | beit3 |" in md
    assert "| run.rsum_ratio | 0.273 |" in md and "student.rsum" not in md
    for figure in ("recall_at_k", "training", "pca"):
        assert f"(figures/{figure}.png)" in md
        assert (report_dir / "figures" / f"{figure}.png").stat().st_size > 1000
    assert "(figures/examples/q1_r1.png)" in md and "unreadable: missing.png" in md
    assert "(figures/examples/q2.png)" in md
    assert "&lt;b&gt;next to&lt;/b&gt; a circle | with a pipe" in md


def test_html_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "http://" not in page and "https://" not in page
    # The query text is escaped, not interpreted.
    assert "&lt;b&gt;next to&lt;/b&gt;" in page


def test_no_paper_column_for_other_datasets(tmp_path, report_inputs):
    inputs = {**report_inputs, "dataset_name": "shapes", "teacher": None, "train_log": None, "pca_feats": None}
    inputs["curves"] = {k: v for k, v in inputs["curves"].items() if k != "teacher"}
    write_report(tmp_path, **inputs)
    md = (tmp_path / "report.md").read_text()
    assert "| metric | student | chance |" in md and "paper" not in md
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["teacher"] == {"name": "beit3", "parameters": 1_900_000_000} and "rsum_ratio" not in metrics["run"]
    assert "training" not in md


def test_rewrite_drops_old_figures(tmp_path, report_inputs):
    write_report(tmp_path, **report_inputs)
    assert (tmp_path / "figures" / "examples" / "q3_r1.png").exists()
    write_report(tmp_path, **{**report_inputs, "examples": None, "pca_feats": None})
    assert not (tmp_path / "figures" / "examples").exists() and not (tmp_path / "figures" / "pca.png").exists()


def test_coco_has_its_paper_row(tmp_path, report_inputs):
    write_report(tmp_path, **{**report_inputs, "dataset_name": "MSCOCO-5k", "train_log": None, "pca_feats": None})
    assert "DSMD student, 5K (paper)" in (tmp_path / "report.md").read_text()


def test_train_log_errors(tmp_path):
    with pytest.raises(DsmdError, match="not found"):
        read_train_log(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("step,lr,cd\n0,1e-4,1.0\n1,1e-4,oops\n")
    with pytest.raises(DsmdError, match=r"row 3, column 'cd': 'oops'"):
        read_train_log(bad)
    bad.write_text("epoch,cd\n0,1\n")
    with pytest.raises(DsmdError, match="'step' column"):
        read_train_log(bad)
    good = tmp_path / "good.csv"
    good.write_text("step,cd,w_cd\n0,1.5,\n1,1.2,1.0\n")
    log = read_train_log(good)
    assert log["cd"].tolist() == [1.5, 1.2] and np.isnan(log["w_cd"][0])


def test_extra_must_not_shadow_metrics(tmp_path, report_inputs):
    inputs = {**report_inputs, "train_log": None, "pca_feats": None}
    with pytest.raises(DsmdError, match="student.rsum would overwrite"):
        write_report(tmp_path, **{**inputs, "extra": {"student": {"rsum": 1.0}}})
    with pytest.raises(DsmdError, match="'latency' is not a group"):
        write_report(tmp_path, **{**inputs, "extra": {"latency": {"student": 2.1}}})
    with pytest.raises(DsmdError, match=r"run.sizes is a list"):
        write_report(tmp_path, **{**inputs, "extra": {"run": {"sizes": [1, 2]}}})


def test_a_stale_measure_file_goes(tmp_path, report_inputs):
    inputs = {**report_inputs, "train_log": None, "pca_feats": None, "examples": None}
    write_report(tmp_path, **inputs)
    fewer = {name: {k: v for k, v in inputs[name].items() if not k.endswith("_r10")}
             for name in ("student", "teacher", "chance")}
    write_report(tmp_path, **{**inputs, **fewer})
    assert not (tmp_path / "metrics" / "i2t_r10.json").exists() and (tmp_path / "metrics" / "i2t_r5.json").exists()


def test_pca_separates_shifted_clouds():
    rng = np.random.default_rng(2)
    teacher = rng.standard_normal((200, 10))
    student = rng.standard_normal((200, 10)) + np.array([8.0] + [0.0] * 9)
    teacher_xy, student_xy, explained = pca_2d(teacher, student)
    # The shift is the main axis: the two clouds sit on either side of zero along PC 1.
    assert np.sign(teacher_xy[:, 0].mean()) != np.sign(student_xy[:, 0].mean())
    assert explained[0] > 0.5 and explained[0] >= explained[1]
    with pytest.raises(DsmdError, match="same dim"):
        pca_2d(teacher, student[:, :5])


@pytest.mark.skipif(
    not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install -y chromium chromium-driver)",
)
def test_html_renders_in_chromium(report_dir, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.get((report_dir / "report.html").as_uri())
        tables = driver.find_elements("css selector", "table")
        assert len(tables) == 2  # metrics and details
        header = [th.text for th in driver.find_elements("css selector", "table.metrics th")]
        assert header[:4] == ["metric", "student", "teacher", "chance"]
        assert len(driver.find_elements("css selector", "table.metrics tbody tr")) == 7
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.id, i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        figures = [img for img in images if img[0].startswith("fig-")]
        assert {img[0] for img in figures} == {"fig-recall_at_k", "fig-training", "fig-pca"}
        assert len(images) == len(figures) + 4  # 3 result thumbnails and 1 query image
        assert all(complete and width > 0 and height > 0 for _, complete, width, height in images)
        assert len(driver.find_elements("css selector", ".result .missing")) == 1
        # A full-page screenshot, for a person to look at.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1200, height + 300)
        driver.save_screenshot(str(tmp_path / "report.png"))
        shutil.copy(tmp_path / "report.png", "/tmp/report.png")
    finally:
        driver.quit()
