"""Provenance at the point of use: `dsmd evaluate` records in its indexes the student (its weights' sha256) and
the dataset they were built from; `dsmd search` and `dsmd export` refuse a student that does not belong to the
index, naming both, and answer the one that does. Also: a full disk while saving the indexes.

Before this change `dsmd search --student B --index <A's index>` answered with exit code 0 (meaningless hits).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import distill_helpers
import numpy as np
import pytest
from distill_helpers import load, write_params

from pipeline.config import stage_config
from pipeline.errors import DsmdError
from pipeline.retrieval.index import load_index
from pipeline.retrieval.provenance import check_belongs, recorded, student_provenance

world = distill_helpers.world
pytestmark = pytest.mark.usefixtures("one_thread")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The check itself, on hand-made records.


def record(sha: str, fingerprint: str | None = "d" * 64, name: str = "shapes") -> dict:
    return {"student": {"sha256": sha, "path": f"runs/{sha[:2]}"},
            "dataset": {"name": name, "fingerprint": fingerprint}}


def test_check_names_both_sides_and_compares_datasets_before_weights():
    check_belongs(record("a" * 64), "index I", record("a" * 64), "student S", "fix it")  # same: no error
    with pytest.raises(DsmdError) as caught:
        check_belongs(record("a" * 64), "index I", record("b" * 64), "student S", "fix it")
    assert str(caught.value) == ("index I was built from the student with weights sha256 aaaaaaaaaaaa (runs/aa), "
                                 "but student S has weights sha256 bbbbbbbbbbbb; fix it")
    other = record("b" * 64, fingerprint="e" * 64, name="flickr")
    with pytest.raises(DsmdError) as caught:
        check_belongs(record("a" * 64), "index I", other, "student S", "fix it")
    assert str(caught.value) == ("index I was built on dataset 'shapes' (fingerprint dddddddddddd), but student S "
                                 "comes from dataset 'flickr' (fingerprint eeeeeeeeeeee); fix it")
    # A student whose card names no dataset is judged by its weights alone.
    check_belongs(record("a" * 64), "index I", record("a" * 64, fingerprint=None), "student S", "fix it")


@pytest.mark.parametrize("meta", [{}, {"provenance": None}, {"provenance": {"dataset": {}}},
                                  {"provenance": {"student": {"sha256": ""}, "dataset": {}}}, None])
def test_a_record_written_before_provenance_is_refused(meta):
    with pytest.raises(DsmdError, match="^index I records no student and dataset .*; fix it$"):
        recorded(meta, "index I", "fix it")


def test_student_provenance_is_the_weights_digest_and_the_cards_dataset(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "card.json").write_text(json.dumps({"dataset": {"name": "n", "fingerprint": "f"}}))
    assert student_provenance(tmp_path) == {
        "student": {"sha256": hashlib.sha256(b"weights").hexdigest(), "path": str(tmp_path)},
        "dataset": {"name": "n", "fingerprint": "f"},
    }
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DsmdError, match="model.safetensors is missing"):
        student_provenance(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# End to end: two students distilled on the tiny world, the first evaluated.


class Runs:
    def __init__(self, root: Path, params: Path):
        self.root, self.params = root, params
        self.student = root / "a" / "out" / "student"  # evaluated: the indexes are its
        self.other = root / "b" / "out" / "student"  # same data and settings, another seed
        self.index = root / "evaluate" / "index"


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> Runs:
    from stages.distill.train import Trainer
    from stages.evaluate.run import run_evaluate

    root = tmp_path_factory.mktemp("provenance")
    changes = {"distill": {"teacher": "oracle", "epochs": 1},
               "evaluate": {"out_dir": str(root / "evaluate"), "ablations": "", "examples": 0}}
    params = write_params(world, root / "a", changes)
    Trainer(load(params)).train()
    Trainer(load(write_params(world, root / "b", {**changes, "distill": {**changes["distill"], "seed": 7}}))).train()
    run_evaluate(stage_config(load(params), "evaluate"))
    return Runs(root, params)


def test_evaluate_records_the_student_and_dataset_and_search_answers_that_student(runs, world):
    from pipeline.data.canonical import CanonicalDataset
    from stages.evaluate.search import search

    ds = CanonicalDataset.load(world.canonical)
    for part in ("images", "captions"):
        meta = load_index(runs.index / part).meta
        assert meta["provenance"] == {
            "student": {"sha256": sha256(runs.student / "model.safetensors"), "path": str(runs.student)},
            "dataset": {"name": "shapes-tiny", "fingerprint": ds.fingerprint},
        }
    assert sha256(runs.student / "model.safetensors") != sha256(runs.other / "model.safetensors")
    hits = search(runs.student, runs.index, text="a red circle", image=None, top=3)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert {h["id"] for h in hits} <= set(load_index(runs.index / "images").ids.tolist())
    hits = search(runs.student, runs.index, text=None, image=ds.image_path(int(ds.image_ids("test")[0])), top=2)
    assert len(hits) == 2 and all("caption" in h for h in hits)


def test_search_refuses_another_students_index_in_one_line_exit_2(runs):
    """Before: exit 0 with hits from a gallery the query's student never encoded."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "--params", str(runs.params),
               "search", "--student", str(runs.other), "--index", str(runs.index), "a red circle"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=distill_helpers.subprocess_env())
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert f"index {runs.index / 'images'} was built from the student with weights sha256 " in lines[0]
    assert sha256(runs.student / "model.safetensors")[:12] in lines[0]
    assert f"student {runs.other} has weights sha256 {sha256(runs.other / 'model.safetensors')[:12]}" in lines[0]
    assert "dsmd evaluate" in lines[0]


