"""Inner-product search over a gallery of L2-normalised embeddings, saved and loaded as a directory.

Two backends behind one interface (``search(queries, k) -> (scores, ids)``, best first):
- ``exact``: numpy, the gallery kept as float32 or float16, scored in blocks with matrix products and cut to
  the top k per block with ``argpartition``; no dependency beyond numpy, results are exact.
- ``faiss`` (faiss-cpu): ``IndexFlatIP`` (exact) for moderate galleries, an inverted file (IVF, approximate:
  only ``nprobe`` of ``nlist`` clusters are scanned) for large ones, with 8-bit scalar-quantised codes when
  float32 vectors would not fit the memory budget.
:func:`plan_index` makes the choice from the gallery size and ``memory_budget_mb``. ``index: auto`` keeps
results exact whenever they fit (numpy up to 50k rows, then faiss flat; float16 numpy when float32 is over
budget) and falls back to approximate IVF with 8-bit codes only when even float16 does not fit;
``index: faiss`` asks for speed: flat below 200k rows, IVF above (scanning nlist/16 clusters by default).
HNSW is not offered: it needs more memory than a flat index and takes long to build on few cores.

Every gallery row carries an id (default: its row number) and optionally a path, so a saved index can be
shipped and its results mapped back to images or captions. Directory layout: ``index.json`` (backend,
sizes, caller's metadata), ``ids.npy``, ``paths.json`` (if any) and ``vectors.npy`` (exact) or
``index.faiss`` (faiss).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import DsmdError

__all__ = [
    "IndexPlan",
    "RetrievalIndex",
    "ExactIndex",
    "FaissIndex",
    "plan_index",
    "build_index",
    "load_index",
    "read_header",
    "time_search",
]

FORMAT = "dsmd-index"
FORMAT_VERSION = 1
# Below this many rows a faiss gallery is searched exhaustively (IndexFlatIP); above it, an IVF is trained.
IVF_MIN_ROWS = 200_000
# Up to this many rows `auto` uses numpy exact search (a single query is as fast as with faiss, nothing beyond
# numpy is needed); above it faiss flat, whose batched search is about twice as fast (benchmarks/evaluate.py).
EXACT_MAX_ROWS = 50_000
# Scratch memory for one block of exact search (scores and partition indices).
SEARCH_SCRATCH_MB = 256
Backend = Literal["exact", "faiss-flat", "faiss-ivf", "faiss-ivf-sq8"]


@dataclass(frozen=True)
class IndexPlan:
    backend: Backend
    storage: Literal["float32", "float16", "uint8"]
    reason: str


def _faiss():
    try:
        import faiss
    except ImportError:
        raise DsmdError(
            "evaluate.index: faiss is not installed; `pip install faiss-cpu` or set evaluate.index=exact"
        ) from None
    return faiss


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def plan_index(
    n_rows: int, dim: int, *, kind: str = "auto", memory_budget_mb: float = 2048, faiss_available: bool = True
) -> IndexPlan:
    """Which backend and storage to use for a gallery of ``n_rows`` x ``dim`` under a memory budget."""
    budget = memory_budget_mb * 2**20
    mb = n_rows * dim / 2**20  # megabytes per byte of a coordinate
    fits32, fits16, fits8 = 4 * n_rows * dim <= budget, 2 * n_rows * dim <= budget, n_rows * dim <= budget
    if kind not in ("auto", "exact", "faiss"):
        raise DsmdError(f"evaluate.index: {kind!r} is not one of 'auto', 'exact', 'faiss'")
    exact32 = IndexPlan("exact", "float32", f"{n_rows} rows: exact search, float32 ({4 * mb:.0f} MB)")
    exact16 = IndexPlan("exact", "float16", f"float32 ({4 * mb:.0f} MB) exceeds the budget: exact search, float16")
    sq8 = IndexPlan("faiss-ivf-sq8", "uint8", f"float32 ({4 * mb:.0f} MB) exceeds the budget: IVF, 8-bit codes")
    flat = IndexPlan("faiss-flat", "float32", f"{n_rows} rows: faiss flat inner product (exact)")
    ivf = IndexPlan("faiss-ivf", "float32", f"{n_rows} rows >= {IVF_MIN_ROWS}: faiss IVF (approximate)")
    too_big = DsmdError(
        f"evaluate.memory_budget_mb={memory_budget_mb}: {n_rows} x {dim} vectors need {mb:.0f} MB even as 8-bit "
        f"codes ({2 * mb:.0f} MB as float16); raise the budget"
    )
    if kind == "auto":
        # Exact results whenever they fit; approximate search only when memory leaves no other choice.
        if fits32:
            return exact32 if n_rows <= EXACT_MAX_ROWS or not faiss_available else flat
        if fits16:
            return exact16
        if fits8 and faiss_available:
            return sq8
        raise too_big
    if kind == "exact":
        if fits32:
            return exact32
        if fits16:
            return exact16
        raise too_big
    # faiss asked for by name: the fast choice, IVF for large galleries.
    if fits32:
        return flat if n_rows < IVF_MIN_ROWS else ivf
    if fits8:
        return sq8
    raise too_big


def _check_vectors(name: str, vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise DsmdError(f"{name}: expected a 2-D float array (rows x dim), got {vectors.dtype} {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise DsmdError(f"{name}: vectors have dim {vectors.shape[1]}, the index has dim {dim}")
    return vectors


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DsmdError(f"search: k must be a positive integer, got {k!r}")
    return int(k)


class RetrievalIndex:
    """A gallery of vectors with ids (and optional paths); subclasses implement the search."""

    backend: str = ""

    def __init__(self, ids: np.ndarray, paths: list[str] | None, meta: dict[str, Any] | None):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.paths = None if paths is None else [str(p) for p in paths]
        self.meta = dict(meta or {})
        self._row_of: dict[int, int] | None = None  # id -> row, built on first use of paths_of

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` gallery ids per query by inner product: ``(scores, ids)``, each (queries, min(k, size)),
        best first. An approximate index may return fewer real hits; missing slots have id -1."""
        raise NotImplementedError

    def paths_of(self, ids: np.ndarray) -> list:
        """Paths for ids returned by :meth:`search` (same nesting; None for -1)."""
        if self.paths is None:
            raise DsmdError("this index was built without paths")
        if self._row_of is None:
            self._row_of = {int(i): r for r, i in enumerate(self.ids)}
        row_of = self._row_of
        return [[self.paths[row_of[int(i)]] if i >= 0 else None for i in row] for row in np.atleast_2d(ids)]

    def _extra_meta(self) -> dict[str, Any]:
        return {}

    def _save_data(self, directory: Path) -> None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write the index into ``directory`` (created); an existing index there is replaced."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_data(directory)
        np.save(directory / "ids.npy", self.ids)
        if self.paths is not None:
            (directory / "paths.json").write_text(json.dumps(self.paths))
        elif (directory / "paths.json").exists():
            (directory / "paths.json").unlink()
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "backend": self.backend,
            "dim": self.dim,
            "count": len(self),
            **self._extra_meta(),
            "meta": self.meta,
        }
        # Written last: a directory without index.json is an unfinished save.
        (directory / "index.json").write_text(json.dumps(header, indent=2))
        return directory

    def _finish_ids(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)


