"""The student: a ViT image encoder (timm) and a BERT-family text encoder (transformers), each CLS output ->
linear head to the teacher's dimension -> L2 normalisation (METHOD.md, "Setting").

Saved as a directory: ``model.safetensors`` (weights), ``card.json`` (everything needed to rebuild the
architecture, plus the caller's teacher name, store fingerprint and metrics) and ``tokenizer/``.
``load_student(dir)`` needs nothing else: no training code and not the original text_model_dir.

The text encoder's tokenizer is its own: the pretrained one from ``text_model_dir``, or for a BERT built from
the config sizes a WordPiece vocabulary of whole words plus single characters built from training captions by
``build_vocab`` (characters as "c" and "##c" so unseen words split into pieces instead of becoming [UNK]).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torchvision import transforms as T

from pipeline.config import StudentConfig
from pipeline.errors import ConfigError, DsmdError
from pipeline.retrieval.provenance import STUDENT_CARD_FILE, STUDENT_WEIGHTS_FILE

__all__ = [
    "Student",
    "SPECIAL_TOKENS",
    "build_vocab",
    "load_vocab_tokenizer",
    "make_tokenizer",
    "load_vision_checkpoint",
    "student_transform",
    "save_student",
    "load_student",
    "CARD_FORMAT",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CARD_FORMAT = "dsmd-student"
CARD_VERSION = 1
# Named where the torch-free provenance check (search, bundles) finds them too.
WEIGHTS_FILE = STUDENT_WEIGHTS_FILE
CARD_FILE = STUDENT_CARD_FILE
TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------------------------------
# Tokenizers.


def _bert_words(texts: Iterable[str]) -> Counter:
    """Words as BertTokenizerFast sees them (same normaliser and pre-tokeniser), counted."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        words = splitter.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(word for word, _ in words)
    return counts


def build_vocab(texts: Iterable[str], path: str | Path, min_count: int = 1, max_size: int | None = None) -> Path:
    """Write a BERT vocab.txt for ``texts``: special tokens, every character seen (as "c" and "##c"), then
    words seen at least ``min_count`` times, most frequent first (ties alphabetical), up to ``max_size`` lines.
    """
    counts = _bert_words(texts)
    if not counts:
        raise DsmdError(f"cannot build a vocabulary for {path}: the training captions contain no words")
    chars = sorted({c for word in counts for c in word})
    tokens = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    if max_size is not None and max_size < len(tokens):
        raise DsmdError(
            f"a vocabulary of {max_size} tokens cannot hold the {len(tokens)} special tokens and characters of "
            "the captions; raise student.text_vocab_size or set it to 0"
        )
    known = set(tokens)
    words = sorted((w for w, n in counts.items() if n >= min_count and w not in known), key=lambda w: (-counts[w], w))
    if max_size is not None:
        words = words[: max_size - len(tokens)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens + words) + "\n", encoding="utf-8")
    return path


def load_vocab_tokenizer(vocab_path: str | Path):
    """A lower-casing BertTokenizerFast for a vocab.txt (one token a line)."""
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise DsmdError(f"vocabulary file {vocab_path} does not exist; build it with build_vocab(texts, path)")
    lines = vocab_path.read_text(encoding="utf-8").splitlines()
    # transformers 5 takes the file as ``vocab`` and silently ignores ``vocab_file``; 4.x wants ``vocab_file``.
    params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
    key = "vocab" if "vocab" in params else "vocab_file"
    tokenizer = transformers.BertTokenizerFast(**{key: str(vocab_path)}, do_lower_case=True)
    if len(tokenizer) != len(lines):
        raise DsmdError(
            f"{vocab_path}: tokenizer holds {len(tokenizer)} tokens but the file has {len(lines)} lines "
            "(duplicate tokens?); rebuild it with build_vocab"
        )
    return tokenizer


def make_tokenizer(cfg: StudentConfig, vocab_dir: str | Path | None = None, texts: Iterable[str] | None = None):
    """The student's tokenizer: the pretrained text encoder's own, or one built from ``texts`` into
    ``vocab_dir/vocab.txt`` (capped at student.text_vocab_size when that is set)."""
    if cfg.text_model_dir:
        return _pretrained_tokenizer(Path(cfg.text_model_dir), "student.text_model_dir")
    if texts is None or vocab_dir is None:
        raise DsmdError(
            "student.text_model_dir is empty, so the student's vocabulary is built from the training captions; "
            "pass texts and vocab_dir to make_tokenizer"
        )
    max_size = cfg.text_vocab_size or None
    return load_vocab_tokenizer(build_vocab(texts, Path(vocab_dir) / "vocab.txt", max_size=max_size))


