"""`dsmd export`: ONNX / torch.export parity with the PyTorch student, shipped preprocessing, the torch-free bundle.

One small world for the session (tests/export_helpers.py): shapes-world pictures and captions as a canonical
dataset, a tiny student (timm's test_vit and a one-layer BERT), its saved exact image index, and one run of
`dsmd export` over them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.images import load_rgb
from pipeline.errors import DsmdError
from pipeline.models.student import Student, save_student
from pipeline.retrieval.bundle import Bundle, search_bundle
from pipeline.retrieval.provenance import student_provenance
from pipeline.retrieval.runtime import ImageEncoder, TextEncoder, load_tokenizer, preprocess_images, tokenize
from stages.export.bundle import build_bundle
from stages.export.onnx_export import FLOAT_MIN_COSINE, INT8_MIN_COSINE, check_parity
from tests.export_helpers import DIM, N_IMAGES, World, tiny_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def world(export_world) -> World:
    # Built once per session (tests/conftest.py): tests/test_torch_free.py searches the same bundle.
    return export_world


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# The export: files, dynamic shapes, parity.


def test_export_writes_every_file_with_its_checksum(world):
    record = json.loads((world.export_dir / "export.json").read_text())
    expected = {
        "text_encoder.onnx",
        "image_encoder.onnx",
        "text_encoder.int8.onnx",
        "image_encoder.int8.onnx",
        "text_encoder.pt2",
        "image_encoder.pt2",
        "tokenizer.json",
        "preprocess.json",
    }
    assert expected <= set(record["files"])
    import hashlib

    for name in expected:
        data = (world.export_dir / name).read_bytes()
        assert record["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert record["student"]["teacher"] == "beit3"
    # int8 weights make the models smaller (the tiny BERT's 32-wide layers leave little to gain).
    assert record["files"]["image_encoder.int8.onnx"]["bytes"] < 0.7 * record["files"]["image_encoder.onnx"]["bytes"]


def test_recorded_parity_meets_the_documented_floors(world):
    parity = json.loads((world.export_dir / "export.json").read_text())["parity"]
    assert parity["texts"] == 12 and parity["images"] == 6
    figures = parity["min_cosine"]
    assert len(figures) == 6
    for name, cosine in figures.items():
        assert cosine >= (INT8_MIN_COSINE if ".int8." in name else FLOAT_MIN_COSINE), (name, cosine)


def test_onnx_inputs_have_dynamic_batch_and_length(world):
    model = onnx.load(str(world.export_dir / "text_encoder.onnx"))
    for tensor in model.graph.input:
        dims = tensor.type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in dims] == [True, True], tensor.name
    image = onnx.load(str(world.export_dir / "image_encoder.onnx")).graph.input[0]
    dims = image.type.tensor_type.shape.dim
    assert bool(dims[0].dim_param) and [d.dim_value for d in dims[1:]] == [3, 32, 32]


@pytest.mark.parametrize("model", ["text_encoder.onnx", "text_encoder.int8.onnx"])
def test_text_encoder_matches_the_student_at_any_batch_and_length(world, model):
    student = world.student
    preprocess = json.loads((world.export_dir / "preprocess.json").read_text())
    encoder = TextEncoder(world.export_dir / model, world.export_dir / "tokenizer.json", preprocess)
    floor = INT8_MIN_COSINE if "int8" in model else FLOAT_MIN_COSINE
    # Lengths 3 to the 16-token cap (the long one is truncated), batches of 1, 3 and 5 (not the export's 4).
    batches = [["red"], ["a blue circle", "two triangles above a green square", "zebra"], ["a red circle " * 9] * 5]
    for texts in batches:
        with torch.no_grad():
            expected = student.encode_text(**student.tokenize(texts)).numpy()
        got = encoder.encode(texts)
        assert got.shape == expected.shape
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
        assert np.min(np.sum(got * expected, axis=1)) >= floor


def test_image_encoder_matches_the_student_from_raw_images(world):
    student = world.student
    preprocess = json.loads((world.export_dir / "preprocess.json").read_text())
    images = [load_rgb(world.ds.image_path(i)) for i in range(5)]
    transform = student.image_transform()
    with torch.no_grad():
        expected = student.encode_image(torch.stack([transform(im) for im in images])).numpy()
    for model, floor in (("image_encoder.onnx", FLOAT_MIN_COSINE), ("image_encoder.int8.onnx", INT8_MIN_COSINE)):
        got = ImageEncoder(world.export_dir / model, preprocess).encode(images)
        assert np.min(np.sum(got * expected, axis=1)) >= floor, model
    assert np.allclose(ImageEncoder(world.export_dir / "image_encoder.onnx", preprocess).encode(images), expected,
                       atol=1e-4)


def test_torch_export_programs_reload_and_match(world):
    student = world.student
    tokens = student.tokenize(["a small red square", "two blue crosses"])
    program = torch.export.load(str(world.export_dir / "text_encoder.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(
            program(tokens["input_ids"], tokens["attention_mask"]), student.encode_text(**tokens), atol=1e-5
        )
        pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        image_program = torch.export.load(str(world.export_dir / "image_encoder.pt2")).module()
        assert torch.allclose(image_program(pixels), student.encode_image(pixels), atol=1e-5)


def test_shipped_tokenizer_gives_the_students_ids(world):
    student = world.student
    preprocess = json.loads((world.export_dir / "preprocess.json").read_text())
    tokenizer = load_tokenizer(world.export_dir / "tokenizer.json", preprocess["text"])
    texts = ["A RED Circle.", "an unseen zebra, quickly!", "x", "a red circle " * 20, "  spaces\tand\nlines  "]
    got, expected = tokenize(tokenizer, texts), student.tokenize(texts)
    assert np.array_equal(got["input_ids"], expected["input_ids"].numpy())
    assert np.array_equal(got["attention_mask"], expected["attention_mask"].numpy())


def test_numpy_preprocessing_matches_the_students_transform(world):
    student = world.student
    spec = json.loads((world.export_dir / "preprocess.json").read_text())["image"]
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").convert("RGB"),
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
    ]
    expected = torch.stack([student.image_transform()(im) for im in images]).numpy()
    assert np.allclose(preprocess_images(images, spec), expected, atol=1e-5)


def test_parity_check_catches_a_model_that_is_not_the_student(world):
    other = Student(tiny_cfg(), DIM, tokenizer=world.student.tokenizer).eval()  # fresh random weights
    texts = world.ds.texts(world.ds.caption_ids()[:4])
    images = [load_rgb(world.ds.image_path(i)) for i in range(2)]
    figures = check_parity(other, world.export_dir, texts, images)
    assert figures["text_encoder.onnx"] < 0.9 and figures["image_encoder.onnx"] < 0.9


def test_export_without_dataset_or_int8_encoder_fails_clearly(world, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"canonical_dir": str(tmp_path / "none")}}))
    result = CliRunner().invoke(app, ["--params", str(params), "export", "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, DsmdError)
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("{}\n")  # every setting at its default, wherever the tests run from
    result = CliRunner().invoke(app, ["--params", str(defaults), "export", "--no-int8", "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, DsmdError) and "--encoder float" in str(result.exception)


# ---------------------------------------------------------------------------------------------------------
# The bundle.


def test_bundle_from_the_cli_ships_ids_paths_and_the_int8_encoder(world):
    header = json.loads((world.bundle_dir / "bundle.json").read_text())
    assert header["count"] == N_IMAGES and header["dim"] == DIM
    assert header["storage"] == "int8" and header["encoder"] == "int8"
    assert (world.bundle_dir / "text_encoder.onnx").read_bytes() == (
        world.export_dir / "text_encoder.int8.onnx"
    ).read_bytes()
    bundle = Bundle(world.bundle_dir)
    assert bundle.gallery.shape == (DIM, N_IMAGES) and bundle.gallery.dtype == np.int8
    assert bundle.paths == [world.ds.image_relpath(i) for i in range(N_IMAGES)]


def test_hand_computed_scores_on_axis_vectors(world, tmp_path):
    # Rows are +-axis vectors: int8 codes hold +-127 exactly, so scores are exact in both storages.
    gallery = np.zeros((6, DIM), np.float32)
    for row, (axis, sign) in enumerate([(0, 1), (1, 1), (2, -1), (0, -1), (3, 1), (4, 1)]):
        gallery[row, axis] = sign
    query = np.zeros(DIM, np.float32)
    query[:3] = [0.8, 0.6, 0.0]
    for storage in ("int8", "float16"):
        build_bundle(world.export_dir, tmp_path / storage, gallery, provenance=world.provenance,
                     ids=np.arange(6) + 100, storage=storage)
        scores, ids = Bundle(tmp_path / storage).search_vectors(query, 3)
        assert ids.tolist() == [[100, 101, 102]]  # 0.8, 0.6, then the zero scores in row order
        assert np.allclose(scores, [[0.8, 0.6, 0.0]], atol=1e-3)
        scores, ids = Bundle(tmp_path / storage).search_vectors(query, 50)  # k larger than the gallery
        assert ids.shape == (1, 6) and ids[0, -1] == 103 and np.isclose(scores[0, -1], -0.8, atol=1e-3)


@pytest.mark.parametrize("storage", ["int8", "float16"])
def test_bundle_search_is_exact_over_its_stored_values(world, tmp_path, storage):
    gallery, queries = unit_rows(3000, DIM, seed=1), unit_rows(25, DIM, seed=2)
    build_bundle(world.export_dir, tmp_path / "b", gallery, provenance=world.provenance, storage=storage)
    bundle = Bundle(tmp_path / "b")
    bundle._block_rows = 256  # float16 rows are scored in blocks: make several, the last one short
    scores, ids = bundle.search_vectors(queries, 10)
    stored = bundle._stored_values(np.arange(3000)).T  # what the bundle holds, dequantised
    reference = queries @ stored.T
    assert np.array_equal(ids, np.argsort(-reference, axis=1, kind="stable")[:, :10])
    assert np.allclose(scores, np.take_along_axis(reference, ids, axis=1), atol=1e-5)
    # Against the float32 gallery, storage error may swap near ties only.
    exact = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    assert overlap >= 0.95


def test_bundle_answers_captions_like_the_student_and_exact_search(world, tmp_path):
    student = world.student
    build_bundle(world.export_dir, tmp_path / "f", world.image_emb, provenance=world.provenance, storage="float16",
                 encoder="float")
    bundle = Bundle(tmp_path / "f")
    texts = world.ds.texts(world.ds.caption_ids()[:8])
    with torch.no_grad():
        text_emb = student.encode_text(**student.tokenize(texts)).numpy()
    expected = np.argsort(-(text_emb @ world.image_emb.T), axis=1)[:, :3]
    scores, ids = bundle.search(texts, 3)
    assert np.array_equal(ids, expected)
    assert np.allclose(scores, np.take_along_axis(text_emb @ world.image_emb.T, ids, axis=1), atol=2e-3)


def test_search_bundle_command_runs_where_torch_cannot_be_imported(world):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch importable')\n"
        "from pipeline.cli import main\n"
        f"sys.argv = ['dsmd', 'search', '--bundle', {str(world.bundle_dir)!r}, '--top', '3', 'a red circle']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=world.root, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(".png" in line for line in lines)
    expected = search_bundle(world.bundle_dir, "a red circle", 3)
    assert [int(line.split()[1]) for line in lines] == [hit["id"] for hit in expected]


def test_broken_bundles_and_bad_galleries_are_refused(world, tmp_path):
    with pytest.raises(DsmdError, match="bundle.json"):
        Bundle(tmp_path)
    copy = shutil.copytree(world.bundle_dir, tmp_path / "copy")
    np.save(copy / "ids.npy", np.arange(3))
    with pytest.raises(DsmdError, match="disagree"):
        Bundle(copy)
    with pytest.raises(DsmdError, match="dim 8"):
        build_bundle(world.export_dir, tmp_path / "b", unit_rows(5, 8, seed=0), provenance=world.provenance)
    bad = unit_rows(5, DIM, seed=0)
    bad[3, 2] = np.nan
    with pytest.raises(DsmdError, match="NaN"):
        build_bundle(world.export_dir, tmp_path / "b", bad, provenance=world.provenance)
    with pytest.raises(DsmdError, match="distinct"):
        build_bundle(world.export_dir, tmp_path / "b", unit_rows(3, DIM, seed=0), provenance=world.provenance,
                     ids=np.array([1, 1, 2]))
    with pytest.raises(DsmdError, match="storage"):
        build_bundle(world.export_dir, tmp_path / "b", unit_rows(3, DIM, seed=0), provenance=world.provenance,
                     storage="float8")
    with pytest.raises(DsmdError, match="positive integer"):
        Bundle(world.bundle_dir).search_vectors(unit_rows(1, DIM, seed=0), 0)
    with pytest.raises(DsmdError, match="caption"):
        search_bundle(world.bundle_dir, "  ")
    with pytest.raises(DsmdError, match="captions only"):
        search_bundle(world.bundle_dir, "a red circle", image=Path("x.png"))


# ---------------------------------------------------------------------------------------------------------
# Provenance: an index, an export and a bundle of one student belong together; nothing else is accepted.


def test_export_refuses_an_index_of_another_student_naming_both(world, tmp_path):
    torch.manual_seed(1)
    other = Student(tiny_cfg(), DIM, tokenizer=world.student.tokenizer).eval()  # same dataset, other weights
    other_dir = save_student(other, tmp_path / "other", {"dataset": {"name": world.ds.name,
                                                                     "fingerprint": world.ds.fingerprint}})
    params = world.root / "params.yaml"
    out = tmp_path / "export"
    args = ["--params", str(params), "export", "--student", str(other_dir), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    message = str(result.exception)
    assert isinstance(result.exception, DsmdError), result.output
    index_dir = world.root / "runs" / "evaluate" / "index" / "images"
    assert f"index {index_dir}" in message and f"student {other_dir}" in message and "dsmd evaluate" in message
    assert student_provenance(world.student_dir)["student"]["sha256"][:12] in message
    assert student_provenance(other_dir)["student"]["sha256"][:12] in message
    assert not out.exists()  # refused before any export work
    # The exported student's own record is what the bundle and its reader compare.
    record = json.loads((world.export_dir / "export.json").read_text())["provenance"]
    assert record["student"]["sha256"] == student_provenance(world.student_dir)["student"]["sha256"]
    header = json.loads((world.bundle_dir / "bundle.json").read_text())
    assert header["provenance"]["student"]["sha256"] == header["encoder_provenance"]["student"]["sha256"]
    assert header["provenance"]["dataset"]["fingerprint"] == world.ds.fingerprint


def test_bundle_of_another_students_gallery_is_refused_when_built_and_when_searched(world, tmp_path):
    foreign = {"student": {"sha256": "f" * 64, "path": "elsewhere/student"},
               "dataset": dict(world.provenance["dataset"])}
    with pytest.raises(DsmdError, match="the bundle gallery was built from the student with weights sha256 f{12} "):
        build_bundle(world.export_dir, tmp_path / "b", world.image_emb, provenance=foreign)
    other_dataset = {**world.provenance, "dataset": {"name": "flickr", "fingerprint": "a" * 64}}
    with pytest.raises(DsmdError, match="dataset 'flickr' .*aaaaaaaaaaaa"):
        build_bundle(world.export_dir, tmp_path / "b", world.image_emb, provenance=other_dataset)
    assert not (tmp_path / "b").exists()
    # A bundle put together from two students by hand (or by an older writer) is refused by the reader.
    mixed = shutil.copytree(world.bundle_dir, tmp_path / "mixed")
    header = json.loads((mixed / "bundle.json").read_text())
    header["encoder_provenance"]["student"]["sha256"] = "e" * 64
    (mixed / "bundle.json").write_text(json.dumps(header))
    with pytest.raises(DsmdError, match=f"the gallery of bundle {mixed} was built from .* its text encoder's "
                                        "student has weights sha256 eeeeeeeeeeee"):
        search_bundle(mixed, "a red circle")
    old = shutil.copytree(world.bundle_dir, tmp_path / "old")
    header = json.loads((old / "bundle.json").read_text())
    for key in ("provenance", "encoder_provenance"):
        del header[key]
    (old / "bundle.json").write_text(json.dumps({**header, "version": 1}))
    with pytest.raises(DsmdError, match="records no student and dataset .* `dsmd export`"):
        Bundle(old)


def test_full_disk_while_writing_a_bundle_is_one_line_keeps_the_old_one_and_the_rerun_succeeds(
    world, tmp_path, monkeypatch
):
    import errno
    import os

    target = tmp_path / "bundle"
    build_bundle(world.export_dir, target, world.image_emb, provenance=world.provenance, storage="float16")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DsmdError) as caught:
        build_bundle(world.export_dir, target, world.image_emb, provenance=world.provenance)
    message = str(caught.value)
    assert message.startswith(f"no space left on device writing {target}; free space and rerun")
    assert "\n" not in message and "previous bundle is kept" in message
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the float16 bundle, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging directory left
    monkeypatch.undo()
    build_bundle(world.export_dir, target, world.image_emb, provenance=world.provenance)
    assert Bundle(target).storage == "int8" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
