"""The retrieval bundle's format and its reader: caption -> images with onnxruntime, numpy and `tokenizers` only
(no torch). `dsmd search --bundle` runs this; the writer is stages/export/bundle.py.

Directory layout (``bundle.json`` is written last; a directory without it is an unfinished build). bundle.json
records which student and dataset the gallery came from (``provenance``) and which student the text encoder was
exported from (``encoder_provenance``); a bundle whose two differ, or that records neither, is refused.

- ``text_encoder.onnx`` (float32 or int8, copied from an export), ``tokenizer.json``, ``preprocess.json``;
- ``gallery.npy``: the image embeddings, ``int8`` codes stored transposed (dim x N), or ``float16`` rows
  (N x dim); ``scales.npy`` (int8 only): per-dimension multipliers, ``code = round(value * scale)``;
- ``ids.npy`` (int64 image id per gallery item) and ``paths.json`` (optional, relative image paths);
- ``score.onnx``: the search graph, ``query x gallery`` then top-k, run by onnxruntime.
  int8: one integer product (MatMulInteger) over the whole gallery: the per-dimension scales are folded into
  the query, which is quantised to 8 bits per call, so the gallery is never widened (10^6 x 128 codes in
  ~15 ms on one core here). float16: onnxruntime has no float16 matrix product on most CPUs and would widen
  the whole gallery to float32 on every query (twice the gallery in scratch memory), so the rows are fed in
  blocks whose float32 copy stays within ``FLOAT_BLOCK_BYTES``; numpy's own float16 -> float32 conversion is
  several times slower than onnxruntime's.

The candidates the graph returns (a few times k) are rescored in float32 against the stored values, so the
final order and scores do not carry the query's quantisation. Scores are inner products of L2-normalised
embeddings (cosines, up to the gallery's storage precision).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DsmdError
from pipeline.retrieval.provenance import PROVENANCE_KEY, check_belongs, recorded
from pipeline.retrieval.runtime import PREPROCESS_FILE, TOKENIZER_FILE, TextEncoder, make_session, read_json

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "ENCODER_PROVENANCE_KEY",
    "STORAGES",
    "ENCODERS",
    "Bundle",
    "search_bundle",
]

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "dsmd-bundle"
# 2: records the provenance of its gallery and of its text encoder (pipeline/retrieval/provenance.py).
BUNDLE_VERSION = 2
# bundle.json's record of the student the text encoder was exported from (``provenance``: the gallery's).
ENCODER_PROVENANCE_KEY = "encoder_provenance"
STORAGES = ("int8", "float16")
ENCODERS = ("int8", "float")
# The scoring graph returns this many candidates per wanted result (at least RESCORE_MIN) for rescoring.
RESCORE_FACTOR = 4
RESCORE_MIN = 32
# |code| <= 127 so that the query's zero point (128) and the codes stay symmetric.
INT8_MAX = 127
# float16 galleries are scored in row blocks whose float32 copy takes at most this much scratch memory.
FLOAT_BLOCK_BYTES = 4 << 20



def _check_provenance(header: dict[str, Any], directory: Path) -> None:
    """The gallery and the text encoder must come from one student: refuse a bundle assembled from two."""
    fix = "build the bundle again with `dsmd export` (from the index of the exported student)"
    gallery = recorded(header, f"bundle {directory}", fix)
    encoder = recorded({PROVENANCE_KEY: header.get(ENCODER_PROVENANCE_KEY)}, f"bundle {directory}", fix)
    check_belongs(gallery, f"the gallery of bundle {directory}", encoder, "its text encoder's student", fix)


class Bundle:
    """A loaded bundle. ``threads`` = onnxruntime intra-op threads (0: all cores); ``mmap`` maps the gallery
    instead of reading it into memory (faster start, pages read on first search)."""

    def __init__(self, directory: str | Path, *, threads: int = 0, mmap: bool = False):
        import onnxruntime as ort

        directory = Path(directory)
        self.directory = directory
        header = read_json(directory / BUNDLE_FILE, f"{directory} is not a finished bundle; run dsmd export")
        if header.get("format") == BUNDLE_FORMAT:
            _check_provenance(header, directory)  # first: a version 1 bundle is refused for recording none
        if header.get("format") != BUNDLE_FORMAT or header.get("version") != BUNDLE_VERSION:
            raise DsmdError(
                f"{directory / BUNDLE_FILE}: format {header.get('format')!r} version {header.get('version')!r}, "
                f"expected {BUNDLE_FORMAT!r} version {BUNDLE_VERSION}; build the bundle again"
            )
        self.header = header
        self.storage = header["storage"]
        preprocess = read_json(directory / PREPROCESS_FILE, "the bundle is incomplete; build it again")
        self.gallery = self._load_array("gallery.npy", mmap)
        self.ids = self._load_array("ids.npy", False)
        self.scales = self._load_array("scales.npy", False) if self.storage == "int8" else None
        paths_file = directory / "paths.json"
        self.paths = json.loads(paths_file.read_text(encoding="utf-8")) if paths_file.is_file() else None
        int8 = self.storage == "int8"
        expected_dtype = np.int8 if int8 else np.float16
        expected_shape = (header["dim"], header["count"]) if int8 else (header["count"], header["dim"])
        sizes = {"bundle.json": expected_shape, "gallery.npy": self.gallery.shape}
        if (
            self.gallery.shape != expected_shape
            or self.gallery.dtype != expected_dtype
            or len(self.ids) != header["count"]
            or (self.paths is not None and len(self.paths) != header["count"])
            or (self.scales is not None and self.scales.shape != (header["dim"],))
        ):
            raise DsmdError(
                f"{directory}: the bundle's parts disagree ({sizes}, gallery {self.gallery.dtype}, "
                f"{len(self.ids)} ids); build the bundle again"
            )
        self.text_encoder = TextEncoder(
            directory / "text_encoder.onnx", directory / TOKENIZER_FILE, preprocess, threads
        )
        self.scorer = make_session(directory / "score.onnx", threads)
        # No copy: onnxruntime reads the numpy buffer of a CPU tensor in place.
        self._gallery_value = ort.OrtValue.ortvalue_from_numpy(self.gallery) if int8 else None
        self._block_rows = max(1, FLOAT_BLOCK_BYTES // (4 * self.dim))

    def _load_array(self, name: str, mmap: bool) -> np.ndarray:
        path = self.directory / name
        if not path.is_file():
            raise DsmdError(f"{path}: missing from the bundle; build the bundle again")
        try:
            return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise DsmdError(f"{path}: not a readable numpy file ({exc}); build the bundle again") from None

    def __len__(self) -> int:
        return int(self.header["count"])

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.text_encoder.encode(texts)

    def _candidates(self, queries: np.ndarray, count: int) -> np.ndarray:
        """Gallery items (queries x count) to rescore: the best by the scoring graph's approximate scores."""
        k = np.array([count], dtype=np.int64)
        if self.storage == "int8":
            # score = sum_d q_d * v_d ~= sum_d (q_d / scale_d) * code_d; that weight vector is quantised per query.
            weights = queries / self.scales
            peak = np.abs(weights).max(axis=1, keepdims=True)
            step = np.where(peak > 0, INT8_MAX / np.maximum(peak, 1e-30), 1.0)
            query = (np.clip(np.rint(weights * step), -INT8_MAX, INT8_MAX) + 128).astype(np.uint8)
            return self.scorer.run(["top_columns"], {"query": query, "gallery": self._gallery_value, "k": k})[0]
        query = np.ascontiguousarray(queries.T)
        scores, columns = [], []
        for start in range(0, len(self), self._block_rows):
            block = self.gallery[start : start + self._block_rows]
            block_k = np.array([min(count, len(block))], dtype=np.int64)
            top_scores, top_rows = self.scorer.run(None, {"query": query, "gallery": block, "k": block_k})
            scores.append(top_scores)
            columns.append(top_rows + start)
        scores, columns = np.concatenate(scores, axis=1), np.concatenate(columns, axis=1)
        if scores.shape[1] > count:
            keep = np.argpartition(-scores, count - 1, axis=1)[:, :count]
            columns = np.take_along_axis(columns, keep, axis=1)
        return columns

    def _stored_values(self, columns: np.ndarray) -> np.ndarray:
        """dim x len(columns) float32 gallery values as stored (dequantised for int8)."""
        if self.scales is None:
            return np.asarray(self.gallery[columns], dtype=np.float32).T
        return np.asarray(self.gallery[:, columns], dtype=np.float32) / self.scales[:, None]

    def search_columns(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` gallery columns per query embedding: ``(scores, columns)`` each (queries, min(k, size)),
        best first."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DsmdError(f"search: k must be a positive integer, got {k!r}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DsmdError(f"search: queries have shape {queries.shape}, the bundle has dim {self.dim}")
        k = min(int(k), len(self))
        count = min(len(self), max(RESCORE_FACTOR * k, RESCORE_MIN))
        candidates = self._candidates(queries, count)
        scores = np.empty((len(queries), k), dtype=np.float32)
        best = np.empty((len(queries), k), dtype=np.int64)
        for row, (query, columns) in enumerate(zip(queries, candidates, strict=True)):
            exact = query @ self._stored_values(columns)
            # Best first; equal scores by gallery column, so results are deterministic.
            order = np.lexsort((columns, -exact))[:k]
            scores[row], best[row] = exact[order], columns[order]
        return scores, best

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` image ids per query embedding: ``(scores, ids)``, best first."""
        scores, columns = self.search_columns(queries, k)
        return scores, self.ids[columns]

    def search(self, texts: Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` image ids per caption: ``(scores, ids)``, best first."""
        return self.search_vectors(self.encode(texts), k)

    def hits(self, text: str, k: int) -> list[dict[str, Any]]:
        """One caption's results as dicts: rank, id, score and path (when the bundle ships paths)."""
        scores, columns = self.search_columns(self.encode([text]), k)
        results = []
        for rank, (score, column) in enumerate(zip(scores[0], columns[0], strict=True), start=1):
            hit: dict[str, Any] = {"rank": rank, "id": int(self.ids[column]), "score": float(score)}
            if self.paths is not None:
                hit["path"] = self.paths[column]
            results.append(hit)
        return results


def search_bundle(
    directory: str | Path, text: str | None, top: int = 5, *, image: Path | None = None, threads: int = 0
) -> list[dict]:
    """`dsmd search --bundle DIR "caption"`: hits as dicts with rank, id, score and path (when shipped)."""
    if image is not None:
        raise DsmdError("search --bundle answers captions only (it ships the text encoder); drop --image")
    if not text or not str(text).strip():
        raise DsmdError("search --bundle: give a caption to search images with")
    return Bundle(directory, threads=threads).hits(str(text), top)