def _pretrained_tokenizer(directory: Path, what: str):
    if not directory.is_dir():
        raise DsmdError(f"{what}: {directory} is not a directory with a Hugging Face tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DsmdError(f"{what}: cannot load a tokenizer from {directory}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# Encoders.


def _create_vit(cfg: StudentConfig) -> nn.Module:
    if cfg.patch_size < 1 or cfg.img_size % cfg.patch_size:
        raise ConfigError(
            f"student.img_size ({cfg.img_size}) must be a multiple of student.patch_size ({cfg.patch_size})"
        )
    # Only the sizes that are set override the named model's; timm checks that width divides into the heads.
    sizes = {key: value for key, value in (("embed_dim", cfg.vision_width), ("depth", cfg.vision_depth),
                                          ("num_heads", cfg.vision_heads)) if value}
    try:
        return timm.create_model(
            cfg.vision_model, pretrained=False, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0,
            **sizes,
        )
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        # timm asserts that the width divides into the heads.
        raise ConfigError(
            f"student.vision_model: cannot build timm model {cfg.vision_model!r} with {sizes or 'its own sizes'}: "
            f"{exc} (check student.vision_width / vision_depth / vision_heads)"
        ) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints wrap the weights; take the innermost weight dict.
    for key in ("model", "state_dict", "module", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise DsmdError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_vision_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a local timm ViT checkpoint (safetensors, or .pth/.bin read with weights_only=True).

    The classifier head is dropped; position embeddings and the patch projection are resampled when the
    checkpoint was trained at another image or patch size.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    path = Path(path)
    if not path.is_file():
        raise DsmdError(f"student.vision_checkpoint: {path} does not exist")
    try:
        state = _read_state_dict(path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DsmdError(f"student.vision_checkpoint: cannot read {path}: {exc}") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and "patch_embed.proj.weight" in own and proj.shape != own["patch_embed.proj.weight"].shape:
        state["patch_embed.proj.weight"] = resample_patch_embed(
            proj, new_size=list(own["patch_embed.proj.weight"].shape[-2:])
        )
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise DsmdError(
            f"student.vision_checkpoint: {path} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {mismatched[:5]} "
            "(is it a checkpoint of student.vision_model?)"
        )
    model.load_state_dict(state)


def _drop_pooler(model: nn.Module) -> nn.Module:
    # The student uses the CLS token of the last layer; an unused pooler would also upset DDP (unused params).
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _create_text_encoder(cfg: StudentConfig, vocab_size: int, text_config: dict | None) -> nn.Module:
    if text_config is not None:
        # Rebuilding a saved student: the architecture comes from its card, the weights follow.
        options = {k: v for k, v in text_config.items() if k != "model_type"}
        config = transformers.AutoConfig.for_model(text_config["model_type"], **options)
        return _drop_pooler(transformers.AutoModel.from_config(config))
    if cfg.text_model_dir:
        directory = Path(cfg.text_model_dir)
        if not (directory / "config.json").is_file():
            raise DsmdError(f"student.text_model_dir: {directory} has no config.json of a Hugging Face model")
        try:
            model = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DsmdError(f"student.text_model_dir: cannot load a model from {directory}: {exc}") from None
        return _drop_pooler(model.float())
    if cfg.text_hidden % cfg.text_heads:
        raise ConfigError(
            f"student.text_hidden ({cfg.text_hidden}) must be a multiple of student.text_heads ({cfg.text_heads})"
        )
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        intermediate_size=4 * cfg.text_hidden,
        max_position_embeddings=cfg.max_text_len,
        pad_token_id=0,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


class Student(nn.Module):
    """Dual encoder distilled from the teacher; both outputs are L2-normalised float32 vectors of size ``dim``.

    ``tokenizer`` defaults to the one in student.text_model_dir; a BERT built from the config sizes needs the
    tokenizer made from the training captions (``make_tokenizer``). ``text_config`` (used by load_student)
    rebuilds the text encoder's architecture with fresh weights instead of reading text_model_dir.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        dim: int,
        tokenizer: Any | None = None,
        text_config: dict | None = None,
    ):
        super().__init__()
        if dim < 1:
            raise DsmdError(f"the student's output dimension must be positive (the teacher's), got {dim}")
        if tokenizer is None:
            if not cfg.text_model_dir:
                raise DsmdError(
                    "a student built from the config sizes needs its tokenizer: make_tokenizer(cfg, dir, texts)"
                )
            tokenizer = _pretrained_tokenizer(Path(cfg.text_model_dir), "student.text_model_dir")
        vocab_size = cfg.text_vocab_size or len(tokenizer)
        if not cfg.text_model_dir and text_config is None and vocab_size < len(tokenizer):
            raise ConfigError(
                f"student.text_vocab_size ({cfg.text_vocab_size}) is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens; set it to 0 to use the tokenizer's size"
            )
        self.cfg = cfg
        self.dim = dim
        self.tokenizer = tokenizer
        self.vision = _create_vit(cfg)
        if cfg.vision_checkpoint:
            load_vision_checkpoint(self.vision, cfg.vision_checkpoint)
        self.text = _create_text_encoder(cfg, vocab_size, text_config)
        max_positions = getattr(self.text.config, "max_position_embeddings", cfg.max_text_len)
        if cfg.max_text_len > max_positions:
            raise ConfigError(
                f"student.max_text_len ({cfg.max_text_len}) exceeds the text encoder's {max_positions} positions"
            )
        self.image_head = nn.Linear(self.vision.num_features, dim, bias=False)
        self.text_head = nn.Linear(self.text.config.hidden_size, dim, bias=False)
        data_cfg = getattr(self.vision, "pretrained_cfg", None) or {}
        self.image_mean = tuple(float(v) for v in data_cfg.get("mean", (0.5, 0.5, 0.5)))
        self.image_std = tuple(float(v) for v in data_cfg.get("std", (0.5, 0.5, 0.5)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # timm with num_classes=0 returns the pooled feature, the CLS token for ViTs (global_pool="token").
        return F.normalize(self.image_head(self.vision(pixels)).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_head(hidden[:, 0]).float(), dim=-1)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, padded to the longest text, truncated to student.max_text_len."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.cfg.max_text_len, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def image_transform(self, train: bool = False, augment: bool = False):
        return student_transform(self.cfg.img_size, self.image_mean, self.image_std, train, augment)

    def architecture(self) -> dict:
        """What load_student needs to rebuild this model (JSON-serialisable)."""
        return {
            "student": dataclasses.asdict(self.cfg),
            "dim": self.dim,
            "text_config": json.loads(self.text.config.to_json_string()),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "parameters": sum(p.numel() for p in self.parameters()),
        }


def student_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    augment: bool = False,
):
    """PIL RGB image -> normalised tensor. Eval (and train without augment): resize to img_size x img_size.

    The optional light augmentation crops 80-100% of the image; no flips, since captions name left and right.
    It is off by default: the teacher's targets were computed on the plain image.
    """
    interpolation = T.InterpolationMode.BICUBIC
    if train and augment:
        resize = T.RandomResizedCrop(img_size, scale=(0.8, 1.0), interpolation=interpolation)
    else:
        resize = T.Resize((img_size, img_size), interpolation=interpolation)
    return T.Compose([resize, T.ToTensor(), T.Normalize(list(mean), list(std))])


# ---------------------------------------------------------------------------------------------------------
# Saving and loading.


def save_student(student: Student, directory: str | Path, card: dict) -> Path:
    """Write model.safetensors, card.json (``card`` plus the architecture) and tokenizer/ into ``directory``.

    ``card`` carries what the caller knows: teacher name, store fingerprint, metrics; it must be JSON data.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = dict(card)
    full.update({"format": CARD_FORMAT, "version": CARD_VERSION, "architecture": student.architecture()})
    try:
        text = json.dumps(full, indent=2, sort_keys=True)
    except TypeError as exc:
        raise DsmdError(f"student card for {directory} is not JSON data: {exc}") from None
    weights = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    safetensors.torch.save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    student.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    (directory / CARD_FILE).write_text(text + "\n", encoding="utf-8")
    return directory


def read_card(directory: str | Path) -> dict:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise DsmdError(f"{directory} is not a saved student: {CARD_FILE} is missing")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DsmdError(f"{path}: not valid JSON: {exc}") from None
    if card.get("format") != CARD_FORMAT or "architecture" not in card:
        raise DsmdError(f"{path}: not a dsmd student card (format {card.get('format')!r})")
    if card.get("version", 0) > CARD_VERSION:
        raise DsmdError(f"{path}: card version {card['version']} is newer than this dsmd ({CARD_VERSION})")
    return card


def load_student(directory: str | Path, map_location: str | torch.device = "cpu") -> Student:
    """Rebuild a saved student from its card, weights and tokenizer alone; returned in eval mode."""
    directory = Path(directory)
    card = read_card(directory)
    arch = card["architecture"]
    fields = {f.name for f in dataclasses.fields(StudentConfig)}
    # Weights come from model.safetensors: no checkpoint or pretrained directory is read again.
    cfg = StudentConfig(**{k: v for k, v in arch["student"].items() if k in fields})
    cfg = dataclasses.replace(cfg, vision_checkpoint="")
    tokenizer = _pretrained_tokenizer(directory / TOKENIZER_DIR, f"{directory / CARD_FILE}")
    student = Student(cfg, int(arch["dim"]), tokenizer=tokenizer, text_config=arch["text_config"])
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise DsmdError(f"{directory}: {WEIGHTS_FILE} is missing")
    state = safetensors.torch.load_file(str(weights_path), device="cpu")
    try:
        student.load_state_dict(state)
    except RuntimeError as exc:
        raise DsmdError(f"{weights_path} does not match the architecture in {CARD_FILE}: {exc}") from None
    return student.to(map_location).eval()
