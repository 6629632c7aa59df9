"""Building a retrieval bundle (format and reader: pipeline/retrieval/bundle.py) from an export directory and
the image gallery's embeddings. Needs the `onnx` package for the scoring graph; still no torch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import replaced_directory
from pipeline.errors import DsmdError
from pipeline.retrieval.bundle import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    ENCODER_PROVENANCE_KEY,
    ENCODERS,
    INT8_MAX,
    STORAGES,
)
from pipeline.retrieval.provenance import PROVENANCE_KEY, check_belongs, recorded
from pipeline.retrieval.runtime import PREPROCESS_FILE, TOKENIZER_FILE, read_json

__all__ = ["build_bundle"]


def _score_graph(storage: str, dim: int):
    from onnx import TensorProto, helper

    if storage == "int8":
        nodes = [
            helper.make_node("MatMulInteger", ["query", "gallery", "query_zero_point"], ["products"]),
            helper.make_node("Cast", ["products"], ["scores"], to=TensorProto.FLOAT),
        ]
        query_type, gallery_type, score_type = TensorProto.UINT8, TensorProto.INT8, TensorProto.FLOAT
        zero_point = [helper.make_tensor("query_zero_point", TensorProto.UINT8, [], [128])]
        query_shape, gallery_shape = ["queries", dim], [dim, "items"]
    else:
        # A block of float16 rows, widened here; the query comes transposed (dim x queries) in float32.
        nodes = [
            helper.make_node("Cast", ["gallery"], ["rows"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["rows", "query"], ["scores_by_row"]),
            helper.make_node("Transpose", ["scores_by_row"], ["scores"], perm=[1, 0]),
        ]
        query_type, gallery_type, score_type = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.FLOAT
        zero_point = []
        query_shape, gallery_shape = [dim, "queries"], ["items", dim]
    nodes.append(helper.make_node("TopK", ["scores", "k"], ["top_scores", "top_columns"], axis=-1))
    graph = helper.make_graph(
        nodes,
        f"dsmd_search_{storage}",
        [
            helper.make_tensor_value_info("query", query_type, query_shape),
            helper.make_tensor_value_info("gallery", gallery_type, gallery_shape),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("top_scores", score_type, ["queries", "k"]),
            helper.make_tensor_value_info("top_columns", TensorProto.INT64, ["queries", "k"]),
        ],
        zero_point,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dsmd")
    model.ir_version = 8  # readable by onnxruntime releases back to 1.10
    return model


def _check_gallery(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = vectors if isinstance(vectors, np.memmap) else np.asarray(vectors)  # a memmap stays on disk
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise DsmdError(
            f"bundle gallery: expected a 2-D float array (images x dim), got {vectors.dtype} {vectors.shape}"
        )
    if vectors.shape[1] != dim:
        raise DsmdError(f"bundle gallery: vectors have dim {vectors.shape[1]}, the exported student has dim {dim}")
    if len(vectors) == 0:
        raise DsmdError("bundle gallery: no vectors")
    return vectors


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def build_bundle(
    export_dir: str | Path,
    out_dir: str | Path,
    vectors: np.ndarray,
    *,
    provenance: dict[str, Any],
    ids: np.ndarray | None = None,
    paths: Sequence[str] | None = None,
    storage: str = "int8",
    encoder: str = "int8",
    meta: dict[str, Any] | None = None,
    block_rows: int = 1 << 16,
) -> Path:
    """Write a bundle into ``out_dir`` from an export directory and gallery ``vectors`` (images x dim,
    L2-normalised; a numpy memmap works and is read in blocks of ``block_rows``).

    ``provenance`` says which student and dataset encoded the vectors (pipeline/retrieval/provenance.py: a saved
    index's ``meta["provenance"]``, or the export's own record for vectors encoded with the exported student);
    a gallery of another student than the export's is refused. An existing bundle in ``out_dir`` is replaced
    only once the new one is complete; a full disk leaves it as it was.
    """
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if storage not in STORAGES:
        raise DsmdError(f"bundle storage {storage!r} is not one of {', '.join(STORAGES)}")
    if encoder not in ENCODERS:
        raise DsmdError(f"bundle encoder {encoder!r} is not one of {', '.join(ENCODERS)}")
    preprocess = read_json(export_dir / PREPROCESS_FILE, f"{export_dir} is not an export directory; run dsmd export")
    encoder_file = export_dir / ("text_encoder.int8.onnx" if encoder == "int8" else "text_encoder.onnx")
    for needed in (encoder_file, export_dir / TOKENIZER_FILE):
        if not needed.is_file():
            hint = " (exported with --no-int8?)" if needed.name.endswith(".int8.onnx") else ""
            raise DsmdError(f"{needed}: missing{hint}; export the student again with `dsmd export`")
    dim = int(preprocess["dim"])
    vectors = _check_gallery(vectors, dim)
    n = len(vectors)
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise DsmdError(f"bundle ids: expected {n} integer ids, one per gallery row, got {ids.dtype} {ids.shape}")
    if len(np.unique(ids)) != n:
        raise DsmdError("bundle ids: every gallery row needs a distinct id")
    if paths is not None and len(paths) != n:
        raise DsmdError(f"bundle paths: expected {n} paths, one per gallery row, got {len(paths)}")

    export_record = read_json(export_dir / "export.json", "the export did not finish; run dsmd export again")
    encoder_from = recorded(export_record, f"export {export_dir}", "export the student again with `dsmd export`")
    gallery_from = recorded({PROVENANCE_KEY: provenance}, "the bundle gallery", "pass the provenance of the "
                            "index (meta['provenance']) or of the export whose student encoded the vectors")
    check_belongs(gallery_from, "the bundle gallery", encoder_from, f"the student exported in {export_dir}",
                  "build the bundle from an index of the exported student (`dsmd evaluate`, then `dsmd export`)")
    header = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "dim": dim,
        "count": n,
        "storage": storage,
        "encoder": encoder,
        "parity_min_cosine": export_record.get("parity", {}).get("min_cosine", {}).get(encoder_file.name),
        "student": export_record.get("student", {}),
        PROVENANCE_KEY: gallery_from,
        ENCODER_PROVENANCE_KEY: encoder_from,
        "meta": dict(meta or {}),
    }
    with replaced_directory(out_dir) as staging:
        _write_files(staging, export_dir, encoder_file, vectors, ids, paths, storage, dim, block_rows)
        # Written last: a directory without bundle.json is an unfinished build.
        (staging / BUNDLE_FILE).write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _write_files(out_dir: Path, export_dir: Path, encoder_file: Path, vectors, ids: np.ndarray,
                 paths: Sequence[str] | None, storage: str, dim: int, block_rows: int) -> None:
    n = len(vectors)
    shutil.copyfile(encoder_file, out_dir / "text_encoder.onnx")
    shutil.copyfile(export_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    shutil.copyfile(export_dir / PREPROCESS_FILE, out_dir / PREPROCESS_FILE)

    int8 = storage == "int8"
    gallery_path = out_dir / "gallery.npy"
    gallery = np.lib.format.open_memmap(
        gallery_path, mode="w+", dtype=np.int8 if int8 else np.float16, shape=(dim, n) if int8 else (n, dim)
    )
    # The memmap's file is sparse: on a full disk, writing its pages would kill the process with SIGBUS
    # instead of raising. Reserving every block first turns that into an ENOSPC error here.
    with open(gallery_path, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    if storage == "int8":
        peak = np.zeros(dim, dtype=np.float32)
        for start, stop in _blocks(n, block_rows):
            block = np.asarray(vectors[start:stop], dtype=np.float32)
            if not np.isfinite(block).all():
                raise DsmdError(f"bundle gallery: rows {start}..{stop - 1} hold NaN or infinite values")
            peak = np.maximum(peak, np.abs(block).max(axis=0))
        scales = np.where(peak > 0, INT8_MAX / np.maximum(peak, 1e-30), 1.0).astype(np.float32)
        np.save(out_dir / "scales.npy", scales)
        for start, stop in _blocks(n, block_rows):
            block = np.asarray(vectors[start:stop], dtype=np.float32) * scales
            gallery[:, start:stop] = np.clip(np.rint(block), -INT8_MAX, INT8_MAX).astype(np.int8).T
    else:
        for start, stop in _blocks(n, block_rows):
            block = np.asarray(vectors[start:stop], dtype=np.float32)
            if not np.isfinite(block).all():
                raise DsmdError(f"bundle gallery: rows {start}..{stop - 1} hold NaN or infinite values")
            gallery[start:stop] = block.astype(np.float16)
    gallery.flush()
    del gallery
    np.save(out_dir / "ids.npy", ids.astype(np.int64))
    if paths is not None:
        (out_dir / "paths.json").write_text(json.dumps([str(p) for p in paths]), encoding="utf-8")
    (out_dir / "score.onnx").write_bytes(_score_graph(storage, dim).SerializeToString())