def test_search_refuses_a_student_of_another_dataset(runs, tmp_path):
    from stages.evaluate.search import search

    # The same weights, but the card says another dataset: only the dataset comparison can catch it.
    other = shutil.copytree(runs.student, tmp_path / "student")
    card = json.loads((other / "card.json").read_text())
    card["dataset"] = {"name": "flickr30k", "fingerprint": "f" * 64}
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(DsmdError, match=r"was built on dataset 'shapes-tiny' \(fingerprint [0-9a-f]{12}\), but "
                                        rf"student {other} comes from dataset 'flickr30k' \(fingerprint f{{12}}\)"):
        search(other, runs.index, text="a red circle", image=None, top=3)


def test_search_refuses_an_index_saved_before_provenance_was_recorded(runs, tmp_path):
    from stages.evaluate.search import search

    old = shutil.copytree(runs.index, tmp_path / "index")
    for part in ("images", "captions"):
        header = json.loads((old / part / "index.json").read_text())
        del header["meta"]["provenance"]
        (old / part / "index.json").write_text(json.dumps(header))
    with pytest.raises(DsmdError, match=f"index {old / 'images'} records no student and dataset .*dsmd evaluate"):
        search(runs.student, old, text="a red circle", image=None, top=3)


def test_export_refuses_another_students_index_before_exporting(runs, tmp_path):
    from stages.export.run import run_export

    with pytest.raises(DsmdError, match=f"index {runs.index / 'images'} was built from .* student {runs.other} has"):
        run_export(load(runs.params), out_dir=tmp_path / "export", student_dir=runs.other,
                   index_dir=runs.index / "images")
    assert not (tmp_path / "export").exists()


def test_full_disk_while_saving_the_indexes_keeps_the_old_ones_and_the_rerun_succeeds(runs, tmp_path, monkeypatch):
    from stages.evaluate.run import save_indexes

    target = shutil.copytree(runs.index, tmp_path / "index")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    images, captions = load_index(target / "images"), load_index(target / "captions")
    texts = json.loads((target / "captions" / "texts.json").read_text())
    real_save = np.save

    def full_at_captions(path, array, *args, **kwargs):
        if "captions" in str(path):  # the image index is written by then, so the staging dir is not empty
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", full_at_captions)
    with pytest.raises(DsmdError) as caught:
        save_indexes(target, images, captions, texts)
    message = str(caught.value)
    assert message == (f"no space left on device writing {target}; free space and rerun: the previous index is "
                       "kept")
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no staging directory left behind

    monkeypatch.undo()
    (target / "images" / "stale.txt").write_text("from an older save")
    save_indexes(target, images, captions, texts)
    assert not (target / "images" / "stale.txt").exists()  # replaced as a whole, not written over
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
