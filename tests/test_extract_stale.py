"""A store made with other settings: refused by default, rebuilt with --replace-stale (the DVC stage's mode)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from extract_helpers import FIXTURE, TEACHER, build_world, config

from store import open_store
from store.errors import StoreMismatchError

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")


def test_other_dtype_is_refused_then_replaced(tmp_path):
    from stages.extract.run import run_extract

    world = build_world(tmp_path / "world", n_train=4, n_val=0, n_test=4)
    cfg = config(world, tmp_path / "run")
    run_extract(cfg)
    as_float32 = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, dtype="float32"))
    with pytest.raises(StoreMismatchError, match="stored as float16"):
        run_extract(as_float32)
    with open_store(cfg.extract.store) as reader:  # the refused run left the store as it was
        assert reader.get(TEACHER, "image", [0], dtype=None).dtype == np.float16
    summary = run_extract(as_float32, replace_stale=True)
    assert summary.shards_written > 0
    with open_store(cfg.extract.store) as reader:
        assert reader.complete(TEACHER, "image") and reader.complete(TEACHER, "text")
        assert reader.get(TEACHER, "image", [0], dtype=None).dtype == np.float32


def test_store_of_another_dataset_is_replaced(tmp_path):
    from stages.extract.run import run_extract

    first = build_world(tmp_path / "first", n_train=4, n_val=0, n_test=4)
    second = build_world(tmp_path / "second", n_train=6, n_val=0, n_test=4)
    run_extract(config(first, tmp_path / "run"))
    other = config(second, tmp_path / "run")
    with pytest.raises(StoreMismatchError, match="was made for dataset"):
        run_extract(other)
    run_extract(other, replace_stale=True)
    with open_store(other.extract.store) as reader:
        assert reader.shape(TEACHER, "image")[0] == 10
