"""Teachers: the models whose embeddings the extract stage stores and the students learn from.

A teacher turns PIL images (through `image_transform`) and caption texts (through `tokenize`) into L2-normalised
float32 embeddings on its device. `tokenize` pads every caption to the teacher's fixed maximum length so that
single captions collate by stacking; `encode_texts` drops the trailing columns that are padding in every row
before the forward pass (the result does not depend on them, the speed does).

Two implementations: `BEiT3Teacher` (our BEiT-3 with an official checkpoint; also gives the fused
image+caption feature MCAD needs) and `CLIPTeacher` (any CLIP-style dual encoder saved as a local Hugging Face
directory). `load_teacher(cfg.teacher, device, precision)` builds the one the config names.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import TeacherConfig
from pipeline.errors import DsmdError
from pipeline.models.beit3 import (
    BEiT3Config,
    BEiT3Retrieval,
    config_dict,
    load_beit3_weights,
    resolve_config,
)
from pipeline.models.beit3_tokenizer import BEiT3Tokenizer, file_sha256
from pipeline.models.transforms import beit3_image_transform, describe_beit3_transform, to_rgb

__all__ = [
    "Teacher",
    "BEiT3Teacher",
    "CLIPTeacher",
    "load_teacher",
    "resolve_device",
    "resolve_precision",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the first GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise DsmdError(f"device {device!r} is not a torch device ({exc})") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that has it, else fp32. Returns 'fp32' | 'bf16' | 'fp16'."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in _DTYPES:
        raise DsmdError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    return precision


def _trim_padding(ids: torch.Tensor, keep: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Length that drops the trailing columns where no row has a real token; `keep` is True on real tokens."""
    used = keep.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return length, ids[:, :length]


