"""Evaluation-stage timings: Recall@K metric computation and search latency, exact vs FAISS.

1. Metrics: `retrieval_metrics` on Flickr30k-sized (1k images x 5k captions) and COCO-sized (5k x 25k)
   test sets, D = 768 (BEiT-3 base), random unit vectors.
2. Search: latency per query over galleries of 10^4, 10^5 and 10^6 vectors, D = 256 float32 (smaller than
   BEiT-3's 768 so that 10^6 vectors stay at 1 GB per copy), exact numpy vs FAISS flat, plus IVF at 10^5 and
   10^6 with its recall@10 against exact search. Single-query latency (one query per call, the online case)
   and batched throughput (1,000 queries per call) are both reported.

Random vectors have no cluster structure, which is the worst case for IVF's recall; a last run measures IVF's
recall on clustered data (10^5 vectors around 2,000 centres), closer to real embeddings.

    python benchmarks/evaluate.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.retrieval.index import build_index, time_search  # noqa: E402
from pipeline.retrieval.metrics import retrieval_metrics  # noqa: E402


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 17):  # in chunks: a float64 draw of 10^6 x 256 would be 2 GB
        x = rng.standard_normal((min(1 << 17, n - start), dim), dtype=np.float32)
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_metrics(rng, sizes, repeats):
    rows = []
    for n_images in sizes:
        n_captions = 5 * n_images
        image_emb = unit_vectors(rng, n_images, 768)
        text_emb = unit_vectors(rng, n_captions, 768)
        caption_image = np.repeat(np.arange(n_images), 5)
        seconds = best_of(lambda: retrieval_metrics(image_emb, text_emb, caption_image), repeats)  # noqa: B023
        rows.append({"images": n_images, "captions": n_captions, "dim": 768, "seconds": seconds})
        print(f"metrics {n_images} x {n_captions}, D=768: {seconds:.3f} s", flush=True)
    return rows


def bench_search(rng, sizes, n_single, n_batch, k=10, dim=256):
    rows = []
    queries = unit_vectors(rng, n_batch, dim)
    for n in sizes:
        gallery = unit_vectors(rng, n, dim)
        backends = ["exact", "faiss-flat"] + (["faiss-ivf"] if n >= 100_000 else [])
        reference_ids = None
        for backend in backends:
            start = time.perf_counter()
            index = build_index(gallery, backend=backend)
            build_s = time.perf_counter() - start
            # IVF: the default nprobe (nlist / 16) and four times as many lists scanned.
            nprobes = [index.nprobe, 4 * index.nprobe] if backend == "faiss-ivf" else [None]
            for nprobe in nprobes:
                if nprobe is not None:
                    index.nprobe = nprobe
                row = {"gallery": n, "dim": dim, "backend": backend, "build_s": build_s}
                row.update(time_search(index, queries[:n_batch], k, n_single))
                _, ids = index.search(queries[:n_batch], k)
                if backend == "exact":
                    reference_ids = ids
                else:
                    overlap = [len(set(a) & set(b)) / k for a, b in zip(ids, reference_ids, strict=True)]
                    row["recall_at_10_vs_exact"] = float(np.mean(overlap))
                if nprobe is not None:
                    row.update(nlist=int(index.index.nlist), nprobe=nprobe)
                rows.append(row)
                print(
                    f"search n={n:>8} {backend:<10} build {build_s:6.2f} s  "
                    f"single {row['single_query_ms']:8.3f} ms  batched {row['batched_ms_per_query']:8.4f} ms/query"
                    + (f"  recall@10 {row['recall_at_10_vs_exact']:.3f}" if backend != "exact" else "")
                    + (f"  nprobe {nprobe}/{row['nlist']}" if nprobe else ""),
                    flush=True,
                )
            del index
        del gallery
    return rows


def bench_ivf_clustered(rng, n, dim=256, k=10, n_queries=1000, n_centres=2000):
    """IVF recall where the data has structure, as real embeddings do: gallery points scattered around
    cluster centres, queries close to a gallery point (as a caption is close to its image)."""
    centres = unit_vectors(rng, n_centres, dim)
    gallery = centres[rng.integers(0, n_centres, n)] + 0.6 / np.sqrt(dim) * rng.standard_normal((n, dim))
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32)
    queries = gallery[rng.integers(0, n, n_queries)] + 0.3 / np.sqrt(dim) * rng.standard_normal((n_queries, dim))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    _, reference_ids = build_index(gallery, backend="exact").search(queries, k)
    index = build_index(gallery, backend="faiss-ivf")
    _, ids = index.search(queries, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, reference_ids, strict=True)]))
    print(f"IVF on clustered data, n={n}: recall@10 vs exact {recall:.3f} (nprobe {index.nprobe}/{index.index.nlist})")
    return {"gallery": n, "dim": dim, "nlist": int(index.index.nlist), "nprobe": index.nprobe, "recall_at_10": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke test)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    import faiss

    machine = f"{platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} threads"
    print(f"machine: {machine}; numpy {np.__version__}, faiss {faiss.__version__}", flush=True)
    if args.quick:
        metrics = bench_metrics(rng, [200], repeats=1)
        search = bench_search(rng, [10_000], n_single=20, n_batch=100)
    else:
        metrics = bench_metrics(rng, [1000, 5000], repeats=3)
        search = bench_search(rng, [10_000, 100_000, 1_000_000], n_single=200, n_batch=1000)
    clustered = bench_ivf_clustered(rng, 20_000 if args.quick else 100_000)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"machine": machine, "metrics": metrics, "search": search, "ivf_clustered": clustered}, indent=2)
        )


if __name__ == "__main__":
    main()
