"""`dsmd export`: the saved student exported and checked on real captions and images, then a bundle built from
the evaluated image gallery (the index `dsmd evaluate` saved, or the same images encoded again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.console import console
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.images import BadImageError, load_rgb
from pipeline.errors import DsmdError
from pipeline.retrieval.index import read_header
from pipeline.retrieval.provenance import INDEX_FIX, check_belongs, recorded, student_provenance
from stages.export.bundle import build_bundle
from stages.export.onnx_export import export_student


def _spread(ids: np.ndarray, n: int) -> np.ndarray:
    if len(ids) == 0 or n <= 0:
        return ids[:0]
    return ids[np.unique(np.linspace(0, len(ids) - 1, num=min(n, len(ids))).astype(int))]


def check_inputs(ds: CanonicalDataset, split: str, n_texts: int, n_images: int) -> tuple[list[str], list]:
    """Real captions and decodable images of ``split``, spread over it, for the parity check."""
    texts = ds.texts(_spread(ds.caption_ids(split), n_texts))
    images = []
    for image_id in _spread(ds.image_ids(split), 4 * n_images):
        try:
            images.append(load_rgb(ds.image_source(int(image_id))))
        except BadImageError:
            continue
        if len(images) == n_images:
            break
    if not texts or not images:
        raise DsmdError(
            f"export: split {split!r} of {ds.name} has no captions or no decodable images for the parity check; "
            "choose another with --set evaluate.split=..."
        )
    return texts, images


def gallery_vectors(index_dir: Path, student_dir: Path, ds: CanonicalDataset, batch_size: int):
    """(vectors, ids, paths, meta) of a saved image index; approximate indexes are encoded again."""
    from pipeline.retrieval.index import ExactIndex, load_index

    index = load_index(index_dir)
    if isinstance(index, ExactIndex):
        return np.asarray(index.vectors, dtype=np.float32), index.ids, index.paths, index.meta
    if index.backend == "faiss-flat":
        return index.index.reconstruct_n(0, index.index.ntotal), index.ids, index.paths, index.meta
    # IVF codes may be 8-bit approximations: encode the same images again with the student.
    import torch

    from pipeline.encode import encode_images
    from pipeline.models.student import load_student

    student = load_student(student_dir)
    vectors, decoded = encode_images(
        student.encode_image, ds, index.ids, student.image_transform(), dim=student.dim,
        batch_size=batch_size, device=torch.device("cpu"),
    )
    paths = None if index.paths is None else [p for p, ok in zip(index.paths, decoded, strict=True) if ok]
    return vectors[decoded], index.ids[decoded], paths, index.meta


def run_export(
    cfg: Config,
    *,
    out_dir: Path,
    student_dir: Path,
    index_dir: Path,
    int8: bool = True,
    bundle: bool = True,
    storage: str = "int8",
    encoder: str = "int8",
    n_texts: int = 64,
    n_images: int = 16,
) -> dict[str, Any]:
    from pipeline.retrieval.bundle import ENCODERS, STORAGES

    if storage not in STORAGES or encoder not in ENCODERS:
        raise DsmdError(f"export: --storage must be one of {STORAGES} and --encoder one of {ENCODERS}")
    if encoder == "int8" and not int8:
        raise DsmdError("export: --no-int8 leaves no int8 text encoder for the bundle; add --encoder float")
    if bundle:
        # Checked before the export's minutes are spent: the gallery must be this student's.
        if not (index_dir / "index.json").is_file():
            raise DsmdError(
                f"{index_dir}: no saved image index to bundle; run `dsmd evaluate` first, pass --index DIR, "
                "or export without the bundle (--no-bundle)"
            )
        built = recorded(read_header(index_dir).get("meta"), f"index {index_dir}", INDEX_FIX)
        check_belongs(built, f"index {index_dir}", student_provenance(student_dir), f"student {student_dir}",
                      INDEX_FIX)
    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    texts, images = check_inputs(ds, cfg.evaluate.split, n_texts, n_images)
    record = export_student(student_dir, out_dir, texts=texts, images=images, int8=int8)
    figures = ", ".join(f"{name} {cosine:.4f}" for name, cosine in record["parity"]["min_cosine"].items())
    console.print(f"[green]exported[/green] {student_dir} to {out_dir}; min cosine to the student: {figures}")
    if bundle:
        vectors, ids, paths, meta = gallery_vectors(index_dir, student_dir, ds, cfg.evaluate.batch_size)
        target = build_bundle(
            out_dir, out_dir / "bundle", vectors, provenance=built, ids=ids, paths=paths, storage=storage,
            encoder=encoder, meta=meta,
        )
        size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
        console.print(
            f"[green]bundle[/green] {target}: {len(ids)} images ({storage}), {encoder} text encoder, "
            f"{size / 2**20:.1f} MB; try `dsmd search --bundle {target} \"a caption\"`"
        )
        record["bundle"] = str(target)
    return record
