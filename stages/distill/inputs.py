"""What the run trains and validates on: the dataset, the method's store reader and usable pairs, the student's
vocabulary, and the per-epoch training loader."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.console import console
from pipeline.data.bucket import local_shard_cache
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.pairs import usable_pairs
from pipeline.errors import DsmdError
from pipeline.models.student import load_vocab_tokenizer, make_tokenizer
from stages.distill.context import RunContext
from stages.distill.data import EpochBatches, PairRows, WindowPrefetch
from stages.distill.ddp import barrier
from stages.distill.methods import Method, method_for
from stages.distill.order import image_blocks


class Tokenize:
    """A picklable tokenise function for loader workers (the model itself stays in the main process)."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, texts: list[str]) -> dict:
        out = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


@dataclass
class TrainingData:
    ds: CanonicalDataset
    method: Method
    dim: int  # the student's output dimension
    train_pairs: np.ndarray  # caption ids
    val_images: np.ndarray
    val_captions: np.ndarray
    blocks: np.ndarray | None = None  # each training pair's block (distill.order blocks), else None


def load_training_data(ctx: RunContext) -> TrainingData:
    cfg, dc = ctx.cfg, ctx.cfg.distill
    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    # Shards in a bucket: whole through the local cache in blocks order (a window's tars at a time) or when they
    # all fit it; a full shuffle over more than that reads each image with a ranged GET instead.
    ds.use_shard_cache(local_shard_cache(cfg.extract.cache_dir, cfg.extract.cache_gb), in_order=dc.order == "blocks")
    # Loader workers open their own reader; the main process needs the rows only when it loads batches.
    method = method_for(cfg, ds, in_memory=dc.load_store_in_ram and dc.loader_workers == 0)
    dim = method.dim()
    image_valid, text_valid = method.valid()
    train_pairs = method.train_pairs(image_valid, text_valid)
    if len(train_pairs) < dc.batch_size:
        raise DsmdError(
            f"only {len(train_pairs)} usable training pairs, fewer than distill.batch_size "
            f"({dc.batch_size}); lower the batch size or check the dataset and store"
        )
    val_images = ds.image_ids("val")
    val_images = val_images[image_valid[val_images]]
    val_captions = usable_pairs(ds, "val", image_valid, text_valid)
    blocks = pair_blocks(ctx, ds, method, train_pairs)
    return TrainingData(ds, method, dim, train_pairs, val_images, val_captions, blocks)


def pair_blocks(ctx: RunContext, ds: CanonicalDataset, method: Method, train_pairs: np.ndarray) -> np.ndarray | None:
    """Each training pair's block of image ids for distill.order=blocks (stages.distill.order), else None."""
    dc = ctx.cfg.distill
    if dc.order == "shuffle":
        return None
    # A store shard of image rows by default; the no-teacher baseline reads no store, so extract's shard size.
    store_rows = method.reader.layout.rows_per_shard if method.reader is not None else ctx.cfg.extract.rows_per_shard
    block_rows = dc.order_block_rows or store_rows
    blocks = image_blocks(ds.caption_image_ids()[train_pairs], block_rows)
    if ctx.ranks.is_main:
        n_blocks = len(np.unique(blocks))
        console.print(f"order: blocks of {block_rows} image ids, {min(dc.order_window, n_blocks)} of {n_blocks} "
                      "at a time")
    return blocks


def student_tokenizer(ctx: RunContext, ds: CanonicalDataset):
    """The student's tokenizer. A vocabulary built from the captions is written by rank 0 alone; the other
    ranks read it once it is complete."""
    cfg = ctx.cfg
    vocab_dir = ctx.out / "vocab"
    tokenizer = None
    if cfg.student.text_model_dir or ctx.ranks.is_main:
        texts = None if cfg.student.text_model_dir else ds.texts(ds.caption_ids("train"))
        tokenizer = make_tokenizer(cfg.student, vocab_dir, texts=texts)
    barrier(ctx.ranks)
    return tokenizer if tokenizer is not None else load_vocab_tokenizer(vocab_dir / "vocab.txt")


def steps_per_epoch(ctx: RunContext, data: TrainingData) -> int:
    accum = ctx.cfg.distill.grad_accum
    return EpochBatches.batches_per_epoch(len(data.train_pairs), ctx.micro_batch, accum) // accum


def train_loader(ctx: RunContext, data: TrainingData, student, epoch: int, start_batch: int) -> DataLoader:
    """This rank's micro-batches of ``epoch`` from ``start_batch`` on, augmented and tokenised for ``student``."""
    dc = ctx.cfg.distill
    sampler = EpochBatches(
        len(data.train_pairs),
        ctx.micro_batch,
        seed=dc.seed,
        epoch=epoch,
        rank=ctx.ranks.rank,
        world=ctx.ranks.world,
        start_batch=start_batch,
        group=dc.grad_accum,
        blocks=data.blocks,
        window=dc.order_window,
        on_window=window_prefetch(ctx, data),
    )
    tokenize = Tokenize(student.tokenizer, ctx.cfg.student.max_text_len)
    collate = data.method.collate(tokenize, dc.loader_workers)
    return DataLoader(
        PairRows(data.ds, data.train_pairs, student.image_transform(train=True), views=data.method.view_plan(epoch)),
        batch_sampler=sampler,
        num_workers=dc.loader_workers,
        collate_fn=collate,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if dc.loader_workers > 0 else None,
        # Its own generator: creating the loader must not consume the global RNG a resumed run restores.
        generator=torch.Generator().manual_seed(dc.seed + epoch),
    )


def window_prefetch(ctx: RunContext, data: TrainingData) -> WindowPrefetch | None:
    """Background downloads of the next window's shards, for a store on S3 read in distill.order blocks. Not for
    the shuffle (every window is the whole store), a local store (mapped, nothing to download), nor rows loaded
    into RAM (distill.load_store_in_ram)."""
    reader = data.method.reader
    if data.blocks is None or reader is None or not reader.remote or ctx.cfg.distill.load_store_in_ram:
        return None
    return WindowPrefetch(reader, data.train_pairs, data.method.prefetch_rows,
                          behind=1 if ctx.cfg.distill.loader_workers > 0 else 0)
