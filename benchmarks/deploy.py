"""Deployment figures on this CPU: per-query latency and peak resident memory of a torch-free search bundle.

For two students, each exported with `stages.export.onnx_export.export_student` (random weights: timing and
memory do not depend on them; the parity figures of the int8 models are recorded too):

- demo: the demo student (ViT-Tiny at 64 px with 8 px patches, a 4-layer 192-wide BERT over the shapes-world
  vocabulary, 128-d output as the demo teacher's);
- base: a ViT-B/16 at 224 px + BERT-base (12 layers, 768 wide, 30,522-token embedding table), 768-d output
  as BEiT-3 base's;

and galleries of 10^4, 10^5 and 10^6 random unit vectors, two configurations:

- float: float32 text encoder, float16 gallery;
- int8: int8 (dynamically quantised) text encoder, int8 gallery.

Each bundle is measured in a fresh process in which torch cannot be imported: load the bundle, one warm-up
query, then captions one at a time; latency = tokenise + encode + search + rescoring of one caption (median and
90th percentile), peak RSS = the process's high-water mark (VmHWM) after the queries, which includes the
Python interpreter, numpy, onnxruntime and tokenizers themselves (reported alone as "runtime"). The load
average of the machine is recorded with each run: on a shared machine the median carries the others' load,
and the fastest query ("min") is the better estimate of the CPU's own speed.

    python benchmarks/deploy.py [--quick] [--threads 1] [--out results.json] [--work DIR]

``--quick`` runs the demo student on 10^4 and 10^5 only. The machine is shared: latencies are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (10_000, 100_000, 1_000_000)
CONFIGS = {"float": ("float", "float16"), "int8": ("int8", "int8")}  # name: (text encoder, gallery storage)
N_QUERIES = 100


# ---------------------------------------------------------------------------------------------------------
# Child process: measures one bundle with torch blocked.


def _vm(field: str) -> float:
    """A /proc/self/status memory field in MB (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(bundle_dir: str, queries_file: str, threads: int) -> dict:
    sys.modules["torch"] = None  # importing torch now fails: the bundle must not need it
    import onnxruntime  # noqa: F401  (imported before the first reading: part of the runtime)
    import tokenizers  # noqa: F401

    from pipeline.retrieval.bundle import Bundle

    queries = json.loads(Path(queries_file).read_text())
    runtime_mb = _vm("VmRSS")
    started = time.perf_counter()
    bundle = Bundle(bundle_dir, threads=threads)
    load_s = time.perf_counter() - started
    bundle.hits(queries[0], 10)  # warm-up
    total, encode, search = [], [], []
    for text in queries[1:]:
        t0 = time.perf_counter()
        embedding = bundle.encode([text])
        t1 = time.perf_counter()
        bundle.search_columns(embedding, 10)
        t2 = time.perf_counter()
        total.append(t2 - t0)
        encode.append(t1 - t0)
        search.append(t2 - t1)

    def ms(values, q=0.5):
        return round(1000 * float(np.quantile(values, q)), 3)

    return {
        "runtime_mb": round(runtime_mb, 1),
        "peak_rss_mb": round(_vm("VmHWM"), 1),
        "above_runtime_mb": round(_vm("VmHWM") - runtime_mb, 1),
        "load_s": round(load_s, 2),
        "query_ms_median": ms(total),
        "query_ms_p90": ms(total, 0.9),
        # The fastest query: closest to this CPU without the other processes sharing it.
        "query_ms_min": ms(total, 0.0),
        "encode_ms_median": ms(encode),
        "search_ms_median": ms(search),
        "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None,
        "load_average": round(os.getloadavg()[0], 2),
    }


# ---------------------------------------------------------------------------------------------------------
# Parent: students, exports, galleries, bundles.


def shapes_inputs(n_scenes: int, seed: int = 0):
    from stages.demo.shapes import render_scene, sample_scene, scene_captions

    rng = np.random.default_rng(seed)
    texts, images = [], []
    for _ in range(n_scenes):
        scene = sample_scene(rng)
        images.append(render_scene(scene, 64, rng))
        texts.extend(scene_captions(scene, 5, rng))
    return texts, images


def make_student(kind: str, work: Path, captions: list[str]) -> Path:
    import torch

    from pipeline.config import StudentConfig
    from pipeline.models.student import Student, build_vocab, load_vocab_tokenizer, save_student

    tokenizer = load_vocab_tokenizer(build_vocab(captions, work / kind / "vocab" / "vocab.txt"))
    if kind == "demo":
        cfg, dim = StudentConfig(), 128  # params.yaml's student; the demo teacher's width
    else:
        cfg = StudentConfig(
            vision_model="vit_base_patch16_224", img_size=224, patch_size=16, text_hidden=768, text_layers=12,
            text_heads=12, text_vocab_size=30522, max_text_len=64,
        )
        dim = 768
    torch.manual_seed(0)
    student = Student(cfg, dim, tokenizer=tokenizer).eval()
    params = sum(p.numel() for p in student.parameters())
    text_params = sum(p.numel() for p in student.text.parameters()) + student.text_head.weight.numel()
    directory = save_student(student, work / kind / "student", {"teacher": "random", "note": "benchmark"})
    (directory / "sizes.json").write_text(json.dumps({"parameters": params, "text_parameters": text_params}))
    return directory


def unit_vectors_file(path: Path, n: int, dim: int, seed: int) -> np.ndarray:
    if not path.exists():
        rng = np.random.default_rng(seed)
        out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, 1 << 16):
            x = rng.standard_normal((min(1 << 16, n - start), dim), dtype=np.float32)
            out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.flush()
        del out
        path.with_suffix(".tmp.npy").rename(path)
    return np.load(path, mmap_mode="r")


