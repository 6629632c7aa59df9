"""`dsmd search`: query a saved index with a caption (finds images) or an image (finds captions)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.data.images import load_rgb
from pipeline.errors import DsmdError
from pipeline.models.student import load_student
from pipeline.retrieval.index import load_index
from pipeline.retrieval.provenance import INDEX_FIX, check_belongs, recorded, student_provenance


def search(student_dir: Path, index_dir: Path, *, text: str | None, image: Path | None, top: int) -> list[dict]:
    if (text is None) == (image is None):
        raise DsmdError("give either a caption (QUERY) or --image PATH, not both and not neither")
    target = index_dir / ("images" if text is not None else "captions")
    index = load_index(target)
    # Another student's queries still get scores and ids from this gallery, meaningless ones: refuse the pair.
    built = recorded(index.meta, f"index {target}", INDEX_FIX)
    check_belongs(built, f"index {target}", student_provenance(student_dir), f"student {student_dir}", INDEX_FIX)
    student = load_student(student_dir)
    with torch.inference_mode():
        if text is not None:
            tokens = student.tokenize([text])
            query = student.encode_text(**tokens)
        else:
            pixels = student.image_transform()(load_rgb(image)).unsqueeze(0)
            query = student.encode_image(pixels)
    scores, ids = index.search(query.float().numpy(), top)
    texts = json.loads((target / "texts.json").read_text()) if (target / "texts.json").exists() else None
    rows = index.paths_of(ids[:1])[0] if text is not None else [None] * len(ids[0])
    row_of = {int(i): r for r, i in enumerate(index.ids)}
    results = []
    for rank, (score, item, path) in enumerate(zip(scores[0], ids[0], rows, strict=True), start=1):
        hit = {"rank": rank, "id": int(item), "score": float(score)}
        if path is not None:
            hit["path"] = path
        if texts is not None:
            hit["caption"] = texts[row_of[int(item)]]
        results.append(hit)
    return results
