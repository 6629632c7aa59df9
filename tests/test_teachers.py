"""The Teacher interface: BEiT-3 from the golden fixture, and a CLIP dual encoder from a tiny local directory."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from paths import BEIT3_FIXTURE
from PIL import Image

from pipeline.config import TeacherConfig
from pipeline.errors import DsmdError
from pipeline.models.beit3 import BEiT3Config, BEiT3Retrieval, save_official_checkpoint, write_config_json
from pipeline.models.teachers import BEiT3Teacher, CLIPTeacher, Teacher, load_teacher, resolve_precision

FIXTURE = BEIT3_FIXTURE


def fixture_teacher_cfg(**changes) -> TeacherConfig:
    base = dict(kind="beit3", name="beit3-tiny", checkpoint=str(FIXTURE / "checkpoint.pth"),
                size=str(FIXTURE / "config.json"), tokenizer=str(FIXTURE / "tokenizer.spm"), img_size=32,
                max_text_len=16)
    base.update(changes)
    return TeacherConfig(**base)





pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")
def test_beit3_teacher_end_to_end_matches_fixture(expected):
    teacher = load_teacher(fixture_teacher_cfg(), device="cpu", precision="auto")
    assert isinstance(teacher, Teacher) and isinstance(teacher, BEiT3Teacher)
    assert teacher.dim == 64 and teacher.supports_pairs and teacher.precision == "fp32"
    pixels = []
    for name in expected["image_files"]:
        with Image.open(FIXTURE / "images" / str(name)) as image:
            pixels.append(teacher.image_transform(image))
    tokens = teacher.tokenize([str(c) for c in expected["captions"]])
    np.testing.assert_array_equal(tokens["text_ids"].numpy(), expected["text_ids"])
    image = teacher.encode_images(torch.stack(pixels))
    text = teacher.encode_texts(tokens)  # trims the all-padding columns before the forward pass
    np.testing.assert_allclose(image.numpy(), expected["image_emb"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(text.numpy(), expected["text_emb"], atol=1e-5, rtol=0)
    pairs = teacher.encode_pairs(torch.stack(pixels[:2]), {k: v[:2] for k, v in tokens.items()})
    assert pairs.shape == (2, 64)
    torch.testing.assert_close(pairs.norm(dim=-1), torch.ones(2))
    with pytest.raises(DsmdError, match="one caption per image"):
        teacher.encode_pairs(torch.stack(pixels[:2]), tokens)

    prov = teacher.provenance()
    assert prov["checkpoint_sha256"] == hashlib.sha256((FIXTURE / "checkpoint.pth").read_bytes()).hexdigest()
    assert prov["tokenizer_sha256"] == hashlib.sha256((FIXTURE / "tokenizer.spm").read_bytes()).hexdigest()
    assert prov["max_text_len"] == 16 and prov["image_size"] == 32 and prov["position_embeddings"] == "as trained"
    assert "bicubic" in prov["image_preprocessing"] and "0.5" in prov["image_preprocessing"]
    assert prov["config"]["embed_dim"] == 64 and prov["teacher"] == "beit3-tiny"


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")
def test_beit3_teacher_other_resolution_and_bf16():
    teacher = load_teacher(fixture_teacher_cfg(img_size=48), device="cpu", precision="bf16")
    assert "from 2x2 to 3x3" in teacher.provenance()["position_embeddings"]
    pixels = teacher.image_transform(Image.new("RGB", (50, 70), (200, 10, 10)))[None]
    assert pixels.shape == (1, 3, 48, 48)
    out = teacher.encode_images(pixels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = load_teacher(fixture_teacher_cfg(img_size=48), device="cpu", precision="fp32").encode_images(pixels)
    assert float((out * ref).sum()) > 0.98


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")
def test_beit3_teacher_checks_tokenizer_against_vocab(tmp_path):
    cfg = BEiT3Config(embed_dim=16, heads=2, ffn_dim=32, layers=1, img_size=32, vocab_size=60, max_text_positions=20,
                      max_text_len=16)
    save_official_checkpoint(BEiT3Retrieval(cfg), tmp_path / "small_vocab.pth")
    write_config_json(cfg, tmp_path / "small_vocab.json")
    small = fixture_teacher_cfg(size=str(tmp_path / "small_vocab.json"), checkpoint=str(tmp_path / "small_vocab.pth"))
    with pytest.raises(DsmdError, match="emits ids up to 64 but the BEiT-3 text embedding has 60 rows"):
        load_teacher(small, device="cpu")
    with pytest.raises(DsmdError, match="the checkpoint has 2 layers, the config 1"):
        load_teacher(fixture_teacher_cfg(size=str(tmp_path / "small_vocab.json")), device="cpu")
    with pytest.raises(DsmdError, match="not found"):
        load_teacher(fixture_teacher_cfg(tokenizer=str(tmp_path / "absent.spm")), device="cpu")


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(DsmdError):
        resolve_precision("int8", torch.device("cpu"))


# -------------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP with a byte-level BPE tokenizer (no merges) and an image processor, saved locally."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    out = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(out)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_clip_teacher(clip_dir):
    from transformers import CLIPModel

    cfg = TeacherConfig(kind="clip", name="tiny-clip", checkpoint=str(clip_dir), tokenizer="", max_text_len=64)
    teacher = load_teacher(cfg, device="cpu")
    assert isinstance(teacher, CLIPTeacher) and teacher.dim == 24 and not teacher.supports_pairs
    assert teacher.max_text_len == 24  # capped by the model's positions

    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("L", (32, 64), 128),
              Image.new("RGBA", (33, 33), (0, 0, 255, 10))]
    transform = pickle.loads(pickle.dumps(teacher.image_transform))
    pixels = torch.stack([transform(image) for image in images])
    assert pixels.shape == (3, 3, 32, 32)
    captions = ["a red square", "Grey!", "a blue thing on a very long caption " * 3]
    tokens = teacher.tokenize(captions)
    assert tokens["input_ids"].shape == (3, 24) and tokens["attention_mask"][2].all()

    image, text = teacher.encode_images(pixels), teacher.encode_texts(tokens)
    assert image.shape == text.shape == (3, 24)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))

    # Same numbers as the Hugging Face model used directly (full padding, no trimming).
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    with torch.no_grad():
        want_i = model.get_image_features(pixel_values=pixels)
        want_t = model.get_text_features(**tokens)
    want_i = want_i if isinstance(want_i, torch.Tensor) else want_i.pooler_output
    want_t = want_t if isinstance(want_t, torch.Tensor) else want_t.pooler_output
    torch.testing.assert_close(image, F.normalize(want_i, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(text, F.normalize(want_t, dim=-1), atol=1e-5, rtol=0)

    prov = teacher.provenance()
    assert len(prov["checkpoint_sha256"]) == 64 and len(prov["tokenizer_sha256"]) == 64
    assert prov["max_text_len"] == 24 and "CLIPImageProcessor" in prov["image_preprocessing"]
    with pytest.raises(DsmdError, match="fused"):
        teacher.encode_pairs(pixels, tokens)


def test_clip_teacher_missing_dir(tmp_path):
    cfg = TeacherConfig(kind="clip", checkpoint=str(tmp_path / "nope"), tokenizer="")
    with pytest.raises(DsmdError, match="not found"):
        load_teacher(cfg, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DsmdError, match="cannot load"):
        load_teacher(TeacherConfig(kind="clip", checkpoint=str(tmp_path / "empty"), tokenizer=""), device="cpu")
