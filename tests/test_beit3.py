"""Our BEiT-3 against the golden fixture (made with torchscale 0.3.0) and against a plain reference.

The reference below is written straight from the architecture description (FORMATS.md) over the official
state_dict: separate q/k/v, explicit softmax(QK^T)V, torchscale's multiway split. It reproduces the fixture
itself (so it is right), and then checks our model's joint image+text mode, which the fixture does not cover.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from paths import BEIT3_FIXTURE
from PIL import Image

from pipeline.errors import DsmdError
from pipeline.models.beit3 import (
    NAMED_SIZES,
    BEiT3Config,
    BEiT3Retrieval,
    interpolate_vision_positions,
    load_beit3,
    load_official_state_dict,
    official_state_dict,
    read_checkpoint,
    read_config_json,
    resolve_config,
    save_official_checkpoint,
    write_config_json,
)
from pipeline.models.beit3_tokenizer import BEiT3Tokenizer
from pipeline.models.transforms import beit3_image_transform

FIXTURE = BEIT3_FIXTURE
pytestmark = [
    pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found"),
    pytest.mark.usefixtures("one_thread"),
]





@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def fixture_cfg() -> BEiT3Config:
    return resolve_config(str(FIXTURE / "config.json"))


@pytest.fixture(scope="module")
def fixture_model(fixture_cfg: BEiT3Config) -> BEiT3Retrieval:
    return load_beit3(FIXTURE / "checkpoint.pth", fixture_cfg)


# ------------------------------------------------------------------------------------------ the reference


def reference_forward(sd, cfg, pixels=None, ids=None, pad=None) -> torch.Tensor:
    """Hidden states after the final LayerNorm, computed the plain way from official-layout weights."""
    p = "beit3."

    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    def ffn(x, name):
        return lin(ln(F.gelu(lin(x, name + ".fc1")), name + ".ffn_layernorm"), name + ".fc2")

    def multiway(fn, x, name, split):
        if split == -1:
            return fn(x, name.format("A"))
        if split == 0:
            return fn(x, name.format("B"))
        return torch.cat([fn(x[:, :split], name.format("A")), fn(x[:, split:], name.format("B"))], dim=1)

    parts = []
    if pixels is not None:
        x = F.conv2d(pixels, sd[p + "vision_embed.proj.weight"], sd[p + "vision_embed.proj.bias"],
                     stride=cfg.patch_size)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([sd[p + "vision_embed.cls_token"].expand(len(x), -1, -1), x], dim=1)
        parts.append(x + sd[p + "encoder.embed_positions.A.weight"][2 : 2 + x.shape[1]])
    if ids is not None:
        t = sd[p + "text_embed.weight"][ids]
        parts.append(t + sd[p + "encoder.embed_positions.B.weight"][2 : 2 + t.shape[1]])
    split = -1 if ids is None else (0 if pixels is None else parts[0].shape[1])
    x = torch.cat(parts, dim=1)
    b, n, d = x.shape
    key_pad = torch.zeros(b, n, dtype=torch.bool)
    if pad is not None:
        key_pad[:, n - pad.shape[1] :] = pad.bool()
    x = x * (~key_pad)[..., None].to(x.dtype)
    h, hd = cfg.heads, d // cfg.heads
    for i in range(cfg.layers):
        layer = f"{p}encoder.layers.{i}."
        y = multiway(ln, x, layer + "self_attn_layer_norm.{}", split)
        q, k, v = (
            multiway(lin, y, layer + f"self_attn.{name}_proj.{{}}", split).view(b, n, h, hd).transpose(1, 2)
            for name in "qkv"
        )
        scores = (q * hd**-0.5) @ k.transpose(-1, -2)
        scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
        y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        y = multiway(ln, y, layer + "self_attn.inner_attn_ln.{}", split)
        x = x + multiway(lin, y, layer + "self_attn.out_proj.{}", split)
        x = x + multiway(ffn, multiway(ln, x, layer + "final_layer_norm.{}", split), layer + "ffn.{}", split)
    return multiway(ln, x, p + "encoder.layer_norm.{}", split)


def small_cfg(**changes) -> BEiT3Config:
    base = dict(embed_dim=32, heads=4, ffn_dim=48, layers=2, img_size=32, patch_size=8, vocab_size=50,
                max_text_positions=40, max_text_len=12)
    base.update(changes)
    return BEiT3Config(**base)


def random_model(cfg: BEiT3Config, seed: int = 0) -> BEiT3Retrieval:
    """Random weights everywhere, LayerNorms included, so that every tensor's role is exercised."""
    gen = torch.Generator().manual_seed(seed)
    model = BEiT3Retrieval(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            if "norm" in name or "_ln" in name:
                if name.endswith("weight"):
                    param.add_(1.0)
    return model.double().eval()


def random_text(cfg: BEiT3Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (n, cfg.max_text_len), generator=gen)
    lengths = torch.randint(2, cfg.max_text_len + 1, (n,), generator=gen)
    lengths[0] = cfg.max_text_len  # one row without padding
    pad = (torch.arange(cfg.max_text_len)[None] >= lengths[:, None]).long()
    ids = ids.masked_fill(pad.bool(), 1)
    ids[:, 0] = 0
    return ids, pad


# ------------------------------------------------------------------------------------------- fixture parity


def test_tokenizer_reproduces_fixture(expected, fixture_cfg):
    tok = BEiT3Tokenizer(FIXTURE / "tokenizer.spm", fixture_cfg.max_text_len)
    out = tok([str(c) for c in expected["captions"]])
    np.testing.assert_array_equal(out["text_ids"].numpy(), expected["text_ids"])
    np.testing.assert_array_equal(out["padding_mask"].numpy(), expected["padding_mask"])


def test_transform_reproduces_fixture_exactly(expected, fixture_cfg):
    transform = beit3_image_transform(fixture_cfg.img_size, fixture_cfg.image_mean, fixture_cfg.image_std)
    modes = set()
    pixels = []
    for name in expected["image_files"]:
        with Image.open(FIXTURE / "images" / str(name)) as image:
            modes.add(image.mode)
            pixels.append(transform(image))
    assert {"RGBA", "L", "P"} <= modes  # the fixture covers the conversions
    np.testing.assert_array_equal(torch.stack(pixels).numpy(), expected["pixel_values"])
    # It must survive the trip into DataLoader workers.
    assert torch.equal(pickle.loads(pickle.dumps(transform))(Image.new("L", (7, 9), 3)),
                       transform(Image.new("L", (7, 9), 3)))


def test_embeddings_reproduce_fixture(expected, fixture_model):
    with torch.no_grad():
        image = fixture_model.encode_image(torch.from_numpy(expected["pixel_values"]))
        text = fixture_model.encode_text(torch.from_numpy(expected["text_ids"]),
                                         torch.from_numpy(expected["padding_mask"]))
    assert image.dtype == torch.float32
    np.testing.assert_allclose(image.numpy(), expected["image_emb"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(text.numpy(), expected["text_emb"], atol=1e-5, rtol=0)


def test_reference_reproduces_fixture(expected, fixture_cfg):
    sd = read_checkpoint(FIXTURE / "checkpoint.pth")
    pixels = torch.from_numpy(expected["pixel_values"])
    ids, pad = torch.from_numpy(expected["text_ids"]), torch.from_numpy(expected["padding_mask"])
    image = F.normalize(reference_forward(sd, fixture_cfg, pixels=pixels)[:, 0] @ sd["vision_head.weight"].T, dim=-1)
    text = F.normalize(reference_forward(sd, fixture_cfg, ids=ids, pad=pad)[:, 0] @ sd["language_head.weight"].T,
                       dim=-1)
    np.testing.assert_allclose(image.numpy(), expected["image_emb"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(text.numpy(), expected["text_emb"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ modes against the reference


@pytest.mark.parametrize("mode", ["image", "text", "joint", "joint-unpadded"])
def test_matches_reference_in_every_mode(mode):
    cfg = small_cfg()
    model = random_model(cfg, seed=1)
    sd = official_state_dict(model)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(3, 3, cfg.img_size, cfg.img_size, generator=gen, dtype=torch.float64)
    ids, pad = random_text(cfg, 3, seed=3)
    kwargs = {
        "image": dict(pixels=pixels),
        "text": dict(ids=ids, pad=pad),
        "joint": dict(pixels=pixels, ids=ids, pad=pad),
        "joint-unpadded": dict(pixels=pixels, ids=ids),
    }[mode]
    want = reference_forward(sd, cfg, **kwargs)
    with torch.no_grad():
        got = model.beit3(pixels=kwargs.get("pixels"), text_ids=kwargs.get("ids"), padding_mask=kwargs.get("pad"))
    assert got.shape == want.shape
    real = torch.ones(want.shape[:2], dtype=torch.bool)
    if "pad" in kwargs:  # padded positions are never looked at; compare the rest
        real[:, want.shape[1] - pad.shape[1] :] = ~pad.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)


def test_joint_mode_uses_both_experts_and_fused_feature():
    cfg = small_cfg()
    model = random_model(cfg, seed=4)
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=gen, dtype=torch.float64)
    ids, pad = random_text(cfg, 2, seed=6)
    with torch.no_grad():
        fused = model.encode_pair(pixels, ids, pad)
        want = F.normalize(reference_forward(official_state_dict(model), cfg, pixels, ids, pad)[:, 0], dim=-1)
        torch.testing.assert_close(fused.double(), want, atol=1e-6, rtol=0)
        # The caption changes the fused feature (attention crosses the modalities) ...
        other = model.encode_pair(pixels, ids.flip(0), pad.flip(0))
        assert (fused - other).abs().max() > 1e-3
        # ... and the language expert is used on the text positions: changing B's FFN changes the result.
        model.beit3.encoder.layers[0].ffn.B.fc2.weight.mul_(-1.0)
        assert (model.encode_pair(pixels, ids, pad) - fused).abs().max() > 1e-3
        # while image-only output does not depend on expert B at all
        image_before = model.encode_image(pixels)
        model.beit3.encoder.layers[1].self_attn.qkv_proj.B.weight.mul_(-2.0)
        torch.testing.assert_close(model.encode_image(pixels), image_before, atol=0, rtol=0)


def test_trailing_padding_does_not_change_text_embedding():
    cfg = small_cfg()
    model = random_model(cfg, seed=7)
    ids, pad = random_text(cfg, 4, seed=8)
    ids, pad = ids[1:], pad[1:]  # rows that all end in padding
    keep = int((pad == 0).sum(1).max())
    with torch.no_grad():
        full = model.encode_text(ids, pad)
        trimmed = model.encode_text(ids[:, :keep], pad[:, :keep])
    torch.testing.assert_close(full, trimmed, atol=1e-6, rtol=0)


def test_bfloat16_close_to_float32():
    cfg = small_cfg()
    model = random_model(cfg, seed=9).float()
    gen = torch.Generator().manual_seed(10)
    pixels = torch.randn(4, 3, cfg.img_size, cfg.img_size, generator=gen)
    ids, pad = random_text(cfg, 4, seed=11)
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(pixels), model.encode_text(ids, pad)
        half = model.to(torch.bfloat16)
        got_i, got_t = half.encode_image(pixels.bfloat16()), half.encode_text(ids, pad)
    assert got_i.dtype == torch.float32
    assert (got_i * ref_i).sum(-1).min() > 0.98
    assert (got_t * ref_t).sum(-1).min() > 0.98


# --------------------------------------------------------------------------------------- checkpoint files


def test_renamed_key_fails_naming_it(tmp_path):
    sd = read_checkpoint(FIXTURE / "checkpoint.pth")
    sd["beit3.encoder.layers.1.ffn.A.fc_one.weight"] = sd.pop("beit3.encoder.layers.1.ffn.A.fc1.weight")
    path = tmp_path / "renamed.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(DsmdError) as info:
        load_beit3(path, resolve_config(str(FIXTURE / "config.json")))
    message = str(info.value)
    assert "beit3.encoder.layers.1.ffn.A.fc1.weight" in message and "missing" in message
    assert "beit3.encoder.layers.1.ffn.A.fc_one.weight" in message and "unexpected" in message
    assert str(path) in message


@pytest.mark.parametrize("wrap", ["model", "module", "bare"])
def test_checkpoint_wrappers(tmp_path, wrap, expected, fixture_cfg):
    sd = read_checkpoint(FIXTURE / "checkpoint.pth")
    path = tmp_path / "ckpt.pth"
    torch.save(sd if wrap == "bare" else {wrap: sd}, path)
    model = load_beit3(path, fixture_cfg)
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(expected["pixel_values"]))
    np.testing.assert_allclose(image.numpy(), expected["image_emb"], atol=1e-5, rtol=0)


def test_pickled_objects_are_refused(tmp_path, fixture_cfg):
    sd = read_checkpoint(FIXTURE / "checkpoint.pth")
    path = tmp_path / "with_args.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(DsmdError, match="weights-only"):
        load_beit3(path, fixture_cfg)
    with pytest.raises(DsmdError, match="not found"):
        load_beit3(tmp_path / "absent.pth", fixture_cfg)


def test_wrong_size_fails_with_shapes(fixture_cfg):
    wrong = BEiT3Config(**{**fixture_cfg.__dict__, "ffn_dim": 96})
    with pytest.raises(DsmdError, match=r"ffn\.A\.fc1\.weight \(128, 64\) \(expected \(96, 64\)\)"):
        load_beit3(FIXTURE / "checkpoint.pth", wrong)


def test_official_layout_round_trip(tmp_path, fixture_model, fixture_cfg):
    original = read_checkpoint(FIXTURE / "checkpoint.pth")
    saved = official_state_dict(fixture_model)
    assert set(saved) == set(original)
    for key, value in original.items():
        assert torch.equal(saved[key], value), key
    path = tmp_path / "again.pth"
    save_official_checkpoint(fixture_model, path)
    reloaded = torch.load(path, weights_only=True)
    assert set(reloaded) == {"model"} and set(reloaded["model"]) == set(original)
    # q/k/v are stored as separate tensors, not views of the fused matrix (the file stays its own size).
    assert path.stat().st_size < 1.2 * (FIXTURE / "checkpoint.pth").stat().st_size


# ---------------------------------------------------------------------------- image size and interpolation


def test_interpolation_keeps_extra_rows_and_grid_layout():
    dim, old, new = 5, 3, 6
    extra = torch.randn(3, dim)
    # Patch rows that depend on the column only: after resizing, every row of the grid must still agree.
    columns = torch.randn(old, dim)
    table = torch.cat([extra, columns.repeat(old, 1)])
    out = interpolate_vision_positions(table, new)
    assert out.shape == (3 + new * new, dim)
    assert torch.equal(out[:3], extra)
    grid = out[3:].view(new, new, dim)
    torch.testing.assert_close(grid, grid[:1].expand(new, new, dim))
    # Constant stays constant; the same size is the identity.
    const = torch.cat([extra, torch.full((old * old, dim), 0.7)])
    torch.testing.assert_close(interpolate_vision_positions(const, new)[3:], torch.full((new * new, dim), 0.7))
    assert interpolate_vision_positions(table, old) is table
    with pytest.raises(DsmdError, match="square"):
        interpolate_vision_positions(torch.randn(3 + 5, dim), 2)


def test_checkpoint_loads_at_another_image_size(expected, fixture_cfg):
    bigger = resolve_config(str(FIXTURE / "config.json"), img_size=64)
    model = load_beit3(FIXTURE / "checkpoint.pth", bigger)
    table = model.beit3.encoder.embed_positions.A.weight
    assert table.shape == (3 + 16, fixture_cfg.embed_dim)
    original = read_checkpoint(FIXTURE / "checkpoint.pth")["beit3.encoder.embed_positions.A.weight"]
    assert torch.equal(table[:3], original[:3])
    transform = beit3_image_transform(64)
    with Image.open(FIXTURE / "images" / "img2.png") as image:
        pixels = transform(image)[None]
    with torch.no_grad():
        emb = model.encode_image(pixels)
    assert emb.shape == (1, fixture_cfg.embed_dim) and torch.isfinite(emb).all()
    with pytest.raises(DsmdError, match="32, 32"):
        load_beit3(FIXTURE / "checkpoint.pth", fixture_cfg).encode_image(pixels)


# ------------------------------------------------------------------------------------------------ configs


def test_config_json_round_trip_and_errors(tmp_path, fixture_cfg):
    assert (fixture_cfg.embed_dim, fixture_cfg.heads, fixture_cfg.ffn_dim, fixture_cfg.layers) == (64, 4, 128, 2)
    assert (fixture_cfg.img_size, fixture_cfg.patch_size, fixture_cfg.vocab_size) == (32, 16, 74)
    cfg = small_cfg()
    write_config_json(cfg, tmp_path / "c.json")
    assert read_config_json(tmp_path / "c.json") == cfg
    raw = json.loads((tmp_path / "c.json").read_text())
    raw["encoder_layerz"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(DsmdError, match="encoder_layerz"):
        read_config_json(tmp_path / "bad.json")
    with pytest.raises(DsmdError, match="not a multiple"):
        small_cfg(img_size=30)


@pytest.mark.parametrize(("size", "millions"), [("base", 222), ("large", 673), ("giant", 2100)])
def test_named_sizes_have_the_published_parameter_counts(size, millions):
    cfg = resolve_config(size, img_size=384)
    assert cfg.embed_dim == NAMED_SIZES[size]["embed_dim"]
    with torch.device("meta"):
        model = BEiT3Retrieval(cfg)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert math.isclose(count, millions, rel_tol=0.03), count


def test_load_official_state_dict_accepts_the_saved_layout():
    cfg = small_cfg()
    model = random_model(cfg, seed=12)
    copy = BEiT3Retrieval(cfg).double()
    load_official_state_dict(copy, official_state_dict(model))
    for (name, a), (_, b) in zip(model.state_dict().items(), copy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> BEiT3Tokenizer:
    return BEiT3Tokenizer(FIXTURE / "tokenizer.spm", max_len=16)


def test_tokenizer_edges(tokenizer):
    out = tokenizer(["", "zebra " * 40, "a"])
    ids, pad = out["text_ids"], out["padding_mask"]
    assert ids[0, :3].tolist() == [0, 2, 1] and pad[0, :3].tolist() == [0, 0, 1]
    assert pad[1].sum() == 0 and ids[1, -1] == 2 and ids[1, 0] == 0  # cut to fit, </s> kept
    assert 3 in tokenizer.piece_ids("z")  # sentencepiece's unk (0) is XLM-R's <unk> (3)
    again = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(again(["a red circle"])["text_ids"], tokenizer(["a red circle"])["text_ids"])
    with pytest.raises(DsmdError, match="string"):
        tokenizer([None])
    with pytest.raises(DsmdError, match="not found"):
        BEiT3Tokenizer("/nonexistent/beit3.spm")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=80), min_size=1, max_size=4))
def test_tokenizer_properties(tokenizer, texts):
    out = tokenizer(texts)
    ids, pad = out["text_ids"], out["padding_mask"]
    assert ids.shape == pad.shape == (len(texts), 16)
    assert torch.equal(pad.bool(), ids == 1)  # <pad> only in the padding
    for row, text in enumerate(texts):
        n = int((pad[row] == 0).sum())
        assert ids[row, 0] == 0 and ids[row, n - 1] == 2
        assert ids[row, 1 : n - 1].tolist() == tokenizer.piece_ids(text)[:14]
