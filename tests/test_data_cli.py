"""`dsmd data ...`: check reports every problem and exits 0; bad input is one line and exit code 2."""

import json
import subprocess
import sys

from data_helpers import jpeg_bytes, karpathy_entry, write_karpathy, write_png, write_truncated_jpeg
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.check import load_bad_images


def settings(tmp_path, source, root) -> list[str]:
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")  # every setting at its default, then the --set below
    return [
        "--params",
        str(params),
        "--set",
        f"data.source={source}",
        "--set",
        f"data.images_root={root}",
        "--set",
        f"data.canonical_dir={tmp_path / 'canonical'}",
    ]


def test_check_reports_truncated_and_missing_images_and_exits_0(tmp_path):
    root = tmp_path / "images"
    write_png(root / "ok.png")
    (root / "fine.jpg").parent.mkdir(exist_ok=True)
    (root / "fine.jpg").write_bytes(jpeg_bytes())
    write_truncated_jpeg(root / "trunc[red].jpg")
    source = write_karpathy(
        tmp_path / "dataset.json",
        [
            karpathy_entry("ok.png", "train", ["a good one"], imgid=0),
            karpathy_entry("trunc[red].jpg", "test", ["cut short"], imgid=1),
            karpathy_entry("gone.jpg", "test", ["never there", ""], imgid=2),
            karpathy_entry("fine.jpg", "val", ["fine"], imgid=3),
        ],
    )
    result = CliRunner().invoke(app, [*settings(tmp_path, source, root), "data", "check"])
    assert result.exit_code == 0, result.output
    output = result.output
    assert "trunc[red].jpg" in output and "truncated image data" in output
    assert "gone.jpg" in output and "missing file" in output
    assert "images[2].sentences[1]" in output and "empty caption" in output  # the dropped row
    assert "2 bad images" in output
    assert load_bad_images(tmp_path / "canonical") == {1: "truncated image data", 2: "missing file"}

    info = CliRunner().invoke(app, [*settings(tmp_path, source, root), "data", "info"])
    assert info.exit_code == 0, info.output
    assert "bad images (last check): 2" in info.output
    as_json = CliRunner().invoke(app, [*settings(tmp_path, source, root), "data", "info", "--json"])
    card = json.loads(as_json.stdout)
    assert card["counts"]["images"] == 4 and card["counts"]["captions"] == 4


def test_demo_then_prepare(tmp_path):
    out = tmp_path / "shapes"
    common = [
        *settings(tmp_path, out / "dataset_shapes.json", out / "images"),
        "--set",
        f"demo.out_dir={out}",
        "--set",
        "demo.n_train=6",
        "--set",
        "demo.n_val=3",
        "--set",
        "demo.n_test=4",
    ]
    demo = CliRunner().invoke(app, [*common, "demo", "data"])
    assert demo.exit_code == 0, demo.output
    assert (out / "dataset_shapes.json").exists()
    prepared = CliRunner().invoke(app, [*common, "data", "prepare"])
    assert prepared.exit_code == 0, prepared.output
    assert "fingerprint" in prepared.output
    assert json.loads((tmp_path / "canonical" / "dataset.json").read_text())["counts"]["images"] == 13


def test_bad_source_is_one_line_and_exit_2(tmp_path):
    write_png(tmp_path / "images" / "a.png")
    source = tmp_path / "broken.json"
    source.write_text('{"images": [}')
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pipeline.cli import main; main()",
            *settings(tmp_path, source, tmp_path / "images"),
            "data",
            "check",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(source) in lines[0] and "not valid JSON" in lines[0] and "Traceback" not in result.stderr


def test_info_without_a_prepared_dataset(tmp_path):
    result = CliRunner().invoke(app, [*settings(tmp_path, tmp_path / "x.json", tmp_path), "data", "info"])
    assert result.exit_code != 0
    assert "dsmd data prepare" in str(result.exception)