def dir_mb(directory: Path, names: tuple[str, ...] | None = None) -> float:
    files = [p for p in directory.iterdir() if p.is_file() and (names is None or p.name in names)]
    return sum(p.stat().st_size for p in files) / 2**20


def run(args) -> dict:
    from stages.export.bundle import build_bundle
    from stages.export.onnx_export import export_student

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    texts, images = shapes_inputs(400)
    queries_file = work / "queries.json"
    queries_file.write_text(json.dumps(texts[-(N_QUERIES + 1) :]))
    models = ("demo",) if args.quick else ("demo", "base")
    sizes = SIZES[:2] if args.quick else SIZES
    results: dict = {"machine": machine(), "threads": args.threads, "models": {}, "runs": []}
    for kind in models:
        student_dir = make_student(kind, work, texts)
        export_dir = work / kind / "export"
        started = time.perf_counter()
        record = export_student(student_dir, export_dir, texts=texts[:16], images=images[:4], threads=args.threads)
        sizes_json = json.loads((student_dir / "sizes.json").read_text())
        results["models"][kind] = {
            **sizes_json,
            "dim": record["architecture"]["dim"],
            "export_s": round(time.perf_counter() - started, 1),
            "parity_min_cosine": record["parity"]["min_cosine"],
            "text_encoder_mb": {
                "float": round(record["files"]["text_encoder.onnx"]["bytes"] / 2**20, 1),
                "int8": round(record["files"]["text_encoder.int8.onnx"]["bytes"] / 2**20, 1),
            },
        }
        print(f"{kind}: exported in {results['models'][kind]['export_s']} s, {results['models'][kind]}", flush=True)
        dim = record["architecture"]["dim"]
        for n in sizes:
            vectors = unit_vectors_file(work / f"gallery_{n}_{dim}.npy", n, dim, seed=n + dim)
            for config, (encoder, storage) in CONFIGS.items():
                bundle_dir = work / kind / f"bundle_{n}_{config}"
                build_bundle(export_dir, bundle_dir, vectors, provenance=record["provenance"], storage=storage,
                             encoder=encoder)
                child = subprocess.run(
                    [sys.executable, __file__, "--measure", str(bundle_dir), "--queries", str(queries_file),
                     "--threads", str(args.threads)],
                    capture_output=True, text=True, check=False,
                )
                if child.returncode != 0:
                    raise SystemExit(f"measuring {bundle_dir} failed:\n{child.stderr}")
                row = {
                    "model": kind, "gallery": n, "config": config, "dim": dim,
                    "bundle_mb": round(dir_mb(bundle_dir), 1),
                    "gallery_mb": round(dir_mb(bundle_dir, ("gallery.npy",)), 1),
                    **json.loads(child.stdout.strip().splitlines()[-1]),
                }
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
                if not args.keep:
                    for path in bundle_dir.iterdir():
                        path.unlink()
                    bundle_dir.rmdir()
    return results


def machine() -> dict:
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), "")
    import onnxruntime

    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def table(results: dict) -> str:
    lines = [
        "| model | gallery | config | bundle MB | peak RSS MB | above runtime MB | query ms median | p90 | min "
        "| encode ms | search ms | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['model']} | {r['gallery']:,} | {r['config']} | {r['bundle_mb']} | {r['peak_rss_mb']} | "
            f"{r['above_runtime_mb']} | "
            f"{r['query_ms_median']} | {r['query_ms_p90']} | {r['query_ms_min']} | {r['encode_ms_median']} | "
            f"{r['search_ms_median']} | {r['load_average']} |"
        )
    runtimes = [r["runtime_mb"] for r in results["runs"]]
    if runtimes:
        lines.append(f"\nruntime alone (python + numpy + onnxruntime + tokenizers): {statistics.median(runtimes)} MB")
    fits = [r for r in results["runs"] if r["peak_rss_mb"] <= 100 and r["query_ms_median"] <= 8]
    if fits:
        best = min(fits, key=lambda r: (r["peak_rss_mb"], r["query_ms_median"]))
        lines.append(f"smallest within 100 MB and 8 ms: {best['model']} / {best['gallery']:,} / {best['config']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--work", default="/tmp/dsmd_deploy_bench")
    parser.add_argument("--out", default="")
    parser.add_argument("--keep", action="store_true", help="keep the bundles (they can be large)")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)
    parser.add_argument("--queries", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.queries, args.threads)))
        return
    results = run(args)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
