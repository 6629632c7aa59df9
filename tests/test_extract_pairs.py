"""`dsmd extract-pairs`: fused pair rows from the BEiT-3 fixture in joint mode, checked against the plain
reference of tests/test_beit3.py; bad images and unselected splits skipped with reasons; resume by shard; the
alignment map fitted on the right rows and kept in the store."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from data_helpers import data_config, karpathy_entry, small_images, write_karpathy, write_truncated_jpeg
from test_beit3 import FIXTURE, reference_forward
from typer.testing import CliRunner

from pipeline.alignment import alignment_name, load_alignment
from pipeline.config import Config, ExtractConfig, LossesConfig, McadConfig, TeacherConfig
from pipeline.data.canonical import CanonicalDataset, prepare_dataset
from pipeline.data.images import load_rgb
from pipeline.errors import DsmdError
from pipeline.models.beit3 import read_checkpoint, resolve_config
from pipeline.models.teachers import load_teacher
from stages.distill.data import PairRows
from stages.distill.mcad import McadObjective
from stages.distill.mcad_data import (
    McadCollate,
    McadReaderOpener,
    load_alignments,
    mcad_provenance,
    mcad_usable_pairs,
)
from stages.extract import pairs_cli
from stages.extract.align import fit_linear_map, pair_rows
from stages.extract.pairs import extract_pairs
from store import FeatureStore, open_store
from store.extras import get_extra

pytestmark = [
    pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found"),
    pytest.mark.usefixtures("one_thread"),
]
DUAL_DIM = 8




def make_config(tmp_path: Path) -> Config:
    images = tmp_path / "images"
    small_images(images, ["a.png", "b.png", "c.png", "v.png"])
    write_truncated_jpeg(images / "bad.jpg")
    source = write_karpathy(tmp_path / "dataset.json", [
        # Caption rows 0-1 a, 2-3 v, 4-5 b, 6-7 bad, 8-9 c; shards of 4 rows: every shard has a train pair.
        karpathy_entry("a.png", "train", ["a red circle", "one red round thing"]),
        karpathy_entry("v.png", "val", ["a validation image", "held out"]),
        karpathy_entry("b.png", "train", ["a blue square", "blue box"]),
        karpathy_entry("bad.jpg", "train", ["a broken picture", "nothing here"]),
        karpathy_entry("c.png", "train", ["a green triangle", "green shape on the left"]),
    ])
    cfg = Config()
    cfg.data = data_config(tmp_path, source, images)
    cfg.teacher = TeacherConfig(kind="beit3", name="beit3", checkpoint=str(FIXTURE / "checkpoint.pth"),
                                size=str(FIXTURE / "config.json"), tokenizer=str(FIXTURE / "tokenizer.spm"),
                                img_size=32, max_text_len=16)
    cfg.extract = ExtractConfig(store=str(tmp_path / "features.zarr"), dtype="float32", device="cpu",
                                loader_workers=0, image_batch_size=3, rows_per_shard=4, rows_per_chunk=2)
    cfg.distill.mcad = McadConfig(fused_teacher="beit3", teachers=["dual"], teacher_weights=[1.0],
                                  pair_splits=["train"])
    return cfg


def write_dual_teacher(cfg: Config, ds: CanonicalDataset, invalid_caption: int) -> tuple[np.ndarray, np.ndarray]:
    """A dual-stream teacher written directly: random unit rows, one caption row left invalid."""
    rng = np.random.default_rng(0)
    rows = {}
    with FeatureStore.create_or_open(cfg.extract.store, dataset_fingerprint=ds.fingerprint, n_images=ds.num_images,
                                     n_captions=ds.num_captions, rows_per_shard=cfg.extract.rows_per_shard,
                                     rows_per_chunk=cfg.extract.rows_per_chunk) as store:
        for kind, n in (("image", ds.num_images), ("text", ds.num_captions)):
            values = rng.standard_normal((n, DUAL_DIM))
            values /= np.linalg.norm(values, axis=1, keepdims=True)
            valid = np.ones(n, bool)
            if kind == "text":
                valid[invalid_caption] = False
                values[invalid_caption] = 0.0
            rows[kind] = values.astype(np.float32)
            store.ensure_array("dual", kind, DUAL_DIM, dtype="float32", provenance={"teacher": "dual"})
            for shard in store.pending_shards("dual", kind):
                start, stop = store.shard_rows("dual", kind, shard)
                skipped = {i: "test" for i in range(start, stop) if not valid[i]}
                store.write_shard("dual", kind, shard, rows[kind][start:stop], valid=valid[start:stop], skipped=skipped)
    return rows["image"], rows["text"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pairs")
    cfg = make_config(tmp_path)
    ds = prepare_dataset(cfg.data)
    write_dual_teacher(cfg, ds, invalid_caption=1)
    summary = extract_pairs(cfg)
    return cfg, ds, summary


def reference_pairs(cfg: Config, ds: CanonicalDataset, caption_ids: list[int]) -> np.ndarray:
    teacher = load_teacher(cfg.teacher, device="cpu", precision="fp32")
    image_of = ds.caption_image_ids()
    pixels = torch.stack([teacher.image_transform(load_rgb(ds.image_path(int(image_of[c])))) for c in caption_ids])
    tokens = teacher.tokenize(ds.texts(np.asarray(caption_ids)))
    beit_cfg = resolve_config(str(FIXTURE / "config.json"), img_size=32, max_text_len=16)
    sd = read_checkpoint(FIXTURE / "checkpoint.pth")
    with torch.no_grad():
        hidden = reference_forward(sd, beit_cfg, pixels, tokens["text_ids"], tokens["padding_mask"])
    return F.normalize(hidden[:, 0], dim=-1).numpy()


def test_pair_rows_match_the_joint_mode_reference(extracted):
    cfg, ds, summary = extracted
    train = ds.caption_ids("train").tolist()
    bad_image = [c for c in train if ds.images.column("path")[int(ds.caption_image_ids()[c])].as_py() == "bad.jpg"]
    good = [c for c in train if c not in bad_image]
    assert len(good) == 6 and len(bad_image) == 2
    with open_store(cfg.extract.store, dataset_fingerprint=ds.fingerprint, teacher="beit3", kinds=("pair",)) as reader:
        assert reader.dim("beit3", "pair") == 64 and reader.complete("beit3", "pair")
        valid = reader.valid("beit3", "pair")
        assert valid[good].all() and not valid[bad_image].any() and not valid[ds.caption_ids("val")].any()
        got = reader.get("beit3", "pair", good)
        skipped = reader.skipped("beit3", "pair")
        provenance = reader.provenance("beit3", "pair")
    np.testing.assert_allclose(got, reference_pairs(cfg, ds, good), atol=2e-5, rtol=0)
    for caption_id in bad_image:
        assert skipped[caption_id].startswith("image ") and "unusable" in skipped[caption_id]
    for caption_id in ds.caption_ids("val").tolist():
        assert skipped[caption_id] == "split not selected for extraction"
    assert provenance["extraction"]["kind"] == "pair"
    assert provenance["teacher"]["teacher"] == "beit3"
    assert set(summary.skipped) == set(bad_image)  # unselected rows are not reported as skips
    assert summary.shards_written == 3 and summary.shards_already_done == 0


def test_alignment_is_fitted_on_the_usable_training_pairs(extracted):
    cfg, ds, summary = extracted
    record = summary.alignments["dual"]
    assert record["refitted"] and record["rows"] == 5  # 8 train captions - 2 of the bad image - 1 invalid text
    with open_store(cfg.extract.store, dataset_fingerprint=ds.fingerprint) as reader:
        ids = pair_rows(reader, ds, "beit3", "dual", "train")
        assert 1 not in ids.tolist() and len(ids) == 5
        x = reader.get("beit3", "pair", ids)
        y = 0.5 * (reader.get("dual", "image", ds.caption_image_ids()[ids]) + reader.get("dual", "text", ids))
        weight = load_alignment(cfg.extract.store, "beit3", "dual", dataset_fingerprint=ds.fingerprint, reader=reader)
        assert weight.shape == (64, DUAL_DIM) and weight.dtype == np.float32
        np.testing.assert_allclose(weight, fit_linear_map([(x, y)]).weight, atol=1e-6)
        with pytest.raises(DsmdError, match="out of date: ridge changed"):
            load_alignment(cfg.extract.store, "beit3", "dual", dataset_fingerprint=ds.fingerprint, reader=reader,
                           ridge=0.5)
    with pytest.raises(DsmdError, match="extract-pairs"):
        load_alignment(cfg.extract.store, "beit3", "nobody", dataset_fingerprint=ds.fingerprint)


def test_rerun_resumes_by_shard_and_keeps_the_map(extracted):
    cfg, ds, _ = extracted
    with open_store(cfg.extract.store) as reader:
        before = reader.get("beit3", "pair", np.arange(ds.num_captions))
    extra_before = get_extra(cfg.extract.store, alignment_name("beit3", "dual"))
    mark = Path(cfg.extract.store) / "beit3" / "pair" / "marks" / "shard-000001.json"
    mark.unlink()  # as if killed while writing shard 1
    summary = extract_pairs(cfg)
    assert summary.shards_written == 1 and summary.shards_already_done == 2
    assert summary.alignments["dual"]["refitted"] is False
    with open_store(cfg.extract.store) as reader:
        # Same rows (up to float rounding: the first run may have used another number of CPU threads).
        np.testing.assert_allclose(reader.get("beit3", "pair", np.arange(ds.num_captions)), before, atol=1e-6)
    assert get_extra(cfg.extract.store, alignment_name("beit3", "dual")).record == extra_before.record


def test_refusals(extracted, tmp_path):
    cfg, _, _ = extracted
    wrong = dataclasses.replace(cfg, distill=dataclasses.replace(
        cfg.distill, mcad=dataclasses.replace(cfg.distill.mcad, fused_teacher="beit3-joint")))
    with pytest.raises(DsmdError, match="fused_teacher=beit3"):
        extract_pairs(wrong)

    typo = dataclasses.replace(cfg, distill=dataclasses.replace(
        cfg.distill, mcad=dataclasses.replace(cfg.distill.mcad, pair_splits=["tran"])))
    with pytest.raises(DsmdError, match="pair_splits"):
        extract_pairs(typo)

    class DualOnly:
        name, dim, supports_pairs = "clip", 8, False

    with pytest.raises(DsmdError, match="cannot encode an image and a caption jointly"):
        extract_pairs(cfg, teacher=DualOnly())


def test_cli_if_mcad_does_nothing_for_dsmd(tmp_path):
    app = typer.Typer()

    (tmp_path / "params.yaml").write_text("{}\n")  # the defaults: distill.method is dsmd

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = {"params": tmp_path / "params.yaml", "overrides": []}

    pairs_cli.register(app)
    result = CliRunner().invoke(app, ["extract-pairs", "--if-mcad"])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output


def fresh(tmp_path: Path, **extract_changes) -> tuple[Config, CanonicalDataset]:
    cfg = make_config(tmp_path)
    cfg.extract = dataclasses.replace(cfg.extract, **extract_changes)
    ds = prepare_dataset(cfg.data)
    write_dual_teacher(cfg, ds, invalid_caption=1)
    return cfg, ds


def test_widening_pair_splits_rewrites_only_the_shards_that_hold_them(tmp_path):
    cfg, ds = fresh(tmp_path)
    extract_pairs(cfg, align=False)
    val = ds.caption_ids("val")
    cfg.distill.mcad = dataclasses.replace(cfg.distill.mcad, pair_splits=["train", "val"])
    summary = extract_pairs(cfg, align=False)
    assert summary.shards_written == 1 and summary.shards_already_done == 2  # shard 0 holds captions 2, 3
    with open_store(cfg.extract.store) as reader:
        assert reader.valid("beit3", "pair")[val].all()
        np.testing.assert_allclose(reader.get("beit3", "pair", val), reference_pairs(cfg, ds, val.tolist()),
                                   atol=2e-5)


def test_a_shard_without_selected_captions(tmp_path):
    cfg, ds = fresh(tmp_path, rows_per_shard=2, rows_per_chunk=2)  # shard 1 = captions 2, 3: val only
    summary = extract_pairs(cfg, align=False)
    assert summary.shards_written == 5
    with open_store(cfg.extract.store) as reader:
        assert not reader.valid("beit3", "pair")[[2, 3]].any()


def test_training_side_reads_what_extract_pairs_wrote(extracted):
    cfg, ds, _ = extracted
    mcad = cfg.distill.mcad
    opener = pickle.loads(pickle.dumps(McadReaderOpener(cfg.extract.store, ds.fingerprint, mcad)))
    reader = opener()
    pairs = mcad_usable_pairs(ds, "train", reader, mcad.teachers, mcad.fused_teacher)
    assert pairs.tolist() == [0, 4, 5, 8, 9]  # caption 1: no dual text row; 6, 7: bad image; 2, 3: val
    maps = load_alignments(cfg.extract.store, mcad, ds.fingerprint, reader)
    assert maps["dual"].shape == (64, DUAL_DIM)
    rows = PairRows(ds, pairs, lambda image: torch.zeros(3, 4, 4))
    collate = McadCollate(lambda texts: {"n": torch.tensor([len(t) for t in texts])}, opener, mcad.teachers,
                          mcad.fused_teacher)
    batch = collate([rows[i] for i in range(len(rows))])
    np.testing.assert_array_equal(batch.fused.numpy(), reader.get("beit3", "pair", pairs))
    np.testing.assert_array_equal(batch.teacher_text["dual"].numpy(), reader.get("dual", "text", pairs))
    np.testing.assert_array_equal(batch.teacher_image["dual"].numpy(),
                                  reader.get("dual", "image", ds.caption_image_ids()[pairs]))
    objective = McadObjective(mcad, LossesConfig(queue_size=8), maps, dim=DUAL_DIM)
    student = torch.randn(len(pairs), DUAL_DIM, requires_grad=True)
    s = F.normalize(student, dim=-1)
    values = objective(s, s, batch.teacher_rows("cpu"), batch.image_ids)
    assert set(values) == set(objective.value_names()) and objective.names == ["kl", "mfd"]
    sum(objective.top_level(values).values()).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    provenance = mcad_provenance(reader, mcad, cfg.extract.store, ds.fingerprint)
    assert provenance["teachers"]["dual"] == "dual" and provenance["fused"]["teacher"] == "beit3"
    assert len(provenance["alignments"]["dual"]) == 64
    reader.close()
