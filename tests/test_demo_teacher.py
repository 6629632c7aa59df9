"""The demo teacher fit, at a tiny size on a tiny shapes world: files in the official layout, repeatable, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from pipeline.config import DataConfig, DemoConfig, load_config
from pipeline.data.canonical import CanonicalDataset, prepare_dataset
from pipeline.errors import DsmdError
from pipeline.models.beit3 import read_checkpoint, read_config_json
from pipeline.models.teachers import BEiT3Teacher, load_teacher
from stages.demo.shapes import generate_shapes
from stages.demo.teacher import encode_split, fit_demo_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def canonical(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    source = generate_shapes(DemoConfig(out_dir=str(root / "shapes"), n_train=48, n_val=4, n_test=12,
                                        image_size=32, captions_per_image=2))
    data = DataConfig(source=str(source), images_root=str(root / "shapes" / "images"),
                      canonical_dir=str(root / "canonical"))
    prepare_dataset(data)
    return root / "canonical"


def tiny_overrides(canonical: Path, out: Path) -> list[str]:
    return [
        f"data.canonical_dir={canonical}",
        f"teacher.checkpoint={out}/t.pth", f"teacher.size={out}/t.json", f"teacher.tokenizer={out}/t.spm",
        "teacher.img_size=32", "teacher.max_text_len=24",
        f"demo_teacher.out_dir={out}", "demo_teacher.embed_dim=32", "demo_teacher.layers=1",
        "demo_teacher.heads=2", "demo_teacher.ffn_dim=48", "demo_teacher.vocab_size=60", "demo_teacher.epochs=2",
        "demo_teacher.batch_size=16", "demo_teacher.patch_size=8",
        # No second teacher unless a test asks for one (the demo's defaults name one); no pretraining corpus
        # unless a test makes one (the fit then uses the train split).
        "extra_teachers=[]", "demo_teacher.second.name=", "demo.n_pretrain=0",
    ]


def test_fit_writes_official_files_and_is_repeatable(tmp_path, canonical):
    dataset = CanonicalDataset.load(canonical)
    results, states = [], []
    for run in ("a", "b"):
        cfg = load_config(None, tiny_overrides(canonical, tmp_path / run))
        steps = []
        results.append(fit_demo_teacher(cfg, dataset, on_step=lambda s, t, loss, steps=steps: steps.append(s)))
        states.append(read_checkpoint(tmp_path / run / "t.pth"))
        assert steps == list(range(1, results[-1].steps + 1))
    first = results[0]
    # An epoch is every image once (with one of its captions): 48 images in batches of 16.
    assert first.train_images == 48 and first.train_captions == 96 and first.steps == 2 * 3
    assert (tmp_path / "a" / "t.spm").read_bytes() == (tmp_path / "b" / "t.spm").read_bytes()
    assert set(states[0]) == set(states[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key

    raw = torch.load(tmp_path / "a" / "t.pth", weights_only=True)
    assert set(raw) == {"model"}
    keys = set(raw["model"])
    assert {"beit3.encoder.layers.0.self_attn.q_proj.A.weight", "vision_head.weight", "language_head.weight",
            "logit_scale", "beit3.vision_embed.mask_token"} <= keys
    assert not any("qkv" in key for key in keys)
    model_cfg = read_config_json(tmp_path / "a" / "t.json")
    assert (model_cfg.embed_dim, model_cfg.patch_size, model_cfg.img_size) == (32, 8, 32)
    assert model_cfg.vocab_size == first.vocab_pieces + 2

    cfg = load_config(None, tiny_overrides(canonical, tmp_path / "a"))
    teacher = load_teacher(cfg.teacher, device="cpu")
    assert isinstance(teacher, BEiT3Teacher) and teacher.dim == 32
    image_emb, text_emb, caption_image, skipped = encode_split(teacher, dataset, "test")
    assert skipped == {}
    assert image_emb.shape == (12, 32) and text_emb.shape == (24, 32)
    assert sorted(caption_image.tolist()) == sorted(list(range(12)) * 2)


def test_fit_refuses_a_named_size(tmp_path, canonical):
    cfg = load_config(None, [*tiny_overrides(canonical, tmp_path), "teacher.size=base"])
    with pytest.raises(DsmdError, match="JSON config path"):
        fit_demo_teacher(cfg, CanonicalDataset.load(canonical))


def test_cli_demo_teacher_reports_recall_and_chance(tmp_path, canonical):
    from pipeline.models.cli import register as register_teacher
    from stages.demo.cli import register as register_demo

    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context, overrides: list[str] = typer.Option([], "--set")) -> None:
        ctx.obj = {"params": tmp_path / "params.yaml", "overrides": list(overrides)}

    (tmp_path / "params.yaml").write_text("{}\n")  # the defaults, then the --set below

    register_demo(app)
    register_teacher(app)
    args = [arg for o in tiny_overrides(canonical, tmp_path) for arg in ("--set", o)]
    result = CliRunner().invoke(app, [*args, "demo", "teacher"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo_teacher_fit.json").read_text())
    assert report["split"] == "test" and set(report["recall"]) == set(report["chance"])
    assert report["chance"]["t2i_r1"] == pytest.approx(100 / 12)
    assert report["fit"]["steps"] == 6
    result = CliRunner().invoke(app, [*args, "teacher", "info"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["checkpoint_sha256"]


def test_cli_fits_on_the_pretraining_corpus_and_scores_on_the_test_split(tmp_path, canonical):
    from stages.demo.cli import register as register_demo
    from stages.demo.shapes import generate_pretrain_corpus

    corpus = tmp_path / "pretrain"
    generate_pretrain_corpus(DemoConfig(pretrain_dir=str(corpus), n_pretrain=40, image_size=32, captions_per_image=2))
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context, overrides: list[str] = typer.Option([], "--set")) -> None:
        ctx.obj = {"params": tmp_path / "params.yaml", "overrides": list(overrides)}

    (tmp_path / "params.yaml").write_text("{}\n")
    register_demo(app)
    overrides = [*tiny_overrides(canonical, tmp_path), f"demo.pretrain_dir={corpus}", "demo.n_pretrain=40"]
    result = CliRunner().invoke(app, [*(a for o in overrides for a in ("--set", o)), "demo", "teacher"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo_teacher_fit.json").read_text())
    # Fitted on the corpus's 40 images (80 captions, 3 batches of 16 a epoch), scored on the split's 12.
    assert (report["fit"]["train_images"], report["fit"]["train_captions"], report["fit"]["steps"]) == (40, 80, 6)
    assert report["chance"]["t2i_r1"] == pytest.approx(100 / 12)
    # The corpus is prepared (and checked) as a canonical dataset beside the teacher's files.
    assert (tmp_path / "pretrain_canonical" / "dataset.json").is_file()

    missing = [*tiny_overrides(canonical, tmp_path), f"demo.pretrain_dir={tmp_path / 'nowhere'}", "demo.n_pretrain=40"]
    result = CliRunner().invoke(app, [*(a for o in missing for a in ("--set", o)), "demo", "teacher"])
    assert result.exit_code != 0 and "run `dsmd demo data`" in str(result.exception) + result.output


def _second_overrides(out: Path, name: str = "small") -> list[str]:
    entry = (f"{{kind: beit3, name: {name}, checkpoint: {out}/s.pth, size: {out}/s.json, tokenizer: {out}/s.spm, "
             "img_size: 32, max_text_len: 24}")
    return [f"extra_teachers=[{entry}]", "demo_teacher.second.name=small", "demo_teacher.second.embed_dim=24",
            "demo_teacher.second.layers=1", "demo_teacher.second.heads=2", "demo_teacher.second.ffn_dim=32",
            "demo_teacher.second.seed=5"]


def test_second_teacher_is_fitted_with_its_own_size_and_seed(tmp_path, canonical):
    from stages.demo.teacher import second_teacher_config

    cfg = load_config(None, [*tiny_overrides(canonical, tmp_path), *_second_overrides(tmp_path)])
    second = second_teacher_config(cfg)
    assert second.teacher.name == "small" and second.teacher.checkpoint == f"{tmp_path}/s.pth"
    assert (second.demo_teacher.embed_dim, second.demo_teacher.seed) == (24, 5)
    # Everything else is fitted as the first is.
    assert (second.demo_teacher.epochs, second.demo_teacher.lr) == (cfg.demo_teacher.epochs, cfg.demo_teacher.lr)
    fit_demo_teacher(second, CanonicalDataset.load(canonical))
    assert read_config_json(tmp_path / "s.json").embed_dim == 24
    assert load_teacher(second.teacher, device="cpu").dim == 24
    assert not (tmp_path / "t.pth").exists()  # the first teacher's files are not touched

    assert second_teacher_config(load_config(None, tiny_overrides(canonical, tmp_path))) is None
    unmatched = load_config(None, [*tiny_overrides(canonical, tmp_path), *_second_overrides(tmp_path, "other")])
    with pytest.raises(DsmdError, match="no extra_teachers entry has that name"):
        second_teacher_config(unmatched)


def test_fit_skips_the_images_data_check_recorded_and_any_that_do_not_decode(tmp_path):
    """Before: the fit opened every train image and stopped at the first bad one with BadImageError."""
    from pipeline.data.check import check_dataset

    source = generate_shapes(DemoConfig(out_dir=str(tmp_path / "shapes"), n_train=16, n_val=0, n_test=6,
                                        image_size=32, captions_per_image=2))
    data = DataConfig(source=str(source), images_root=str(tmp_path / "shapes" / "images"),
                      canonical_dir=str(tmp_path / "canonical"))
    dataset = prepare_dataset(data)
    train, test = dataset.image_ids("train"), dataset.image_ids("test")
    recorded, unrecorded, bad_test = int(train[3]), int(train[9]), int(test[1])
    good = dataset.image_path(recorded).read_bytes()
    for image_id in (recorded, bad_test):
        dataset.image_path(image_id).write_bytes(good[:40])  # a PNG cut short
    report = check_dataset(dataset, workers=1, progress=False)
    assert {b.image_id for b in report.bad_images} == {recorded, bad_test}
    # The check's verdict stands even after the file is fixed (as extract follows it); an image broken
    # after the check is met, and skipped, by the fit itself.
    dataset.image_path(recorded).write_bytes(good)
    dataset.image_path(unrecorded).write_bytes(b"not a png at all")
    check_reason = next(b.reason for b in report.bad_images if b.image_id == recorded)

    out = tmp_path / "teacher"
    cfg = load_config(None, [*tiny_overrides(tmp_path / "canonical", out), "demo_teacher.epochs=1"])
    result = fit_demo_teacher(cfg, CanonicalDataset.load(tmp_path / "canonical"))
    undecodable = "not an image file (unknown or corrupt format)"
    assert result.skipped_images == {recorded: check_reason, unrecorded: undecodable}
    assert result.train_images == 14 and result.train_captions == 28 and result.steps == 1
    assert json.loads(json.dumps(result.to_dict()))["skipped_images"] == {
        str(recorded): check_reason, str(unrecorded): undecodable}

    teacher = load_teacher(cfg.teacher, device="cpu")
    image_emb, text_emb, caption_image, skipped = encode_split(teacher, CanonicalDataset.load(tmp_path / "canonical"),
                                                               "test")
    assert set(skipped) == {bad_test}
    # The bad test image leaves the gallery with its two captions; the rest still point at their images.
    assert image_emb.shape[0] == 5 and text_emb.shape[0] == 10
    assert sorted(caption_image.tolist()) == sorted(list(range(5)) * 2)
