"""`dsmd evaluate`: the student next to its teacher on the test split, indexes saved, metrics and a report.

The teacher side needs no teacher model: its embeddings come from the feature store. Both sides are scored on
exactly the same items: test images with a valid teacher row that the student could decode, and their captions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import replaced_directory
from pipeline.config import Config
from pipeline.console import console
from pipeline.data.bucket import local_shard_cache
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.pairs import usable_pairs
from pipeline.encode import encode_images, encode_texts
from pipeline.errors import DsmdError
from pipeline.models.student import load_student, read_card
from pipeline.retrieval.index import build_index, time_search
from pipeline.retrieval.metrics import (
    RetrievalRanks,
    chance_curves,
    chance_metrics,
    recall_curves,
    recall_from_ranks,
    retrieval_ranks,
)
from pipeline.retrieval.provenance import PROVENANCE_KEY, student_provenance
from stages.evaluate.experiments import load_saved, report_section
from stages.evaluate.report import write_report
from store import open_store

CURVE_MAX_K = 50


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _query_latency(student, tokenize, texts: list[str], index, device, n: int = 50) -> float:
    """Median milliseconds to tokenise, encode and search one caption, as an online query would."""
    times = []
    with torch.inference_mode():
        for text in texts[: n + 1]:
            start = time.perf_counter()
            tokens = {k: v.to(device) for k, v in tokenize([text]).items()}
            query = student.encode_text(**tokens).float().cpu().numpy()
            index.search(query, 10)
            times.append(time.perf_counter() - start)
    times = times[1:]  # the first call pays for warm-up
    return 1000 * float(np.median(times)) if times else 0.0


def _examples(ds, texts, caption_image_ids, text_emb, index, n: int) -> list[dict]:
    examples = []
    picks = np.linspace(0, len(texts) - 1, num=min(n, len(texts)), dtype=int) if n > 0 else []
    for row in picks:
        scores, ids = index.search(text_emb[row : row + 1], 5)
        examples.append(
            {
                "query": texts[row],
                "results": [
                    {
                        "path": str(ds.image_source(int(i))),
                        "score": float(s),
                        "correct": int(i) == caption_image_ids[row],
                    }
                    for s, i in zip(scores[0], ids[0], strict=True)
                ],
            }
        )
    return examples


def _view_facts(store: str, teacher: str) -> dict:
    """The teacher's stored training views (extract.views), when the store has them: K, bytes per view of an
    image, the views' size and extraction time (`dsmd store info` shows the same)."""
    from store.info import store_info

    views = store_info(store)["views"].get(teacher)
    if not views:
        return {}
    return {
        "views": views["views"],
        "view_bytes_per_image": views["bytes_per_view"],
        "views_mib": round(views["bytes_total"] / 2**20, 3),
        "views_extract_seconds": views["extract_seconds"],
    }


def _other_teachers(reader, main: str, images, captions, caption_rows, budget: int) -> dict[str, RetrievalRanks]:
    """Ranks of every other dual-stream teacher in the store (e.g. MCAD's second teacher) on the same items;
    a teacher without a valid row for each of them is left out rather than scored on another task."""
    found = {}
    arrays = set(reader.arrays())
    for name in reader.teachers():
        if name == main or not {(name, "image"), (name, "text")} <= arrays:
            continue
        if not (reader.valid(name, "image")[images].all() and reader.valid(name, "text")[captions].all()):
            console.print(f"teacher {name}: not every evaluated item has its features; left out of the report")
            continue
        found[name] = retrieval_ranks(reader.get(name, "image", images), reader.get(name, "text", captions),
                                      caption_rows, memory_budget_mb=budget)
    return found


def _parameters(reader, teacher: str) -> int | None:
    """The teacher's parameter count as extraction recorded it, when it did."""
    return reader.provenance(teacher, "image").get("teacher", {}).get("parameters")


def save_indexes(directory: Path, image_index, text_index, texts: list[str]) -> None:
    """``images/`` and ``captions/`` (with the captions' texts) under ``directory``, swapped in together: a
    failed save (a full disk: one line naming the path) leaves the previous indexes whole and no partial files."""
    with replaced_directory(directory) as staging:
        image_index.save(staging / "images")
        text_index.save(staging / "captions")
        (staging / "captions" / "texts.json").write_text(json.dumps(texts))


