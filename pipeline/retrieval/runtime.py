"""Running exported encoders without torch: onnxruntime sessions, the shipped tokenizer and image preprocessing.

Everything here needs numpy, onnxruntime, `tokenizers` and Pillow only, so that a bundle or an export
directory can be used on a machine (or in a process) without torch. ``preprocess.json`` describes the inputs:

- text: ``max_length`` (truncation, as student.max_text_len), ``pad_id`` / ``pad_token`` (batch padding); ids
  come from ``tokenizer.json`` (the student's own tokenizer, saved by the `tokenizers` library).
- image: resize to ``size`` x ``size`` with bicubic interpolation (PIL, as the student's transform), scale to
  [0, 1], normalise with ``mean`` / ``std`` per channel, layout NCHW float32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DsmdError

__all__ = [
    "PREPROCESS_FILE",
    "TOKENIZER_FILE",
    "read_json",
    "make_session",
    "TextEncoder",
    "ImageEncoder",
    "load_tokenizer",
    "tokenize",
    "preprocess_images",
]

PREPROCESS_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DsmdError(f"{path}: missing; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DsmdError(f"{path}: not valid JSON ({exc}); {what}") from None


def make_session(path: Path, threads: int = 0):
    """An onnxruntime CPU session for ``path``; ``threads`` = 0 lets onnxruntime use every core."""
    import onnxruntime as ort

    if not path.is_file():
        raise DsmdError(f"{path}: missing; export the student again with `dsmd export`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise for a user
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for broken files
        raise DsmdError(f"{path}: onnxruntime cannot load it ({exc}); export the student again") from None


def load_tokenizer(path: Path, text_spec: dict[str, Any]):
    """The shipped `tokenizers` tokenizer, truncating to ``max_length`` and padding batches with ``pad_id``."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DsmdError(f"{path}: missing; the export directory or bundle is incomplete, export again")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DsmdError(f"{path}: not a tokenizers file ({exc}); export the student again") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(int(text_spec["max_length"]))
    tokenizer.enable_padding(pad_id=int(text_spec["pad_id"]), pad_token=str(text_spec["pad_token"]))
    return tokenizer


def tokenize(tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """input_ids and attention_mask (int64, batch x longest), as the student's ``tokenize`` gives them."""
    if isinstance(texts, str) or not texts:
        raise DsmdError("tokenize: give a non-empty list of texts")
    encodings = tokenizer.encode_batch([str(t) for t in texts])
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def preprocess_images(images: Sequence[Any], image_spec: dict[str, Any]) -> np.ndarray:
    """PIL RGB images -> NCHW float32 pixels, the same as the student's eval transform (torchvision on PIL)."""
    from PIL import Image

    size = int(image_spec["size"])
    mean = np.asarray(image_spec["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(image_spec["std"], dtype=np.float32)[:, None, None]
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    for row, image in enumerate(images):
        if image.mode != "RGB":
            image = image.convert("RGB")
        resized = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
        batch[row] = (pixels - mean) / std
    return batch


class TextEncoder:
    """Caption -> L2-normalised embedding with the exported text encoder (float or int8 ONNX)."""

    def __init__(self, model_path: Path, tokenizer_path: Path, preprocess: dict[str, Any], threads: int = 0):
        self.spec = preprocess["text"]
        self.tokenizer = load_tokenizer(tokenizer_path, self.spec)
        self.session = make_session(model_path, threads)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return tokenize(self.tokenizer, texts)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.session.run(None, self.tokenize(texts))[0]


class ImageEncoder:
    """PIL images -> L2-normalised embeddings with the exported image encoder."""

    def __init__(self, model_path: Path, preprocess: dict[str, Any], threads: int = 0):
        self.spec = preprocess["image"]
        self.session = make_session(model_path, threads)

    def encode(self, images: Sequence[Any]) -> np.ndarray:
        return self.session.run(None, {"pixels": preprocess_images(images, self.spec)})[0]
