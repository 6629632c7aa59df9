"""The demo's teacher: a small BEiT-3 fitted contrastively on the shapes-world training split, on CPU.

No official checkpoint can be downloaded here, so the demo stands one in: the same model code at a tiny size
(cfg.demo_teacher), trained from scratch with the symmetric InfoNCE loss on its retrieval heads, with a
sentencepiece model trained on the training captions. The result is written exactly as the official files are
({"model": state_dict} with the official keys, a JSON config, a .spm) at cfg.teacher.checkpoint / .size /
.tokenizer, so everything downstream loads it through the same path as a real BEiT-3.

Images are fed through the teacher's own evaluation transform without augmentation: flips would swap "left"
and "right" in the captions. Everything is seeded; with the same thread count the fit is repeatable.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
import torch
import torch.nn.functional as F

from pipeline.config import Config, DemoTeacherConfig, TeacherConfig
from pipeline.errors import DsmdError
from pipeline.models.beit3 import (
    NAMED_SIZES,
    BEiT3Config,
    BEiT3Retrieval,
    save_official_checkpoint,
    write_config_json,
)
from pipeline.models.beit3_tokenizer import BEiT3Tokenizer
from pipeline.models.transforms import beit3_image_transform

__all__ = [
    "DemoFitResult",
    "train_sentencepiece",
    "demo_model_config",
    "load_split_pixels",
    "fit_demo_teacher",
    "second_teacher_config",
    "encode_split",
    "write_fit_report",
]


@dataclass
class DemoFitResult:
    checkpoint: str
    config: str
    tokenizer: str
    vocab_pieces: int
    train_images: int
    train_captions: int
    steps: int
    seconds: float
    epoch_losses: list[float] = field(default_factory=list)
    # Training images left out (recorded bad by `dsmd data check`, or undecodable now): image id -> reason.
    skipped_images: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_sentencepiece(captions: list[str], vocab_size: int, path: Path) -> int:
    """Unigram sentencepiece model over the captions, written to `path`; returns its number of pieces.

    ids 0/1/2 are <unk>/<s>/</s> (sentencepiece's defaults), which is what the XLM-R id mapping expects.
    """
    if vocab_size < 8:
        raise DsmdError(f"demo_teacher.vocab_size must be at least 8, got {vocab_size}")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            hard_vocab_limit=False,  # a small corpus may not support the full size; take what it gives
            num_threads=1,  # repeatable
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise DsmdError(f"training the demo tokenizer failed: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_file=str(path)).GetPieceSize()


def demo_model_config(demo: DemoTeacherConfig, teacher: TeacherConfig, vocab_pieces: int) -> BEiT3Config:
    # XLM-R numbering: ids up to vocab_pieces, and one more row for <mask> as the official vocabularies have.
    return BEiT3Config(
        embed_dim=demo.embed_dim,
        heads=demo.heads,
        ffn_dim=demo.ffn_dim,
        layers=demo.layers,
        img_size=teacher.img_size,
        patch_size=demo.patch_size,
        vocab_size=vocab_pieces + 2,
        max_text_positions=teacher.max_text_len + 2,
        max_text_len=teacher.max_text_len,
    )


def load_split_pixels(
    dataset: Any, split: str, transform: Callable
) -> tuple[np.ndarray, torch.Tensor, dict[int, str]]:
    """(image ids, pixels (N, 3, S, S), skipped) of one split, through the teacher transform.

    Skipped, as every stage skips them: the images the last `dsmd data check` recorded as bad, and any that
    fail to decode now; ``skipped`` maps their ids to the reason.
    """
    from pipeline.data.check import load_bad_images
    from pipeline.data.images import load_or_skip

    split_ids = np.asarray(dataset.image_ids(split), dtype=np.int64)
    if len(split_ids) == 0:
        raise DsmdError(f"the canonical dataset has no {split!r} images")
    directory = getattr(dataset, "directory", None)
    known_bad = load_bad_images(directory) if directory is not None else {}
    kept, pixels, skipped = [], [], {}
    for image_id in split_ids.tolist():
        image, reason = load_or_skip(dataset.image_source, image_id, known_bad)
        if image is None:
            skipped[image_id] = reason
        else:
            kept.append(image_id)
            pixels.append(transform(image))
    if not kept:
        first = next(iter(skipped.items()))
        raise DsmdError(
            f"none of the {len(split_ids)} {split!r} images can be used (image {first[0]}: {first[1]}); "
            "run `dsmd data check` to list them all"
        )
    return np.asarray(kept, dtype=np.int64), torch.stack(pixels), skipped


def _captions_by_image(dataset: Any, split: str, image_ids: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Texts of the split's captions, and per image (in image_ids order) the indices of its captions."""
    caption_ids = np.asarray(dataset.caption_ids(split), dtype=np.int64)
    texts = dataset.texts(caption_ids)
    owner = np.asarray(dataset.caption_image_ids(), dtype=np.int64)[caption_ids]
    row_of = {int(image_id): row for row, image_id in enumerate(image_ids)}
    per_image: list[list[int]] = [[] for _ in image_ids]
    for index, image_id in enumerate(owner):
        if int(image_id) in row_of:
            per_image[row_of[int(image_id)]].append(index)
    return texts, [np.asarray(c, dtype=np.int64) for c in per_image]


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # Matrices decay; biases, norms, tokens, position tables and the temperature do not.
        matrix = param.ndim >= 2 and "embed_positions" not in name and "token" not in name
        (decay if matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_outputs(teacher: TeacherConfig) -> tuple[Path, Path, Path]:
    if teacher.kind != "beit3":
        raise DsmdError(f"the demo teacher is a BEiT-3: set teacher.kind to beit3 (got {teacher.kind!r})")
    if teacher.size in NAMED_SIZES:
        raise DsmdError(
            f"teacher.size is {teacher.size!r}; the demo teacher needs a JSON config path to write (e.g. "
            "data/teacher/demo_beit3.json)"
        )
    paths = (Path(teacher.checkpoint), Path(teacher.size), Path(teacher.tokenizer))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    return paths


def second_teacher_config(cfg: Config) -> Config | None:
    """The settings that fit the demo's second teacher (demo_teacher.second) as the first is fitted: its
    architecture and seed, written where the extra_teachers entry of its name points. None when there is none."""
    second = cfg.demo_teacher.second
    if not second.name:
        return None
    matches = [t for t in cfg.extra_teachers if t.name == second.name]
    if not matches:
        known = ", ".join(t.name for t in cfg.extra_teachers) or "none"
        raise DsmdError(
            f"demo_teacher.second.name is {second.name!r} but no extra_teachers entry has that name (known: "
            f"{known}); add one with the paths to write, or set demo_teacher.second.name to ''"
        )
    demo = replace(cfg.demo_teacher, embed_dim=second.embed_dim, layers=second.layers, heads=second.heads,
                   ffn_dim=second.ffn_dim, seed=second.seed)
    return replace(cfg, teacher=matches[0], demo_teacher=demo)


def fit_demo_teacher(
    cfg: Config,
    dataset: Any,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
) -> DemoFitResult:
    """Train the demo BEiT-3 on `dataset`'s train split (the pretraining corpus in the demo) and write it where
    cfg.teacher points.

    `on_step(step, total_steps, loss)` is called after every optimiser step (progress display).
    """
    demo, teacher = cfg.demo_teacher, cfg.teacher
    checkpoint_path, config_path, tokenizer_path = _check_outputs(teacher)
    started = time.perf_counter()
    torch.manual_seed(demo.seed)
    gen = torch.Generator().manual_seed(demo.seed)

    image_ids, pixels, skipped = load_split_pixels(dataset, "train", beit3_image_transform(teacher.img_size))
    texts, captions_of = _captions_by_image(dataset, "train", image_ids)
    keep = np.asarray([len(c) > 0 for c in captions_of])
    if not keep.any():
        raise DsmdError("no training image has a caption")
    pixels = pixels[torch.from_numpy(keep)]
    captions_of = [c for c, k in zip(captions_of, keep, strict=True) if k]

    vocab_pieces = train_sentencepiece(texts, demo.vocab_size, tokenizer_path)
    model_cfg = demo_model_config(demo, teacher, vocab_pieces)
    tokenizer = BEiT3Tokenizer(tokenizer_path, model_cfg.max_text_len)
    tokens = tokenizer(texts)
    text_ids, padding = tokens["text_ids"], tokens["padding_mask"]

    model = BEiT3Retrieval(model_cfg)
    model.init_weights(generator=gen)
    model.train()
    optimizer = torch.optim.AdamW(_parameter_groups(model, 0.05), lr=demo.lr, betas=(0.9, 0.98))

    # An epoch is every image once, each with one of its captions drawn afresh: a corpus of many images is
    # covered in a few epochs, every caption is seen over them, and no batch holds an image twice (so no
    # caption's positive is another's negative).
    n_images = len(captions_of)
    counts = torch.tensor([len(c) for c in captions_of])
    offsets = torch.cumsum(counts, 0) - counts
    caption_rows = torch.from_numpy(np.concatenate(captions_of))
    n = len(caption_rows)
    steps_per_epoch = math.ceil(n_images / demo.batch_size)
    total = demo.epochs * steps_per_epoch
    step = 0
    epoch_losses = []
    for _ in range(demo.epochs):
        order = torch.randperm(n_images, generator=gen)
        pick = (torch.rand(n_images, generator=gen) * counts).long()
        running = 0.0
        for start in range(0, n_images, demo.batch_size):
            images = order[start : start + demo.batch_size]
            chosen = caption_rows[offsets[images] + pick[images]]
            ids, pad = text_ids[chosen], padding[chosen]
            length = int((pad == 0).sum(1).max())
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, demo.lr)
            image_emb, text_emb, scale = model(pixels[images], ids[:, :length], pad[:, :length])
            logits = scale.clamp(max=100.0) * image_emb @ text_emb.T
            target = torch.arange(len(images))
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            running += value
            if on_step is not None:
                on_step(step, total, value)
        epoch_losses.append(running / steps_per_epoch)

    model.eval()
    save_official_checkpoint(model, checkpoint_path)
    write_config_json(model_cfg, config_path)
    return DemoFitResult(
        checkpoint=str(checkpoint_path),
        config=str(config_path),
        tokenizer=str(tokenizer_path),
        vocab_pieces=vocab_pieces,
        train_images=len(captions_of),
        train_captions=n,
        steps=step,
        seconds=time.perf_counter() - started,
        epoch_losses=epoch_losses,
        skipped_images=skipped,
    )


def encode_split(
    teacher: Any, dataset: Any, split: str, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """(image_emb, text_emb, caption_image, skipped) of one split with any Teacher; caption_image indexes
    image_emb. Skipped images (``load_split_pixels``) leave with their captions."""
    image_ids, pixels, skipped = load_split_pixels(dataset, split, teacher.image_transform)
    texts, captions_of = _captions_by_image(dataset, split, image_ids)
    caption_image = np.full(len(texts), -1, dtype=np.int64)
    for row, captions in enumerate(captions_of):
        caption_image[captions] = row
    kept = caption_image >= 0
    texts, caption_image = [t for t, k in zip(texts, kept, strict=True) if k], caption_image[kept]
    image_emb = torch.cat([teacher.encode_images(pixels[i : i + batch_size]).cpu()
                           for i in range(0, len(pixels), batch_size)])
    text_emb = torch.cat([teacher.encode_texts(teacher.tokenize(texts[i : i + batch_size])).cpu()
                          for i in range(0, len(texts), batch_size)])
    return image_emb.numpy(), text_emb.numpy(), caption_image, skipped


def write_fit_report(
    path: Path,
    result: DemoFitResult,
    metrics: dict[str, float],
    chance: dict[str, float],
    split: str = "test",
    skipped: dict[int, str] | None = None,
) -> None:
    """The fit and its scores on ``split``; ``skipped``: the images of ``split`` left out of the scores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"fit": result.to_dict(), "split": split, "recall": metrics, "chance": chance,
                "skipped_images": {str(k): v for k, v in (skipped or {}).items()}}
    path.write_text(json.dumps(document, indent=1) + "\n")