def _hash_files(files: Sequence[Path], root: Path) -> str:
    """One SHA-256 over several files: sha256 of 'relative name  sha256' lines, sorted by name."""
    lines = sorted(f"{p.relative_to(root).as_posix()}  {file_sha256(p)}" for p in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class Teacher(ABC):
    """What the extract stage needs from a teacher model."""

    name: str
    dim: int
    supports_pairs: bool = False
    device: torch.device
    precision: str
    # PIL image (any mode) -> float32 tensor (C, H, W); picklable (it runs in DataLoader workers).
    image_transform: Callable[[Image.Image], torch.Tensor]

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """Teacher name and config, checkpoint and tokenizer SHA-256, max text length, preprocessing, norm."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> dict of (N, max_len) tensors (fixed length, so single rows collate by stacking)."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) from image_transform -> (N, dim) float32, unit L2 norm, on self.device."""

    @abstractmethod
    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """tokenize() output -> (N, dim) float32, unit L2 norm, on self.device."""

    def encode_pairs(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fused feature of (image i, caption i) pairs -> (N, dim_pair) float32, unit norm."""
        raise DsmdError(f"teacher {self.name!r} has no fused image+caption feature (MCAD needs a BEiT-3 teacher)")

    def _autocast(self) -> contextlib.AbstractContextManager:
        # fp16 runs with float32 weights under autocast (pure fp16 weights overflow in deep models);
        # bf16 casts the weights once instead (half the memory, no per-call casts).
        if self.precision == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()


class BEiT3Teacher(Teacher):
    supports_pairs = True

    def __init__(
        self,
        model: BEiT3Retrieval,
        tokenizer: BEiT3Tokenizer,
        *,
        name: str = "beit3",
        size: str = "",
        checkpoint: str | Path = "",
        source_grid: int | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> None:
        cfg: BEiT3Config = model.cfg
        if tokenizer.vocab_size > cfg.vocab_size:
            raise DsmdError(
                f"{tokenizer.path}: the tokenizer emits ids up to {tokenizer.vocab_size - 1} but the BEiT-3 text "
                f"embedding has {cfg.vocab_size} rows: is this the .spm that belongs to the checkpoint?"
            )
        self.name = name
        self.dim = cfg.embed_dim
        self.cfg = cfg
        self.size = size
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.source_grid = source_grid if source_grid is not None else cfg.grid
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        model = model.eval().to(self.device)
        if self.precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model = model
        self.image_transform = beit3_image_transform(cfg.img_size, cfg.image_mean, cfg.image_std)
        self._checkpoint_sha256: str | None = None

    def provenance(self) -> dict[str, Any]:
        if self._checkpoint_sha256 is None and self.checkpoint is not None:
            self._checkpoint_sha256 = file_sha256(self.checkpoint)
        cfg = self.cfg
        return {
            "teacher": self.name,
            "kind": "beit3",
            "dim": self.dim,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "size": self.size,
            "config": config_dict(cfg),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "checkpoint_sha256": self._checkpoint_sha256,
            "tokenizer": str(self.tokenizer.path),
            "tokenizer_sha256": self.tokenizer.sha256(),
            "max_text_len": self.tokenizer.max_len,
            "image_size": cfg.img_size,
            "image_preprocessing": describe_beit3_transform(cfg.img_size, cfg.image_mean, cfg.image_std),
            "position_embeddings": (
                "as trained" if self.source_grid == cfg.grid else
                f"interpolated bicubic from {self.source_grid}x{self.source_grid} to {cfg.grid}x{cfg.grid} patches"
            ),
            "normalisation": "L2 on vision_head / language_head of the cls position; pair: L2 on the cls "
                             "hidden state of the joint image+caption sequence",
            "precision": self.precision,
        }

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts)

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        return pixels.to(self.device, dtype=dtype, non_blocking=True)

    def _text(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ids, pad = tokens["text_ids"], tokens["padding_mask"]
        except KeyError as exc:
            raise DsmdError(f"BEiT-3 tokens need 'text_ids' and 'padding_mask', got {sorted(tokens)}") from exc
        length, ids = _trim_padding(ids, pad == 0)
        return ids.to(self.device, non_blocking=True), pad[:, :length].to(self.device, non_blocking=True)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode_image(self._pixels(pixels))

    @torch.inference_mode()
    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, pad = self._text(tokens)
        with self._autocast():
            return self.model.encode_text(ids, pad)

    @torch.inference_mode()
    def encode_pairs(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, pad = self._text(tokens)
        if ids.shape[0] != pixels.shape[0]:
            raise DsmdError(
                f"encode_pairs needs one caption per image: {pixels.shape[0]} images, {ids.shape[0]} captions"
            )
        with self._autocast():
            return self.model.encode_pair(self._pixels(pixels), ids, pad)


class _ProcessorImageTransform:
    """A Hugging Face image processor as a PIL -> tensor transform (a class so that it pickles)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]


def _features(output: Any) -> torch.Tensor:
    # transformers 4 returns the projected tensor, transformers 5 an output object carrying it.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPTeacher(Teacher):
    """A CLIP-style dual encoder from a local Hugging Face directory (CLIPModel + tokenizer + image processor)."""

    _WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "config.json")
    _TOKENIZER_PATTERNS = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                           "special_tokens_map.json")

    def __init__(
        self,
        model_dir: str | Path,
        *,
        name: str = "clip",
        tokenizer_dir: str | Path | None = None,
        max_text_len: int = 77,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model_dir = Path(model_dir)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else self.model_dir
        for what, path in (("model", self.model_dir), ("tokenizer", self.tokenizer_dir)):
            if not path.is_dir():
                raise DsmdError(f"{path}: CLIP {what} directory not found (a local Hugging Face save_pretrained dir)")
        try:
            model = CLIPModel.from_pretrained(self.model_dir, local_files_only=True)
            self.hf_tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(self.model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DsmdError(f"{self.model_dir}: cannot load a CLIP model, tokenizer and image processor: "
                            f"{str(exc).splitlines()[0]}") from None
        self.name = name
        self.dim = int(model.config.projection_dim)
        self.max_text_len = min(max_text_len, int(model.config.text_config.max_position_embeddings))
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        model = model.eval().to(self.device)
        if self.precision == "bf16":
            model = model.to(torch.bfloat16)
        self.model = model
        self.image_transform = _ProcessorImageTransform(self.processor)
        self._hashes: dict[str, str] | None = None

    def _files(self, root: Path, patterns: Sequence[str]) -> list[Path]:
        return sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})

    def provenance(self) -> dict[str, Any]:
        if self._hashes is None:
            self._hashes = {
                "checkpoint": _hash_files(self._files(self.model_dir, self._WEIGHT_PATTERNS), self.model_dir),
                "tokenizer": _hash_files(self._files(self.tokenizer_dir, self._TOKENIZER_PATTERNS), self.tokenizer_dir),
            }
        proc = self.processor
        preprocessing = {
            key: getattr(proc, key, None)
            for key in ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                        "rescale_factor", "do_normalize", "image_mean", "image_std")
        }
        preprocessing["resample"] = str(preprocessing["resample"])
        return {
            "teacher": self.name,
            "kind": "clip",
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dim": self.dim,
            "config": self.model.config.to_dict(),
            "checkpoint": str(self.model_dir),
            "checkpoint_sha256": self._hashes["checkpoint"],
            "tokenizer": str(self.tokenizer_dir),
            "tokenizer_sha256": self._hashes["tokenizer"],
            "max_text_len": self.max_text_len,
            "image_preprocessing": "convert RGB; Hugging Face CLIPImageProcessor " + repr(preprocessing),
            "normalisation": "L2 on the projected image / text features",
            "precision": self.precision,
        }

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.hf_tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_text_len,
                                return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        with self._autocast():
            out = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype=dtype)))
        return F.normalize(out.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = tokens["attention_mask"]
        length, ids = _trim_padding(tokens["input_ids"], mask != 0)
        with self._autocast():
            out = _features(self.model.get_text_features(
                input_ids=ids.to(self.device), attention_mask=mask[:, :length].to(self.device)
            ))
        return F.normalize(out.float(), dim=-1)


def load_beit3_teacher(
    cfg: TeacherConfig, device: str | torch.device = "auto", precision: str = "auto"
) -> BEiT3Teacher:
    model_cfg = resolve_config(cfg.size, img_size=cfg.img_size, max_text_len=cfg.max_text_len)
    tokenizer = BEiT3Tokenizer(cfg.tokenizer, model_cfg.max_text_len)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    # Cast while loading: a bf16 run never holds the float32 weights (fp16 keeps them, for autocast).
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, source_grid = load_beit3_weights(cfg.checkpoint, model_cfg, dtype)
    return BEiT3Teacher(
        model, tokenizer, name=cfg.name, size=cfg.size, checkpoint=cfg.checkpoint,
        source_grid=source_grid, device=device, precision=precision,
    )


def load_teacher(cfg: TeacherConfig, device: str | torch.device = "auto", precision: str = "auto") -> Teacher:
    """The teacher `cfg` (the config's `teacher` section) describes, on `device` at `precision`."""
    if cfg.kind == "beit3":
        return load_beit3_teacher(cfg, device, precision)
    if cfg.kind == "clip":
        return CLIPTeacher(
            cfg.checkpoint, name=cfg.name, tokenizer_dir=cfg.tokenizer or None, max_text_len=cfg.max_text_len,
            device=device, precision=precision,
        )
    raise DsmdError(f"teacher.kind {cfg.kind!r} is not one of beit3, clip")

