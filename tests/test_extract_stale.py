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


def _with_extra_teacher(cfg, name: str, **changes):
    extra = dataclasses.replace(cfg.teacher, name=name, **changes)
    return dataclasses.replace(cfg, extra_teachers=[extra])


def test_extra_teachers_fill_the_same_store_and_a_stale_one_rebuilds_it_whole(tmp_path):
    from stages.extract.run import run_extract_all

    world = build_world(tmp_path / "world", n_train=4, n_val=0, n_test=4)
    cfg = _with_extra_teacher(config(world, tmp_path / "run"), "second")
    first = run_extract_all(cfg)
    assert [s.teacher for s in first] == [TEACHER, "second"] and all(s.shards_written > 0 for s in first)
    with open_store(cfg.extract.store) as reader:
        assert sorted(reader.teachers()) == sorted([TEACHER, "second"])
        # The same checkpoint under two names: the same rows.
        for kind in ("image", "text"):
            n = reader.shape(TEACHER, kind)[0]
            np.testing.assert_array_equal(reader.get(TEACHER, kind, np.arange(n), dtype=None),
                                          reader.get("second", kind, np.arange(n), dtype=None))
    assert all(s.shards_written == 0 for s in run_extract_all(cfg))

    shorter = _with_extra_teacher(cfg, "second", max_text_len=12)  # another setup of the second teacher
    with pytest.raises(StoreMismatchError, match="second/"):
        run_extract_all(shorter)
    rebuilt = run_extract_all(shorter, replace_stale=True)
    # The rebuild deleted the first teacher's arrays too, so they were filled again.
    assert [s.teacher for s in rebuilt][-2:] == [TEACHER, "second"]
    with open_store(cfg.extract.store) as reader:
        assert all(reader.complete(t, k) for t in (TEACHER, "second") for k in ("image", "text"))


def test_a_teacher_name_used_twice_is_refused(tmp_path):
    from pipeline.errors import DsmdError
    from stages.extract.run import run_extract_all

    world = build_world(tmp_path / "world", n_train=4, n_val=0, n_test=4)
    cfg = _with_extra_teacher(config(world, tmp_path / "run"), TEACHER)
    with pytest.raises(DsmdError, match="used twice"):
        run_extract_all(cfg)
