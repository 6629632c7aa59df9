"""Export a saved student's two encoders: torch.export programs, ONNX (float32 and int8), tokenizer, preprocessing.

Both encoders are captured once with ``torch.export`` (dynamic batch; the text encoder also has a dynamic
sequence length up to student.max_text_len), saved as ``.pt2`` and translated to ONNX from the same program.
The int8 models use onnxruntime's dynamic quantisation: weights of MatMul/Gemm (and the token embedding table)
stored as int8, activations quantised per call, so nothing needs calibration data.

Every file is checked against the PyTorch student on real inputs before the export is accepted: the captions
go through the shipped ``tokenizer.json`` and the images through the shipped numpy preprocessing, so the check
covers what a user of the export runs, not only the network. Float models must reach a cosine of at least
:data:`FLOAT_MIN_COSINE` on every input; int8 models at least :data:`INT8_MIN_COSINE` (quantisation noise of
transformer activations; measured figures go into ``export.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import DsmdError
from pipeline.models.student import Student, load_student, read_card
from pipeline.retrieval.provenance import PROVENANCE_KEY, student_provenance
from pipeline.retrieval.runtime import (
    PREPROCESS_FILE,
    TOKENIZER_FILE,
    ImageEncoder,
    TextEncoder,
    load_tokenizer,
    tokenize,
)

__all__ = [
    "FLOAT_MIN_COSINE",
    "INT8_MIN_COSINE",
    "EXPORT_FILE",
    "export_student",
    "export_text_encoder",
    "export_image_encoder",
    "write_preprocessing",
]

FLOAT_MIN_COSINE = 0.999
# Dynamic int8 quantisation perturbs every layer's activations. Random-weight students stay above 0.999 (the
# demo student: text 0.99993, image 0.9995; ViT-B/16 + BERT-base: 0.9993 / 0.9994, benchmarks/deploy.py);
# trained weights have larger activation outliers, hence a floor well below that. The measured figure of each
# export is in export.json.
INT8_MIN_COSINE = 0.95
EXPORT_FILE = "export.json"
EXPORT_FORMAT = "dsmd-export"
EXPORT_VERSION = 1
TEXT_INPUTS = ("input_ids", "attention_mask")


class _TextEncoder(nn.Module):
    """The text half of the student alone, so that its exported program carries no vision weights."""

    def __init__(self, student: Student):
        super().__init__()
        self.text, self.text_head = student.text, student.text_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # The student's own method, on a module holding only what it reads: one definition of the encoder.
        return Student.encode_text(self, input_ids, attention_mask)


class _ImageEncoder(nn.Module):
    def __init__(self, student: Student):
        super().__init__()
        self.vision, self.image_head = student.vision, student.image_head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return Student.encode_image(self, pixels)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and onnxscript logs optimiser notes; a CLI user needs neither."""
    # onnxruntime.quantization warns on the root logger.
    loggers = [logging.getLogger(name) for name in ("", "onnxscript", "torch.onnx", "torch.export", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _at_least_two(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torch.export specialises a dimension whose example size is 1; a batch of two keeps it dynamic.
    return {k: v if len(v) > 1 else torch.cat([v, v]) for k, v in batch.items()}


def _to_onnx(program: torch.export.ExportedProgram, path: Path, input_names, output_name: str) -> None:
    with _quiet():
        onnx_program = torch.onnx.export(
            program, (), None, input_names=list(input_names), output_names=[output_name], dynamo=True
        )
        onnx_program.save(str(path))


def export_text_encoder(student: Student, out_dir: Path, example_texts: Sequence[str]) -> dict[str, Path]:
    """text_encoder.pt2 and text_encoder.onnx (dynamic batch and sequence length); returns their paths."""
    tokens = _at_least_two(student.tokenize(list(example_texts)))
    batch = torch.export.Dim("batch", min=1)
    # A dimension that may be 1 at run time; the position embeddings bound the length.
    length = torch.export.Dim("sequence", min=1, max=student.cfg.max_text_len)
    shapes = {name: {0: batch, 1: length} for name in TEXT_INPUTS}
    with torch.no_grad():
        program = torch.export.export(
            _TextEncoder(student).eval(), (tokens["input_ids"], tokens["attention_mask"]), dynamic_shapes=shapes
        )
    paths = {"pt2": out_dir / "text_encoder.pt2", "onnx": out_dir / "text_encoder.onnx"}
    torch.export.save(program, str(paths["pt2"]))
    _to_onnx(program, paths["onnx"], TEXT_INPUTS, "text_embedding")
    return paths


def export_image_encoder(student: Student, out_dir: Path, example_pixels: torch.Tensor) -> dict[str, Path]:
    """image_encoder.pt2 and image_encoder.onnx (dynamic batch, fixed student.img_size)."""
    pixels = _at_least_two({"pixels": example_pixels})["pixels"]
    shapes = {"pixels": {0: torch.export.Dim("batch", min=1)}}
    with torch.no_grad():
        program = torch.export.export(_ImageEncoder(student).eval(), (pixels,), dynamic_shapes=shapes)
    paths = {"pt2": out_dir / "image_encoder.pt2", "onnx": out_dir / "image_encoder.onnx"}
    torch.export.save(program, str(paths["pt2"]))
    _to_onnx(program, paths["onnx"], ["pixels"], "image_embedding")
    return paths


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation of the weights (MatMul, Gemm, embedding Gather) with onnxruntime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            source, target, op_types_to_quantize=["MatMul", "Gemm", "Gather"], weight_type=QuantType.QInt8
        )
    return target


def write_preprocessing(student: Student, out_dir: Path) -> dict[str, Any]:
    """tokenizer.json and preprocess.json: what a torch-free runtime needs to prepare inputs."""
    tokenizer = student.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DsmdError(
            f"the student's tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer with a tokenizers "
            "backend; save the student with a fast (Rust) tokenizer to export it"
        )
    backend.save(str(out_dir / TOKENIZER_FILE))
    pad_token = tokenizer.pad_token or "[PAD]"
    spec = {
        "text": {
            "tokenizer": TOKENIZER_FILE,
            "max_length": int(student.cfg.max_text_len),
            "pad_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
            "pad_token": pad_token,
            "inputs": list(TEXT_INPUTS),
        },
        "image": {
            "size": int(student.cfg.img_size),
            "interpolation": "bicubic",
            "scale": "divide by 255",
            "mean": list(student.image_mean),
            "std": list(student.image_std),
            "layout": "NCHW float32, RGB",
            "inputs": ["pixels"],
        },
        "dim": int(student.dim),
        "output": "L2-normalised float32 embeddings; score = inner product",
    }
    (out_dir / PREPROCESS_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return spec


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def _encode_each_and_together(encode, items: list) -> np.ndarray:
    """Outputs for every item alone and for the whole batch, stacked: covers batch 1, padding and batching."""
    alone = [encode(items[i : i + 1]) for i in range(len(items))]
    return np.concatenate(alone + [encode(items)])


def check_parity(student: Student, out_dir: Path, texts: list[str], images: list, threads: int = 0) -> dict:
    """Min cosine of every exported file against the PyTorch student, on ``texts`` and ``images``."""
    from pipeline.retrieval.runtime import read_json

    preprocess = read_json(out_dir / PREPROCESS_FILE, "export again")
    # The shipped tokenizer must give the student's ids exactly; otherwise cosines would hide the cause.
    shipped = tokenize(load_tokenizer(out_dir / TOKENIZER_FILE, preprocess["text"]), texts)
    expected = student.tokenize(texts)
    for row, text in enumerate(texts):
        got = shipped["input_ids"][row][shipped["attention_mask"][row] == 1].tolist()
        want = expected["input_ids"][row][expected["attention_mask"][row] == 1].tolist()
        if got != want:
            raise DsmdError(f"{out_dir / TOKENIZER_FILE} tokenises {text!r} as {got}, the student as {want}")
    transform = student.image_transform()
    with torch.no_grad():
        ref_text = _encode_each_and_together(lambda t: student.encode_text(**student.tokenize(t)).numpy(), texts)
        ref_image = _encode_each_and_together(
            lambda ims: student.encode_image(torch.stack([transform(im) for im in ims])).numpy(), images
        )
    figures: dict[str, float] = {}
    for suffix in ("", ".int8"):
        text_path, image_path = out_dir / f"text_encoder{suffix}.onnx", out_dir / f"image_encoder{suffix}.onnx"
        if text_path.is_file():
            encoder = TextEncoder(text_path, out_dir / TOKENIZER_FILE, preprocess, threads)
            figures[text_path.name] = _min_cosine(_encode_each_and_together(encoder.encode, texts), ref_text)
        if image_path.is_file():
            image_encoder = ImageEncoder(image_path, preprocess, threads)
            figures[image_path.name] = _min_cosine(
                _encode_each_and_together(image_encoder.encode, images), ref_image
            )
    for name, encode, items, ref in (
        ("text_encoder.pt2", lambda m, t: m(*student.tokenize(t).values()), texts, ref_text),
        ("image_encoder.pt2", lambda m, ims: m(torch.stack([transform(im) for im in ims])), images, ref_image),
    ):
        if (out_dir / name).is_file():
            module = torch.export.load(str(out_dir / name)).module()
            with torch.no_grad():
                figures[name] = _min_cosine(
                    _encode_each_and_together(lambda x, m=module, e=encode: e(m, x).numpy(), items), ref
                )
    return figures


def _check_figures(figures: dict[str, float], out_dir: Path) -> None:
    for name, cosine in figures.items():
        floor = INT8_MIN_COSINE if ".int8." in name else FLOAT_MIN_COSINE
        if not cosine >= floor:
            raise DsmdError(
                f"{out_dir / name}: cosine to the PyTorch student is {cosine:.5f} on the check inputs, below "
                f"{floor}; the export is not faithful (report this with the student's card.json)"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_student(
    student_dir: str | Path,
    out_dir: str | Path,
    *,
    texts: Sequence[str],
    images: Sequence[Any],
    int8: bool = True,
    threads: int = 0,
) -> dict[str, Any]:
    """Export the saved student in ``student_dir`` into ``out_dir``; returns the content of export.json.

    ``texts`` (captions) and ``images`` (PIL RGB images) are real inputs: the first ones serve as export
    examples, all of them for the parity check. Raises DsmdError when a file is not faithful to the student.
    """
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    texts, images = [str(t) for t in texts], list(images)
    if not texts or not images:
        raise DsmdError("export: the parity check needs at least one caption and one image of the dataset")
    card = read_card(student_dir)
    provenance = student_provenance(student_dir)  # the weights exported here, for the bundle's check
    student = load_student(student_dir, map_location="cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXPORT_FILE).unlink(missing_ok=True)  # written last: its absence marks an unfinished export
    write_preprocessing(student, out_dir)
    if (student_dir / "tokenizer").is_dir():
        # The Hugging Face tokenizer files too, for users who load the text encoder with transformers.
        shutil.copytree(student_dir / "tokenizer", out_dir / "hf_tokenizer", dirs_exist_ok=True)
    text_paths = export_text_encoder(student, out_dir, texts[:4])
    transform = student.image_transform()
    image_paths = export_image_encoder(student, out_dir, torch.stack([transform(im) for im in images[:2]]))
    if int8:
        quantize_int8(text_paths["onnx"], out_dir / "text_encoder.int8.onnx")
        quantize_int8(image_paths["onnx"], out_dir / "image_encoder.int8.onnx")
    else:
        for name in ("text_encoder.int8.onnx", "image_encoder.int8.onnx"):
            (out_dir / name).unlink(missing_ok=True)
    figures = check_parity(student, out_dir, texts, images, threads)
    _check_figures(figures, out_dir)
    files = sorted(p for p in out_dir.iterdir() if p.is_file() and p.name != EXPORT_FILE)
    record = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "student_dir": str(student_dir),
        "student": {k: card.get(k) for k in ("teacher", "dataset", "metrics") if k in card},
        PROVENANCE_KEY: provenance,
        "architecture": {
            "student": dataclasses.asdict(student.cfg),
            "dim": student.dim,
            "parameters": card["architecture"].get("parameters"),
        },
        "parity": {
            "texts": len(texts),
            "images": len(images),
            "min_cosine": {k: round(v, 6) for k, v in figures.items()},
            "float_floor": FLOAT_MIN_COSINE,
            "int8_floor": INT8_MIN_COSINE,
        },
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        "versions": _versions(),
    }
    (out_dir / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