def run_evaluate(cfg: Config) -> dict:
    ev, teacher_name = cfg.evaluate, cfg.distill.teacher
    student_dir = Path(cfg.distill.out_dir) / "student"
    out = Path(ev.out_dir)
    device = _device(ev.device)
    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    ds.use_shard_cache(local_shard_cache(cfg.extract.cache_dir, cfg.extract.cache_gb), in_order=True)
    card = read_card(student_dir)
    if card.get("dataset", {}).get("fingerprint") not in (None, ds.fingerprint):
        raise DsmdError(
            f"{student_dir} was trained on another dataset (fingerprint {card['dataset']['fingerprint']}); "
            f"this dataset is {ds.fingerprint}"
        )
    reader = open_store(cfg.extract.store, dataset_fingerprint=ds.fingerprint, teacher=teacher_name,
                        cache_dir=cfg.extract.cache_dir or None, cache_bytes=int(cfg.extract.cache_gb * 2**30))
    provenance = student_provenance(student_dir)  # before loading: the digest is of the weights read here
    student = load_student(student_dir, map_location=device)

    image_valid = reader.valid(teacher_name, "image")
    text_valid = reader.valid(teacher_name, "text")
    images = ds.image_ids(ev.split)
    images = images[image_valid[images]]
    captions = usable_pairs(ds, ev.split, image_valid, text_valid)
    if len(images) == 0 or len(captions) == 0:
        raise DsmdError(f"split {ev.split!r} has no images or captions with teacher features; check evaluate.split")

    started = time.perf_counter()
    image_emb, decoded = encode_images(
        student.encode_image, ds, images, student.image_transform(), dim=student.dim,
        batch_size=ev.batch_size, device=device,
    )
    texts = ds.texts(captions)
    text_emb = encode_texts(student.encode_text, student.tokenize, texts, batch_size=ev.batch_size, device=device)
    encode_seconds = time.perf_counter() - started
    # Images the student cannot decode leave both galleries, so that teacher and student answer the same task.
    images, image_emb = images[decoded], image_emb[decoded]
    row_of = {int(image_id): row for row, image_id in enumerate(images)}
    caption_image_ids = ds.caption_image_ids()[captions]
    keep = np.array([int(i) in row_of for i in caption_image_ids], dtype=bool)
    captions, text_emb, caption_image_ids = captions[keep], text_emb[keep], caption_image_ids[keep]
    texts = [t for t, k in zip(texts, keep, strict=True) if k]
    caption_rows = np.array([row_of[int(i)] for i in caption_image_ids], dtype=np.int64)

    teacher_image = reader.get(teacher_name, "image", images)
    teacher_text = reader.get(teacher_name, "text", captions)
    budget = ev.memory_budget_mb
    student_ranks = retrieval_ranks(image_emb, text_emb, caption_rows, memory_budget_mb=budget)
    teacher_ranks = retrieval_ranks(teacher_image, teacher_text, caption_rows, memory_budget_mb=budget)
    student_metrics = recall_from_ranks(student_ranks, ev.ks)
    teacher_metrics = recall_from_ranks(teacher_ranks, ev.ks)
    other_ranks = _other_teachers(reader, teacher_name, images, captions, caption_rows, budget)
    other_teachers = {name: recall_from_ranks(ranks, ev.ks) for name, ranks in other_ranks.items()}
    chance = chance_metrics(len(images), caption_rows, ev.ks)
    max_k = min(CURVE_MAX_K, len(images))
    curves = {
        "student": recall_curves(student_ranks, max_k),
        "teacher": recall_curves(teacher_ranks, max_k),
        **{f"teacher {name}": recall_curves(ranks, max_k) for name, ranks in other_ranks.items()},
        "chance": chance_curves(len(images), caption_rows, max_k),
    }

    paths = [ds.image_relpath(int(i)) for i in images]
    # Which student and dataset the galleries come from: `dsmd search` and `dsmd export` refuse another student.
    built_from = {**provenance, "dataset": {"name": ds.name, "fingerprint": ds.fingerprint}}
    common = {"model": "student", "dataset": ds.fingerprint, "split": ev.split, PROVENANCE_KEY: built_from}
    image_index = build_index(
        image_emb, ids=images, paths=paths, kind=ev.index, memory_budget_mb=budget,
        meta={"modality": "image", **common},
    )
    text_index = build_index(
        text_emb, ids=captions, kind=ev.index, memory_budget_mb=budget, meta={"modality": "text", **common},
    )
    save_indexes(out / "index", image_index, text_index, texts)

    search = time_search(image_index, text_emb[:200], k=10)
    extra = {
        "student": {
            "parameters": sum(p.numel() for p in student.parameters()),
            "query_ms": _query_latency(student, student.tokenize, texts, image_index, device),
            "search_ms": search["single_query_ms"],
            "search_batch_ms": search["batched_ms_per_query"],
        },
        "teacher": {"name": teacher_name, "parameters": _parameters(reader, teacher_name),
                    **_view_facts(cfg.extract.store, teacher_name)},
        "teachers": {name: {"parameters": _parameters(reader, name)} for name in other_ranks},
        "run": {
            "split": ev.split,
            "n_images": len(images),
            "n_captions": len(captions),
            "encode_seconds": round(encode_seconds, 3),
            "index": image_index.meta.get("plan", ""),
        },
    }
    train_log = Path(cfg.distill.out_dir) / "train_log.csv"
    n_pca = min(len(images), 500)
    # The overlay compares a student with the teacher it was distilled into; the no-teacher baseline learns a space
    # of its own (of any width, distill.supervised.dim), where a shared projection means nothing.
    in_teacher_space = card.get("method") != "supervised" and teacher_image.shape[1] == image_emb.shape[1]
    written = write_report(
        out,
        dataset_name=ds.name,
        student=student_metrics,
        teacher=teacher_metrics,
        chance=chance,
        curves=curves,
        train_log=train_log if train_log.exists() else None,
        pca_feats=(teacher_image[:n_pca], image_emb[:n_pca]) if in_teacher_space else None,
        examples=_examples(ds, texts, caption_image_ids, text_emb, image_index, ev.examples),
        extra=extra,
        other_teachers=other_teachers,
        experiments=report_section(load_saved(ev.ablations), ev.ablations),
    )
    console.print(
        f"[green]evaluate done[/green] on {len(images)} images / {len(captions)} captions ({ev.split}): "
        f"student RSUM {student_metrics['rsum']:.1f}, teacher RSUM {teacher_metrics['rsum']:.1f} "
        f"({100 * student_metrics['rsum'] / max(teacher_metrics['rsum'], 1e-9):.1f}%), chance {chance['rsum']:.1f}; "
        f"report: {written['html']}"
    )
    return json.loads(written["metrics"].read_text())
