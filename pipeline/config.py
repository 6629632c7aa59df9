"""The one typed configuration schema: params.yaml -> dataclasses, read once and passed down.

Every setting of every stage lives here, with the built-in demo as the default. Command-line overrides use
dotted keys (``--set distill.lr=3e-4``); the value is parsed as YAML and checked against the field's type, so
``distill.lr=abc`` or ``distill.lrr=1`` fail with the key named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "parse_override", "dump_config", "to_dict"]


@dataclass
class DataConfig:
    # Source of the dataset: a Karpathy split JSON or a CSV / JSONL / Parquet table (one row per caption).
    source: str = "data/shapes/dataset_shapes.json"
    format: Literal["auto", "karpathy", "csv", "jsonl", "parquet"] = "auto"
    images_root: str = "data/shapes/images"
    name: str = "shapes"
    # Where the canonical representation (images.parquet, captions.parquet, dataset.json) is written.
    canonical_dir: str = "data/canonical"
    # Table column names (ignored for Karpathy JSON).
    image_column: str = "image"
    caption_column: str = "caption"
    image_id_column: str = "image_id"
    split_column: str = "split"
    # Split for table rows without one (no split column or a blank cell); empty = such rows are an error.
    default_split: Literal["", "train", "val", "test"] = ""


@dataclass
class DemoConfig:
    """The built-in "shapes world" dataset."""

    seed: int = 0
    out_dir: str = "data/shapes"
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 1000
    image_size: int = 64
    captions_per_image: int = 5


@dataclass
class TeacherConfig:
    kind: Literal["beit3", "clip"] = "beit3"
    name: str = "beit3"
    # Local paths only: nothing is ever downloaded.
    checkpoint: str = "data/teacher/demo_beit3.pth"
    # beit3: "base" | "large" | "giant" or a path to a JSON config (as the fixtures use).
    size: str = "data/teacher/demo_beit3.json"
    tokenizer: str = "data/teacher/demo_beit3.spm"
    img_size: int = 64
    max_text_len: int = 64


@dataclass
class DemoSecondTeacherConfig:
    """The demo's second dual-stream teacher, for MCAD's teacher mix: fitted like the first on the same data,
    smaller and from another seed. It is written where the extra_teachers entry of the same name points; an
    empty name fits none."""

    name: str = ""
    embed_dim: int = 96
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 192
    seed: int = 1


@dataclass
class DemoTeacherConfig:
    """Fitting the small BEiT-3 that stands in for the official checkpoints in the demo."""

    out_dir: str = "data/teacher"
    embed_dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 256
    vocab_size: int = 400
    # Patch side in pixels: 16 as the official models; at the demo's 64 px that is a 4 x 4 grid.
    patch_size: int = 16
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    second: DemoSecondTeacherConfig = field(default_factory=DemoSecondTeacherConfig)


@dataclass
class ExtractConfig:
    store: str = "data/features.zarr"
    backend: Literal["zarr", "hdf5"] = "zarr"
    dtype: Literal["float16", "float32"] = "float16"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    image_batch_size: int = 64
    text_batch_size: int = 256
    loader_workers: int = 2
    # Torch CPU threads per extraction process; 0 = its share of the cores minus its loader workers.
    cpu_threads: int = 0
    rows_per_shard: int = 4096
    rows_per_chunk: int = 256
    # Dask: 0 = no cluster (in-process); N > 0 = local cluster of N workers; or a scheduler address.
    dask_workers: int = 0
    dask_scheduler: str = ""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])


@dataclass
class StudentConfig:
    # timm architecture name (built with random weights unless vision_checkpoint is given).
    vision_model: str = "vit_tiny_patch16_224"
    vision_checkpoint: str = ""
    img_size: int = 64
    patch_size: int = 8
    # A local Hugging Face directory for the text encoder, or empty to build BERT from the sizes below.
    text_model_dir: str = ""
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 3
    text_vocab_size: int = 0  # 0 = size of the tokenizer built for the demo
    max_text_len: int = 32


@dataclass
class LossesConfig:
    cd: bool = True
    fd: bool = True
    sd: bool = True
    hnd: bool = True
    tau: float = 0.05
    queue_size: int = 8192
    queue_mask_same_image: bool = True
    margin: float = 0.0
    # "hardest" (paper), "hardest_sum" and "all_sum" (official code variants).
    hnd_mode: Literal["hardest", "hardest_sum", "all_sum"] = "hardest"


@dataclass
class BalancerConfig:
    enabled: bool = True
    temperature: float = 1.0
    # Update period for the rate term: "epoch" or a number of steps.
    period: str = "epoch"
    # "raw" (METHOD.md) or "scaled" (the official code's variant, where the rate term does nothing).
    rate_on: Literal["raw", "scaled"] = "raw"


@dataclass
class McadConfig:
    beta: float = 0.5
    temperature: float = 0.05
    # Store name of the single-stream teacher whose <name>/pair rows are fused (dsmd extract-pairs writes them
    # under teacher.name, so the two must agree); teachers: the dual-stream teachers, the first sets the
    # student's space (feature distillation), all of them the distributions, averaged with teacher_weights.
    fused_teacher: str = "beit3"
    teachers: list[str] = field(default_factory=lambda: ["beit3"])
    teacher_weights: list[float] = field(default_factory=lambda: [1.0])
    kl: bool = True
    fd: bool = True
    # Splits whose pairs dsmd extract-pairs encodes (the losses and the alignment fit use train only).
    pair_splits: list[str] = field(default_factory=lambda: ["train"])
    # Ridge of the least-squares alignment fit (0: plain least squares, min-norm when singular).
    align_ridge: float = 0.0
    # Also apply the DSMD losses enabled in distill.losses (on the first teacher's unmodified features).
    dsmd_losses: bool = False


@dataclass
class DistillConfig:
    method: Literal["dsmd", "mcad"] = "dsmd"
    teacher: str = "beit3"
    out_dir: str = "runs/distill"
    epochs: int = 20
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_step_epochs: list[int] = field(default_factory=lambda: [10])
    lr_gamma: float = 0.1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    loader_workers: int = 2
    checkpoint_every: int = 500
    seed: int = 0
    load_store_in_ram: bool = False
    tensorboard: bool = False
    losses: LossesConfig = field(default_factory=LossesConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    mcad: McadConfig = field(default_factory=McadConfig)


@dataclass
class EvaluateConfig:
    split: str = "test"
    out_dir: str = "runs/evaluate"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    index: Literal["auto", "exact", "faiss"] = "auto"
    memory_budget_mb: int = 2048
    batch_size: int = 256
    device: str = "auto"
    examples: int = 4
    # The experiments table that the report shows (written by `dsmd experiments`, kept in git; a dependency of
    # the DVC evaluate stage, so it must exist there).
    ablations: str = "results/ablations.json"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # More dual-stream teachers that `dsmd extract` runs into the same store after `teacher` (MCAD mixes them:
    # distill.mcad.teachers names them). Each needs its own name.
    extra_teachers: list[TeacherConfig] = field(default_factory=list)
    demo_teacher: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return value converted to type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_value(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported setting type {tp}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown setting {where}{unknown[0]} (known in {prefix or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_value(key, value, hints[name])
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML (so 3e-4, true, [1, 5] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {exc}") from None
    # YAML reads 3e-4 as a string (it wants 3.0e-4); accept the usual float spellings.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.strip() != "" else value
        except ValueError:
            pass
    return key, value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (if it exists), apply overrides, and check every key and type."""
    tree: dict = {}
    if path is not None and Path(path).exists():
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
