"""Every setting of every stage, typed, with its allowed range and its default.

The defaults ARE the built-in demo: params.yaml is exactly what `dsmd config --defaults` prints (a test keeps the
two equal). Where the demo departs from the paper's recipe (recipes/ hold the paper's settings), the comment at
the field says why; in short, the demo must run on a CPU in minutes and its students start from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pipeline.config.rules import Items, NonNegFloat, NonNegInt, Pattern, PosFloat, PosInt, Range, Seed

# Split names, teacher names: at least one, none twice.
Names = Annotated[list[str], Items(min=1, unique=True)]
Ks = Annotated[list[PosInt], Items(min=1, unique=True)]


@dataclass
class DataConfig:
    # Source of the dataset: a Karpathy split JSON, a CSV / JSONL / Parquet table (one row per caption), or a
    # directory of WebDataset / img2dataset .tar shards (images read inside the tars; pipeline/data/webdataset.py).
    source: str = "data/shapes/dataset_shapes.json"
    format: Literal["auto", "karpathy", "csv", "jsonl", "parquet", "webdataset"] = "auto"
    images_root: str = "data/shapes/images"
    name: str = "shapes"
    # Where the canonical representation (images.parquet, captions.parquet, dataset.json) is written.
    canonical_dir: str = "data/canonical"
    # Table column names (ignored for Karpathy JSON). For WebDataset, caption_column and split_column name the
    # fields of each sample's .json (the .txt member, when present, is the caption).
    image_column: str = "image"
    caption_column: str = "caption"
    image_id_column: str = "image_id"
    split_column: str = "split"
    # Split for table rows without one (no split column or a blank cell); empty = such rows are an error.
    default_split: Literal["", "train", "val", "test"] = ""
    # WebDataset samples without a split field (img2dataset writes none): the fractions sent to val and to test
    # by a hash of the key (stable across shard order), before default_split applies. Their sum must be < 1.
    hash_split_val: Annotated[float, Range(ge=0, lt=1)] = 0.0
    hash_split_test: Annotated[float, Range(ge=0, lt=1)] = 0.0


@dataclass
class DemoConfig:
    """The built-in "shapes world" dataset."""

    seed: Seed = 0
    out_dir: str = "data/shapes"
    # 500 training images, a twentieth of the teacher's pretraining corpus: the student's own data is scarce, as
    # Flickr30k's 29,000 images are next to BEiT-3's pretraining data. With 2,000 the student trained on its
    # captions alone already matched the teacher on validation (RSUM 324 against 321), leaving nothing to distil.
    n_train: PosInt = 500
    # 0 is allowed: distill then skips validation and keeps the last epoch's student.
    n_val: NonNegInt = 500
    n_test: NonNegInt = 1000
    # The renderer needs 16 pixels at least.
    image_size: Annotated[int, Range(ge=16)] = 64
    captions_per_image: PosInt = 5
    # The demo teacher's pretraining corpus: further scenes of the same world that no split holds, five times the
    # student's training images, so that the teacher knows more than the student can learn from its split alone
    # (as BEiT-3 was pretrained on far more than Flickr30k). 0 = no corpus: the teacher fits on the train split.
    n_pretrain: NonNegInt = 10000
    pretrain_dir: str = "data/pretrain"


@dataclass
class TeacherConfig:
    kind: Literal["beit3", "clip"] = "beit3"
    # The teacher's name in the feature store: each teacher of a run needs its own.
    name: str = "beit3"
    # Local paths only: nothing is ever downloaded.
    checkpoint: str = "data/teacher/demo_beit3.pth"
    # beit3: "base" | "large" | "giant" or a path to a JSON config (as the demo and the fixtures use).
    size: str = "data/teacher/demo_beit3.json"
    tokenizer: str = "data/teacher/demo_beit3.spm"
    # The official checkpoints see 384 px; the demo's images are 64 px.
    img_size: PosInt = 64
    max_text_len: PosInt = 64


def _demo_second_teacher() -> list[TeacherConfig]:
    # The demo's second teacher, fitted by the demo (demo_teacher.second) and mixed in by MCAD (distill.mcad).
    return [
        TeacherConfig(
            name="beit3_small",
            checkpoint="data/teacher/demo_beit3_small.pth",
            size="data/teacher/demo_beit3_small.json",
            tokenizer="data/teacher/demo_beit3_small.spm",
        )
    ]


@dataclass
class DemoSecondTeacherConfig:
    """The demo's second dual-stream teacher, for MCAD's teacher mix: fitted like the first on the same data,
    smaller and from another seed. It is written where the extra_teachers entry of the same name points; an
    empty name fits none."""

    name: str = "beit3_small"
    embed_dim: PosInt = 96
    layers: PosInt = 2
    heads: PosInt = 4
    ffn_dim: PosInt = 192
    seed: Seed = 1


@dataclass
class DemoTeacherConfig:
    """Fitting the small BEiT-3 that stands in for the official checkpoints in the demo."""

    out_dir: str = "data/teacher"
    # 5.1M parameters, 6x the demo student's 0.83M (the paper's BEiT-3 giant is ~10x its ViT-B + BERT-base
    # student), within the demo's CPU time budget. Three layers: at lr 1e-3 a five-layer one did not start
    # learning within the fit (the loss stayed at ln(batch)).
    embed_dim: PosInt = 256
    layers: PosInt = 3
    heads: PosInt = 4
    ffn_dim: PosInt = 1024
    # The sentencepiece trainer needs 8 pieces at least.
    vocab_size: Annotated[int, Range(ge=8)] = 400
    # Patch side in pixels: 16 as the official models; at the demo's 64 px that is a 4 x 4 grid.
    patch_size: PosInt = 16
    # An epoch is every corpus image once, with one of its captions drawn afresh.
    epochs: PosInt = 6
    batch_size: PosInt = 128
    lr: PosFloat = 5e-4
    seed: Seed = 0
    second: DemoSecondTeacherConfig = field(default_factory=DemoSecondTeacherConfig)


@dataclass
class ExtractConfig:
    store: str = "data/features.zarr"
    # The local path DVC tracks for the store (dvc.yaml's extract output and distill's and evaluate's dependency).
    # A local store: the store itself, so keep it equal to store. A store on S3, which DVC cannot cache: a local
    # .json file where `dsmd extract` records the store's URL, provenance and every shard's mark digest
    # (store/manifest.py), e.g. data/features.s3.json; see docs/s3_dvc.md.
    tracked: str = "data/features.zarr"
    backend: Literal["zarr", "hdf5"] = "zarr"
    dtype: Literal["float16", "float32"] = "float16"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    image_batch_size: PosInt = 64
    text_batch_size: PosInt = 256
    # 0 = images are loaded in the extracting process.
    loader_workers: NonNegInt = 2
    # Torch CPU threads per extraction process; 0 = its share of the cores minus its loader workers.
    cpu_threads: NonNegInt = 0
    # A shard is a whole number of chunks: rows_per_shard must be a multiple of rows_per_chunk.
    rows_per_shard: PosInt = 4096
    rows_per_chunk: PosInt = 256
    # Dask: 0 = no cluster (in-process); N > 0 = local cluster of N workers; or a scheduler address.
    dask_workers: NonNegInt = 0
    dask_scheduler: str = ""
    splits: Names = field(default_factory=lambda: ["train", "val", "test"])
    # Dataset reinforcement (MobileCLIP's DataCompDR): K augmented views per training image, their teacher rows
    # (<teacher>/image_view) and crop boxes (<teacher>/image_view_box) stored for distill.views to replay. 0 = none,
    # the plain features only. Views are crops only (no flips: captions say left and right, no colour change:
    # they name colours), each box drawn from (view_seed, image id, view) like RandomResizedCrop with an area of
    # view_min_scale..1 of the image and an aspect ratio of 3/4..4/3.
    views: NonNegInt = 0
    view_min_scale: Annotated[float, Range(gt=0, le=1)] = 0.4
    view_seed: Seed = 0
    # s3:// stores, and WebDataset shards in a bucket: where the stages keep the shards they download ("" =
    # ~/.cache/dsmd/store-cache, under $XDG_CACHE_HOME when set), and at most how many GiB of them, store and tar
    # shards together (least recently used go first). Local stores and shards are read in place and ignore both.
    cache_dir: str = ""
    cache_gb: PosFloat = 8.0


@dataclass
class StudentConfig:
    # timm architecture name (built with random weights unless vision_checkpoint is given). The demo's ViT-Tiny
    # starts from scratch (nothing to download); the paper's ViT-B/16 starts from ImageNet weights (recipes/).
    vision_model: str = "vit_tiny_patch16_224"
    vision_checkpoint: str = ""
    # Width, depth and heads of the ViT; 0 = the named model's own. The demo's student is a narrow, shallow
    # ViT-Tiny (96 wide, 4 blocks) so that the teacher has over 5x its parameters, as BEiT-3 has over the paper's
    # students. A vision_checkpoint must match the resulting shape.
    vision_width: NonNegInt = 96
    vision_depth: NonNegInt = 4
    vision_heads: NonNegInt = 3
    # img_size must be a multiple of patch_size. The demo: 16 px patches at 64 px, a 4 x 4 grid (patch 8 would be
    # four times the tokens, and CPU time); the paper: 16 px patches at 224 px.
    img_size: PosInt = 64
    patch_size: PosInt = 16
    # A local Hugging Face directory for the text encoder, or empty to build BERT from the sizes below
    # (text_hidden must then be a multiple of text_heads).
    text_model_dir: str = ""
    text_hidden: PosInt = 96
    text_layers: PosInt = 2
    text_heads: PosInt = 3
    text_vocab_size: NonNegInt = 0  # 0 = size of the tokenizer built for the demo
    max_text_len: PosInt = 32


@dataclass
class LossesConfig:
    cd: bool = True
    fd: bool = True
    sd: bool = True
    hnd: bool = True
    tau: PosFloat = 0.05
    # The paper's 8192 (its best, Table 8) would be most of an epoch here: the demo has 10,000 training pairs.
    queue_size: PosInt = 4096
    queue_mask_same_image: bool = True
    # The paper's margin is 0. Students trained from scratch (no ImageNet / BERT weights in the demo) stall with
    # margin 0 under the balancer, which scales the near-zero hinge loss up ~250x (README, validation RSUM 115
    # with margin 0 against 318 with 0.2 in the distill tests).
    margin: NonNegFloat = 0.2
    # "hardest" (paper), "hardest_sum" and "all_sum" (official code variants).
    hnd_mode: Literal["hardest", "hardest_sum", "all_sum"] = "hardest"


@dataclass
class BalancerConfig:
    enabled: bool = True
    temperature: PosFloat = 1.0
    # Update period for the rate term: "epoch" or a number of steps.
    period: Annotated[str, Pattern(r"epoch|[0-9]*[1-9][0-9]*", "'epoch' or a positive number of steps")] = "epoch"
    # "raw" (METHOD.md) or "scaled" (the official code's variant, where the rate term does nothing).
    rate_on: Literal["raw", "scaled"] = "raw"


@dataclass
class McadConfig:
    # Weight of the fused teacher's features in the modified features (any finite number).
    beta: float = 0.5
    temperature: PosFloat = 0.05
    # Store name of the single-stream teacher whose <name>/pair rows are fused (dsmd extract-pairs writes them
    # under teacher.name, so the two must agree); teachers: the dual-stream teachers, the first sets the
    # student's space (feature distillation) and must be distill.teacher, all of them the distributions,
    # averaged with teacher_weights (one per teacher, 0 or more, not all 0). The demo mixes its two teachers
    # equally.
    fused_teacher: str = "beit3"
    teachers: Names = field(default_factory=lambda: ["beit3", "beit3_small"])
    teacher_weights: Annotated[list[NonNegFloat], Items(min=1)] = field(default_factory=lambda: [0.5, 0.5])
    kl: bool = True
    fd: bool = True
    # Splits whose pairs dsmd extract-pairs encodes (the losses and the alignment fit use train only).
    pair_splits: Names = field(default_factory=lambda: ["train"])
    # Ridge of the least-squares alignment fit (0: plain least squares, min-norm when singular).
    align_ridge: NonNegFloat = 0.0
    # Also apply the DSMD losses enabled in distill.losses (on the first teacher's unmodified features).
    dsmd_losses: bool = False


@dataclass
class SupervisedConfig:
    # The student's output width. The baseline reads no teacher features, so nothing else fixes it; give the
    # distilled student's (distill.teacher's feature width) to compare like with like. The demo teacher's: 256.
    dim: PosInt = 256


@dataclass
class DistillConfig:
    # dsmd and mcad distil the teacher features in the store; supervised is the no-teacher baseline: the same
    # student, pairs and schedule trained on the captions with CLIP's InfoNCE (distill.supervised).
    method: Literal["dsmd", "mcad", "supervised"] = "dsmd"
    # The store name of the teacher whose features the student learns.
    teacher: str = "beit3"
    out_dir: str = "runs/distill"
    # The paper: 20 epochs (as the demo) at lr 1e-4, times 0.1 after epoch 10 (recipes/). The demo: 3e-4, times
    # 0.1 after epoch 16 (its 500 training images take ~6 s an epoch on a CPU); chosen on the validation split,
    # where the DSMD student still gained up to epoch 17 (RSUM 208 after 8 epochs, 221 after 17).
    epochs: PosInt = 20
    # The global batch (over all ranks); it must split evenly into grad_accum micro-batches.
    batch_size: PosInt = 64
    grad_accum: PosInt = 1
    lr: PosFloat = 3e-4
    weight_decay: NonNegFloat = 1e-4
    # Epochs after which the learning rate is multiplied by lr_gamma. Steps past `epochs` are allowed: a run
    # can be extended later (epochs is a run-time setting), and a step past the last epoch never happens.
    lr_step_epochs: list[PosInt] = field(default_factory=lambda: [16])
    lr_gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    loader_workers: NonNegInt = 2
    # Optimiser steps between checkpoints within an epoch; 0 = only at the end of each epoch.
    checkpoint_every: NonNegInt = 500
    # Also checkpoint when this many minutes passed since the last save (0 = off): a cadence that fits any run
    # length, so a kill loses at most this much work whatever the steps per epoch.
    checkpoint_minutes: NonNegFloat = 10.0
    seed: Seed = 0
    load_store_in_ram: bool = False
    # Stored teacher views (extract.views > 0): "replay" crops the student's image with the view's box and
    # distils the view's teacher row; "mismatch" (the ablation) crops the same way but distils the plain image's
    # row; "plain" ignores the views (the plain image and row, as without them). Validation is always plain.
    # (Not "off": DVC writes `dvc exp run -S` values back unquoted, and YAML 1.1 then reads off as false.)
    views: Literal["plain", "replay", "mismatch"] = "plain"
    # Which stored view an image uses in an epoch: "random" (drawn from distill.seed, epoch and image id) or
    # "cycle" (view (epoch + image id) mod K, so that every view comes round once in K epochs).
    view_order: Literal["random", "cycle"] = "random"
    # The order of pairs in an epoch (stages.distill.order): "shuffle" permutes all pairs, so every batch reads
    # rows from anywhere in the store: best while the store fits the page cache or extract.cache_gb. "blocks"
    # reads the store (and WebDataset tars) block by block: blocks of order_block_rows consecutive image ids
    # (0 = the store's rows_per_shard) in a random order, order_window blocks at a time mixed by a permutation of
    # their pairs, so the shard cache needs only a window's shards (billion-pair stores on S3).
    order: Literal["shuffle", "blocks"] = "shuffle"
    order_block_rows: NonNegInt = 0
    order_window: PosInt = 8
    tensorboard: bool = False
    # Validation after each epoch picks the student that is kept (best RSUM, the sum of Recall@K over val_ks in
    # both directions). The same values as evaluate.ks by default, but distill's own: DVC reruns distill when
    # they change, which it would not for evaluate's.
    val_ks: Ks = field(default_factory=lambda: [1, 5, 10])
    val_batch_size: PosInt = 256
    losses: LossesConfig = field(default_factory=LossesConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    mcad: McadConfig = field(default_factory=McadConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)


@dataclass
class EvaluateConfig:
    split: str = "test"
    out_dir: str = "runs/evaluate"
    ks: Ks = field(default_factory=lambda: [1, 5, 10])
    index: Literal["auto", "exact", "faiss"] = "auto"
    memory_budget_mb: PosInt = 2048
    batch_size: PosInt = 256
    device: str = "auto"
    # Example queries shown in the report.
    examples: NonNegInt = 4
    # The experiments table that the report shows (written by `dsmd experiments`, kept in git; a dependency of
    # the DVC evaluate stage, so it must exist there).
    ablations: str = "results/ablations.json"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # More dual-stream teachers that `dsmd extract` runs into the same store after `teacher` (MCAD mixes them:
    # distill.mcad.teachers names them). Each needs its own name. The demo has one, its second demo teacher;
    # DSMD ignores it.
    extra_teachers: list[TeacherConfig] = field(default_factory=_demo_second_teacher)
    demo_teacher: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
