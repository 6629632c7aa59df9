"""Loading a BEiT-3 checkpoint with a peak near one copy (load_beit3_weights): the weights arrive exactly (also
when cast on the way), a bad file is still refused with the loader's message, weights_only stays on, the page
release never touches anything but the file's own mapping, and the peak memory is measured against the old way.
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from paths import BEIT3_FIXTURE, REPO

from pipeline.errors import DsmdError
from pipeline.models.beit3 import (
    BEiT3Config,
    load_beit3_weights,
    official_state_dict,
    read_checkpoint,
    resolve_config,
    write_config_json,
)
from pipeline.models.mapped_file import MappedFile, file_mappings

FIXTURE = BEIT3_FIXTURE
CHECKPOINT = FIXTURE / "checkpoint.pth"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")


@pytest.fixture(scope="module")
def cfg() -> BEiT3Config:
    return resolve_config(str(FIXTURE / "config.json"))


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return read_checkpoint(CHECKPOINT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_the_checkpoints_exactly(cfg, original, dtype):
    model, grid = load_beit3_weights(CHECKPOINT, cfg, dtype)
    assert grid == cfg.grid and not model.training
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.is_meta for p in model.parameters())
    saved = official_state_dict(model)
    assert set(saved) == set(original)
    for key, value in original.items():
        assert saved[key].dtype == dtype, key
        assert torch.equal(saved[key], value.to(dtype)), key


def test_legacy_file_format_loads_without_mapping(tmp_path, cfg, original):
    # Files from torch < 1.6 (no zip container) cannot be memory mapped: they are read as before.
    path = tmp_path / "legacy.pth"
    torch.save({"model": original}, path, _use_new_zipfile_serialization=False)
    model, _ = load_beit3_weights(path, cfg)
    for key, value in official_state_dict(model).items():
        assert torch.equal(value, original[key]), key


def test_a_renamed_key_and_a_wrong_shape_keep_their_messages(tmp_path, cfg, original):
    sd = dict(original)
    sd["beit3.encoder.layers.1.ffn.A.fc_one.weight"] = sd.pop("beit3.encoder.layers.1.ffn.A.fc1.weight")
    path = tmp_path / "renamed.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(DsmdError) as info:
        load_beit3_weights(path, cfg, torch.bfloat16)
    message = str(info.value)
    assert str(path) in message and "not a BEiT-3 retrieval checkpoint in the official layout" in message
    assert "missing key(s) beit3.encoder.layers.1.ffn.A.fc1.weight" in message
    assert "unexpected key(s) beit3.encoder.layers.1.ffn.A.fc_one.weight" in message

    wrong = BEiT3Config(**{**cfg.__dict__, "ffn_dim": 96})
    with pytest.raises(DsmdError, match=r"ffn\.A\.fc1\.weight \(128, 64\) \(expected \(96, 64\)\)"):
        load_beit3_weights(CHECKPOINT, wrong, torch.bfloat16)


def test_weights_only_stays_on(tmp_path, cfg, original, monkeypatch):
    path = tmp_path / "with_args.pth"
    torch.save({"model": original, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(DsmdError, match="weights-only"):
        load_beit3_weights(path, cfg)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_beit3_weights(CHECKPOINT, cfg)
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)


def test_release_gives_pages_back_only_inside_the_files_mapping(tmp_path):
    values = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: whole pages
    path = tmp_path / "t.pth"
    torch.save({"w": values}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["w"]
    pages = MappedFile(path)
    if sys.platform.startswith("linux"):
        assert pages.ranges == file_mappings(path) and pages.ranges
    # Ordinary memory: MADV_DONTNEED there would zero it, so release must leave it alone.
    ordinary = values.clone()
    pages.release(ordinary)
    assert torch.equal(ordinary, values)
    pages.release(mapped)
    if sys.platform.startswith("linux"):
        assert pages.released_bytes >= values.numel() * 4 - 4096
    # Given-back pages read back from the file: the tensor still holds the same numbers.
    assert torch.equal(mapped, values)
    other = MappedFile(tmp_path / "absent.pth")  # no mapping of that file: nothing is ever released
    other.release(mapped)
    assert other.released_bytes == 0


def test_peak_memory_near_one_copy(tmp_path):
    """The measurement of benchmarks/teacher_load_memory.py on a ~40 MB float32 checkpoint: the old way held
    the file and the model (about 2x), the new one about one copy, and half of that when cast to bf16."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS is read from /proc")
    sys.path.insert(0, str(REPO))
    from benchmarks.teacher_load_memory import measure, write_random_checkpoint

    cfg = BEiT3Config(embed_dim=256, heads=4, ffn_dim=1024, layers=6, img_size=64, vocab_size=8000)
    path, config = tmp_path / "ckpt.pth", tmp_path / "config.json"
    write_config_json(cfg, config)
    size = write_random_checkpoint(cfg, path)
    assert 35e6 < size < 50e6
    rows = {row["mode"]: row for row in measure(path, config)}
    assert rows["old"]["ratio"] > 1.7, rows
    assert rows["new"]["ratio"] < 1.2, rows
    assert rows["new-bf16"]["ratio"] < 0.85, rows
    assert rows["new-bf16"]["dtype"] == "bfloat16" and rows["new"]["dtype"] == "float32"
