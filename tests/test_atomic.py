"""pipeline.atomic.replaced_directory: a directory of outputs is swapped in whole or not at all; a full disk is
one line naming the path and leaves no staging directory behind."""

from __future__ import annotations

import errno

import pytest

from pipeline.atomic import replaced_directory
from pipeline.errors import DsmdError


def contents(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_new_directory_appears_only_when_the_block_finishes(tmp_path):
    target = tmp_path / "out" / "index"
    with replaced_directory(target) as staging:
        assert staging.parent == target.parent and staging.is_dir() and not any(staging.iterdir())
        (staging / "a.txt").write_text("a")
        assert not target.exists()
    assert contents(target) == {"a.txt": "a"}
    assert [p.name for p in target.parent.iterdir()] == ["index"]


def test_existing_directory_is_replaced_as_a_whole(tmp_path):
    target = tmp_path / "index"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with replaced_directory(target) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert contents(target) == {"sub/b.txt": "b"}
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    # faiss and HDF5 say it only in their message.
    RuntimeError("Error in faiss::FileIOWriter: write error in x: 3 != 8 (No space left on device)"),
])
def test_full_disk_is_one_line_keeps_the_previous_version_and_leaves_nothing(tmp_path, error):
    target = tmp_path / "index"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(DsmdError) as caught, replaced_directory(target) as staging:
        (staging / "half.txt").write_text("half")
        raise error
    assert str(caught.value) == f"no space left on device writing {target}; free space and rerun: the previous " \
                                "index is kept"
    assert contents(target) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    # Space freed: the rerun goes through.
    with replaced_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert contents(target) == {"new.txt": "new"}


def test_full_disk_on_a_first_write_leaves_no_directory(tmp_path):
    target = tmp_path / "bundle"
    with pytest.raises(DsmdError, match="free space and rerun: nothing was left behind$"), \
            replaced_directory(target) as staging:
        (staging / "x").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged_without_leftovers(tmp_path):
    target = tmp_path / "index"
    with pytest.raises(ValueError, match="^boom$"), replaced_directory(target) as staging:
        (staging / "x").write_text("x")
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), replaced_directory(target):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "index"
    for name in (".index.tmp-123", ".index.old-456", ".indexes.tmp-1", "index.tmp-9"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("left")
    with replaced_directory(target) as staging:
        (staging / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".indexes.tmp-1", "index", "index.tmp-9"]


def test_a_file_in_the_way_is_refused_before_writing(tmp_path):
    target = tmp_path / "index"
    target.write_text("not a directory")
    with pytest.raises(DsmdError, match="is a file"), replaced_directory(target):
        pytest.fail("the block must not run")
    assert target.read_text() == "not a directory"


@pytest.mark.parametrize("free_blocks, full", [(0, True), (5, False)])
def test_numpys_errno_less_short_write_counts_as_full_only_on_a_full_disk(tmp_path, monkeypatch, free_blocks, full):
    """np.save writes with fwrite: on a full tmpfs it raised OSError('640000 requested and 381920 written'),
    errno None (seen on a 2 MB tmpfs); the file system's free blocks tell a full disk from another failure."""
    import os
    from types import SimpleNamespace

    real_statvfs = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=free_blocks) if str(p) == str(tmp_path)
                        else real_statvfs(p))
    short = OSError("640000 requested and 381920 written")
    with pytest.raises(DsmdError if full else OSError) as caught, replaced_directory(tmp_path / "index"):
        raise short
    assert (caught.value is short) != full
    assert list(tmp_path.iterdir()) == []
