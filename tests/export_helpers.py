"""The export world shared by tests/test_export.py and tests/test_torch_free.py: a tiny student on a few shapes
scenes, exported and bundled through `dsmd export`. Building it takes most of a minute, so conftest.py builds it
once per session (fixture ``export_world``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import StudentConfig
from pipeline.data.canonical import CanonicalDataset, prepare_dataset
from pipeline.data.images import load_rgb
from pipeline.models.student import Student, build_vocab, load_student, load_vocab_tokenizer, save_student
from pipeline.retrieval.index import build_index
from pipeline.retrieval.provenance import student_provenance
from stages.demo.shapes import render_scene, sample_scene, scene_captions
from tests.data_helpers import data_config, karpathy_entry, write_karpathy

DIM = 16
N_IMAGES = 12


def tiny_cfg() -> StudentConfig:
    return StudentConfig(
        vision_model="test_vit", vision_width=0, vision_depth=0, vision_heads=0,
        img_size=32, patch_size=8, text_hidden=32, text_layers=1, text_heads=2, max_text_len=16
    )


@dataclasses.dataclass
class World:
    root: Path
    ds: CanonicalDataset
    student_dir: Path
    export_dir: Path
    bundle_dir: Path
    image_emb: np.ndarray  # student embeddings of the dataset's images, row = image id

    @property
    def student(self) -> Student:
        return load_student(self.student_dir)

    @property
    def provenance(self) -> dict:
        """The exported student's record: what vectors encoded by that student pass to build_bundle."""
        return json.loads((self.export_dir / "export.json").read_text())["provenance"]


def build_export_world(root: Path) -> World:
    """Dataset, student, saved index, then `dsmd export` (encoders, parity check, bundle) under ``root``."""
    rng = np.random.default_rng(0)
    entries = []
    for index in range(N_IMAGES):
        scene = sample_scene(rng)
        name = f"scene_{index:02d}.png"
        (root / "images").mkdir(exist_ok=True)
        render_scene(scene, 40, rng).save(root / "images" / name)
        entries.append(karpathy_entry(name, "test", scene_captions(scene, 2, rng)))
    source = write_karpathy(root / "dataset.json", entries)
    data_cfg = data_config(root, source, root / "images")
    ds = prepare_dataset(data_cfg)

    captions = ds.texts(ds.caption_ids())
    tokenizer = load_vocab_tokenizer(build_vocab(captions, root / "vocab" / "vocab.txt"))
    torch.manual_seed(0)
    student = Student(tiny_cfg(), DIM, tokenizer=tokenizer).eval()
    student_dir = save_student(student, root / "runs" / "distill" / "student", {
        "teacher": "beit3", "dataset": {"name": ds.name, "fingerprint": ds.fingerprint}})
    transform = student.image_transform()
    with torch.no_grad():
        pixels = torch.stack([transform(load_rgb(ds.image_path(i))) for i in range(N_IMAGES)])
        image_emb = student.encode_image(pixels).numpy()
    paths = [ds.image_relpath(i) for i in range(N_IMAGES)]
    # As `dsmd evaluate` saves it: with the student and dataset it was built from.
    meta = {"provenance": student_provenance(student_dir)}
    build_index(image_emb, ids=np.arange(N_IMAGES), paths=paths, kind="exact", meta=meta).save(
        root / "runs" / "evaluate" / "index" / "images"
    )

    params = root / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "data": dataclasses.asdict(data_cfg),
                "distill": {"out_dir": str(root / "runs" / "distill")},
                "evaluate": {"out_dir": str(root / "runs" / "evaluate"), "split": "test"},
            }
        )
    )
    export_dir = root / "runs" / "export"
    result = CliRunner().invoke(app, ["--params", str(params), "export", "--check-texts", "12", "--check-images", "6"])
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return World(root, ds, student_dir, export_dir, export_dir / "bundle", image_emb)
