"""Small builders shared by the tests of pipeline/data: tiny images and source files written into tmp_path."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DataConfig


def write_png(path: Path, colour=(10, 120, 200), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def jpeg_bytes(size=(64, 64), seed=0) -> bytes:
    """A noisy JPEG: noise keeps the entropy-coded data long, so cutting it really loses pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def karpathy_entry(filename, split, captions, imgid=None, filepath=None) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions]}
    if imgid is not None:
        entry["imgid"] = imgid
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def write_karpathy(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"dataset": "test", "images": entries}))
    return path


def data_config(tmp_path: Path, source: Path, root: Path | None = None, **settings) -> DataConfig:
    return DataConfig(
        source=str(source),
        images_root=str(root if root is not None else tmp_path / "images"),
        canonical_dir=str(tmp_path / "canonical"),
        name="test",
        **settings,
    )


def small_images(root: Path, names: list[str]) -> None:
    for index, name in enumerate(names):
        write_png(root / name, colour=(index * 20 % 256, 50, 90))


def write_png_header(path: Path, width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels but whose data is empty: decoding it would fail,
    so a reason other than a decode failure shows that the file was judged from its header alone."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path