class ExactIndex(RetrievalIndex):
    backend = "exact"

    def __init__(
        self,
        vectors: np.ndarray,
        ids=None,
        paths=None,
        meta=None,
        *,
        scratch_mb: float = SEARCH_SCRATCH_MB,
        gallery_block: int = 1 << 16,
    ):
        self.vectors = vectors
        super().__init__(np.arange(len(vectors)) if ids is None else ids, paths, meta)
        # Search block sizes: the scores of (queries in a block) x gallery_block fit in scratch_mb.
        self.scratch_mb = scratch_mb
        self.gallery_block = gallery_block

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def _extra_meta(self):
        return {"storage": str(self.vectors.dtype)}

    def _save_data(self, directory):
        np.save(directory / "vectors.npy", np.asarray(self.vectors))

    def search(self, queries, k):
        queries = np.ascontiguousarray(_check_vectors("queries", queries, self.dim), dtype=np.float32)
        k = min(_check_k(k), len(self))
        n_queries = len(queries)
        best_scores = np.full((n_queries, 0), -np.inf, dtype=np.float32)
        best_rows = np.zeros((n_queries, 0), dtype=np.int64)
        # Gallery blocks outside, query blocks inside: a float16 gallery block is widened once.
        gallery_rows = min(len(self), self.gallery_block)
        query_rows = max(1, int(self.scratch_mb * 2**20) // (16 * gallery_rows))
        for g_start in range(0, len(self), gallery_rows):
            block = np.asarray(self.vectors[g_start : g_start + gallery_rows], dtype=np.float32)
            block_scores, block_rows = [], []
            for q_start in range(0, n_queries, query_rows):
                scores = queries[q_start : q_start + query_rows] @ block.T
                top = _top_k_unsorted(scores, k)
                block_scores.append(np.take_along_axis(scores, top, axis=1))
                block_rows.append(top + g_start)
            merged_scores = np.concatenate([best_scores, np.concatenate(block_scores)], axis=1)
            merged_rows = np.concatenate([best_rows, np.concatenate(block_rows)], axis=1)
            keep = _top_k_unsorted(merged_scores, k)
            best_scores = np.take_along_axis(merged_scores, keep, axis=1)
            best_rows = np.take_along_axis(merged_rows, keep, axis=1)
        # Best first; equal scores by gallery row, so results are deterministic.
        order = np.lexsort((best_rows, -best_scores), axis=1)
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_rows = np.take_along_axis(best_rows, order, axis=1)
        return best_scores, self._finish_ids(best_rows)


def _top_k_unsorted(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest scores per row, in no particular order."""
    if scores.shape[1] <= k:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    return np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]


class FaissIndex(RetrievalIndex):
    def __init__(self, index, backend: str, ids=None, paths=None, meta=None, nprobe: int | None = None):
        self.index = index
        self.backend = backend
        super().__init__(np.arange(index.ntotal) if ids is None else ids, paths, meta)
        if nprobe is not None:
            self.nprobe = nprobe

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def nprobe(self) -> int | None:
        return int(self.index.nprobe) if hasattr(self.index, "nprobe") else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        """How many IVF clusters a query scans: more is slower and closer to exact."""
        _faiss().extract_index_ivf(self.index).nprobe = int(value)

    def _extra_meta(self):
        extra = {"storage": "uint8" if self.backend == "faiss-ivf-sq8" else "float32"}
        if self.nprobe is not None:
            extra.update(nlist=int(self.index.nlist), nprobe=self.nprobe)
        return extra

    def _save_data(self, directory):
        _faiss().write_index(self.index, str(directory / "index.faiss"))

    def search(self, queries, k):
        queries = np.ascontiguousarray(_check_vectors("queries", queries, self.dim), dtype=np.float32)
        k = min(_check_k(k), len(self))
        scores, rows = self.index.search(queries, k)
        return scores, self._finish_ids(rows)


def _ivf_lists(n_rows: int) -> int:
    # The usual rule of thumb ~sqrt(N) clusters, with at least ~40 training points per cluster.
    return max(1, min(int(math.sqrt(n_rows)), n_rows // 40))


def _build_faiss(vectors: np.ndarray, backend: str, seed: int) -> tuple[Any, int | None]:
    faiss = _faiss()
    dim = vectors.shape[1]
    if backend == "faiss-flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, None
    nlist = _ivf_lists(len(vectors))
    quantizer = faiss.IndexFlatIP(dim)
    if backend == "faiss-ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    # k-means on a sample: 64 points per cluster is plenty and keeps training time bounded.
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(len(vectors), min(len(vectors), 64 * nlist), replace=False))]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for start in range(0, len(vectors), 1 << 16):
        index.add(np.ascontiguousarray(vectors[start : start + (1 << 16)], dtype=np.float32))
    # Scan ~1/16 of the clusters by default; callers can trade speed for recall with `index.nprobe = ...`.
    return index, max(1, nlist // 16)


def build_index(
    vectors: np.ndarray,
    *,
    ids: np.ndarray | None = None,
    paths: list[str] | None = None,
    kind: str = "auto",
    memory_budget_mb: float = 2048,
    meta: dict[str, Any] | None = None,
    seed: int = 0,
    backend: Backend | None = None,
) -> RetrievalIndex:
    """Index ``vectors`` (rows x dim, L2-normalised) with the backend :func:`plan_index` picks.

    ``ids`` name the rows in search results (default 0..N-1); ``paths`` travel with the index;
    ``meta`` (JSON-able: e.g. dataset fingerprint, teacher, modality) is saved alongside. ``backend``
    overrides the plan (e.g. ``"faiss-ivf"`` for a smaller gallery, or ``"faiss-flat"`` for a larger one).
    """
    vectors = _check_vectors("gallery", vectors)
    if len(vectors) == 0:
        raise DsmdError("gallery: no vectors to index")
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (len(vectors),) or not np.issubdtype(ids.dtype, np.integer):
            raise DsmdError(f"ids: expected {len(vectors)} integer ids, got {ids.dtype} {ids.shape}")
        if len(np.unique(ids)) != len(ids):
            raise DsmdError("ids: every gallery row needs a distinct id")
    if paths is not None and len(paths) != len(vectors):
        raise DsmdError(f"paths: expected {len(vectors)} paths, one per gallery row, got {len(paths)}")
    if backend is None:
        plan = plan_index(
            len(vectors),
            vectors.shape[1],
            kind=kind,
            memory_budget_mb=memory_budget_mb,
            faiss_available=kind != "auto" or _faiss_available(),
        )
    elif backend in ("exact", "faiss-flat", "faiss-ivf", "faiss-ivf-sq8"):
        storage = "uint8" if backend == "faiss-ivf-sq8" else "float32"
        plan = IndexPlan(backend, storage, f"backend {backend} chosen by the caller")
    else:
        raise DsmdError(f"index backend {backend!r} is not one of exact, faiss-flat, faiss-ivf, faiss-ivf-sq8")
    meta = {**(meta or {}), "plan": plan.reason}
    if plan.backend == "exact":
        return ExactIndex(np.ascontiguousarray(vectors, dtype=plan.storage), ids, paths, meta)
    index, nprobe = _build_faiss(np.ascontiguousarray(vectors, dtype=np.float32), plan.backend, seed)
    return FaissIndex(index, plan.backend, ids, paths, meta, nprobe=nprobe)


def read_header(directory: str | Path) -> dict[str, Any]:
    """The checked ``index.json`` of a saved index (backend, sizes, ``meta``), without reading its vectors."""
    header_path = Path(directory) / "index.json"
    if not header_path.is_file():
        raise DsmdError(f"{header_path}: missing; {directory} is not a saved index (or its save did not finish)")
    try:
        header = json.loads(header_path.read_text())
    except json.JSONDecodeError as exc:
        raise DsmdError(f"{header_path}: not valid JSON ({exc}); save the index again") from None
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise DsmdError(
            f"{header_path}: format {header.get('format')!r} version {header.get('version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return header


def load_index(directory: str | Path, *, mmap: bool = False) -> RetrievalIndex:
    """Read an index written by ``save``. ``mmap=True`` maps an exact index's vectors instead of reading them."""
    directory = Path(directory)
    header_path = directory / "index.json"
    header = read_header(directory)

    def need(name: str) -> Path:
        path = directory / name
        if not path.is_file():
            raise DsmdError(f"{path}: missing from the saved index; save the index again")
        return path

    ids = np.load(need("ids.npy"), allow_pickle=False)
    paths = json.loads(need("paths.json").read_text()) if (directory / "paths.json").exists() else None
    backend = header.get("backend")
    if backend == "exact":
        vectors = np.load(need("vectors.npy"), allow_pickle=False, mmap_mode="r" if mmap else None)
        index = ExactIndex(vectors, ids, paths, header.get("meta"))
    elif backend in ("faiss-flat", "faiss-ivf", "faiss-ivf-sq8"):
        index = FaissIndex(
            _faiss().read_index(str(need("index.faiss"))),
            backend,
            ids,
            paths,
            header.get("meta"),
            nprobe=header.get("nprobe"),
        )
    else:
        raise DsmdError(f"{header_path}: unknown backend {backend!r}")
    sizes = {"index.json count": header.get("count"), "ids.npy": len(ids)}
    if paths is not None:
        sizes["paths.json"] = len(paths)
    if backend == "exact":
        sizes["vectors.npy"] = len(index.vectors)
    else:
        sizes["index.faiss"] = int(index.index.ntotal)
    if len(set(sizes.values())) != 1 or index.dim != header.get("dim"):
        raise DsmdError(f"{directory}: the saved parts disagree in size ({sizes}, dim {header.get('dim')})")
    return index


def time_search(index: RetrievalIndex, queries: np.ndarray, k: int = 10, n_single: int = 100) -> dict[str, float]:
    """Search latency: median milliseconds for one query per call (the online case) over up to ``n_single``
    queries, and milliseconds per query when all ``queries`` go in one call (throughput)."""
    queries = np.ascontiguousarray(_check_vectors("queries", queries, index.dim), dtype=np.float32)
    index.search(queries[:1], k)  # warm-up: first-call allocations and thread start-up
    single = []
    for query in queries[:n_single]:
        start = time.perf_counter()
        index.search(query[None, :], k)
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    index.search(queries, k)
    batched = time.perf_counter() - start
    return {"single_query_ms": 1000 * float(np.median(single)), "batched_ms_per_query": 1000 * batched / len(queries)}
