"""BEiT-3 for retrieval: a multiway transformer that loads the official unilm checkpoints as they are.

Architecture (torchscale EncoderConfig as unilm sets it, see /work/shared/FORMATS.md): one shared
self-attention per layer whose projections, layer norms and FFN come in two experts, A (vision) and B
(language); pre-LayerNorm; "subln" (an extra LayerNorm before out_proj and before fc2); GELU; final LayerNorm;
eps 1e-5; learned positions that start at index 2 (a fairseq offset). Image-only input runs expert A
everywhere, text-only input expert B, and a joint image+text sequence runs A on the image positions and B on the
text positions (torchscale's multiway split position).

Differences from the reference implementation are for speed only: attention goes through
`F.scaled_dot_product_attention`, and the q/k/v projections of each expert are concatenated into one matrix at
load time (`qkv_proj`), split again by `official_state_dict` when saving, so files always keep the official key
layout.

Loading (`load_beit3_weights`) keeps host memory near one copy of the model: the file is memory mapped, the
model is built on the meta device and takes each tensor as a fresh copy in the run's dtype, and each source
tensor's pages are given back right after its copy (pipeline/models/mapped_file.py). A 2.1B-parameter giant
checkpoint (8.5 GB float32) no longer needs the file and the model in memory at once.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DsmdError
from pipeline.models.mapped_file import MappedFile

__all__ = [
    "NAMED_SIZES",
    "BEiT3Config",
    "BEiT3",
    "BEiT3Retrieval",
    "resolve_config",
    "read_config_json",
    "write_config_json",
    "read_checkpoint",
    "load_official_state_dict",
    "official_state_dict",
    "load_beit3",
    "load_beit3_weights",
    "beit3_from_state",
    "checkpoint_grid",
    "save_official_checkpoint",
    "interpolate_vision_positions",
]

# The sizes of the published (base, large) and paper-only (giant) models.
NAMED_SIZES: dict[str, dict[str, int]] = {
    "base": {"embed_dim": 768, "heads": 12, "ffn_dim": 3072, "layers": 12},
    "large": {"embed_dim": 1024, "heads": 16, "ffn_dim": 4096, "layers": 24},
    "giant": {"embed_dim": 1408, "heads": 16, "ffn_dim": 6144, "layers": 40},
}

# Positions start at 2 in every position table (fairseq); the vision table also has the cls row.
POSITION_OFFSET = 2


@dataclass(frozen=True)
class BEiT3Config:
    embed_dim: int
    heads: int
    ffn_dim: int
    layers: int
    img_size: int = 384
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    max_text_len: int = 64
    layernorm_eps: float = 1e-5
    image_mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    image_std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def __post_init__(self) -> None:
        problems = []
        if self.embed_dim % self.heads:
            problems.append(f"embed_dim {self.embed_dim} is not a multiple of heads {self.heads}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.max_text_len < 2:
            problems.append(f"max_text_len {self.max_text_len} leaves no room for <s> and </s>")
        if self.max_text_len + POSITION_OFFSET > self.max_text_positions:
            problems.append(
                f"max_text_len {self.max_text_len} needs {self.max_text_len + POSITION_OFFSET} text positions, "
                f"the table has {self.max_text_positions}"
            )
        if len(self.image_mean) != self.in_chans or len(self.image_std) != self.in_chans:
            problems.append("image_mean and image_std need one value per input channel")
        if problems:
            raise DsmdError("BEiT-3 config: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON layout the fixtures use (torchscale's names)."""
        return {
            "encoder_embed_dim": self.embed_dim,
            "encoder_attention_heads": self.heads,
            "encoder_ffn_embed_dim": self.ffn_dim,
            "encoder_layers": self.layers,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "vocab_size": self.vocab_size,
            "max_source_positions": self.max_text_positions,
            "max_text_len": self.max_text_len,
            "layernorm_eps": self.layernorm_eps,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resize": "bicubic, square, no crop",
        }


# JSON config key -> BEiT3Config field.
_JSON_FIELDS = {
    "encoder_embed_dim": "embed_dim",
    "encoder_attention_heads": "heads",
    "encoder_ffn_embed_dim": "ffn_dim",
    "encoder_layers": "layers",
    "img_size": "img_size",
    "patch_size": "patch_size",
    "in_chans": "in_chans",
    "vocab_size": "vocab_size",
    "max_source_positions": "max_text_positions",
    "max_text_len": "max_text_len",
    "layernorm_eps": "layernorm_eps",
    "image_mean": "image_mean",
    "image_std": "image_std",
}
_JSON_REQUIRED = ("encoder_embed_dim", "encoder_attention_heads", "encoder_ffn_embed_dim", "encoder_layers")
# Descriptive keys: written for people, checked against what the code does.
_JSON_DESCRIPTIVE = {"resize": "bicubic, square, no crop"}


def read_config_json(path: str | Path) -> BEiT3Config:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DsmdError(f"{path}: BEiT-3 config file not found (teacher.size is 'base', 'large', 'giant' "
                        "or a JSON config path)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DsmdError(f"{path}: cannot read BEiT-3 config: {exc}") from None
    if not isinstance(raw, dict):
        raise DsmdError(f"{path}: a BEiT-3 config must be a JSON object")
    unknown = sorted(set(raw) - set(_JSON_FIELDS) - set(_JSON_DESCRIPTIVE))
    if unknown:
        raise DsmdError(f"{path}: unknown BEiT-3 config key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(sorted([*_JSON_FIELDS, *_JSON_DESCRIPTIVE]))})")
    missing = [k for k in _JSON_REQUIRED if k not in raw]
    if missing:
        raise DsmdError(f"{path}: BEiT-3 config lacks {', '.join(missing)}")
    for key, expected in _JSON_DESCRIPTIVE.items():
        if key in raw and raw[key] != expected:
            raise DsmdError(f"{path}: {key}={raw[key]!r} is not supported (only {expected!r})")
    kwargs: dict[str, Any] = {}
    for key, name in _JSON_FIELDS.items():
        if key not in raw:
            continue
        value = raw[key]
        if name in ("image_mean", "image_std"):
            if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
                raise DsmdError(f"{path}: {key} must be a list of numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        elif name == "layernorm_eps":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise DsmdError(f"{path}: {key} must be a number, got {value!r}")
            value = float(value)
        elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DsmdError(f"{path}: {key} must be a positive integer, got {value!r}")
        kwargs[name] = value
    try:
        return BEiT3Config(**kwargs)
    except DsmdError as exc:
        raise DsmdError(f"{path}: {exc}") from None


def write_config_json(cfg: BEiT3Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_json_dict(), indent=1) + "\n")


def resolve_config(size: str, img_size: int | None = None, max_text_len: int | None = None) -> BEiT3Config:
    """'base' | 'large' | 'giant' or a JSON config path; img_size / max_text_len override the file's."""
    if size in NAMED_SIZES:
        cfg = BEiT3Config(**NAMED_SIZES[size])
    else:
        cfg = read_config_json(size)
    changes = {}
    if img_size is not None:
        changes["img_size"] = img_size
    if max_text_len is not None:
        changes["max_text_len"] = max_text_len
    return replace(cfg, **changes) if changes else cfg


# ----------------------------------------------------------------------------------------------- modules


class Multiway(nn.Module):
    """Two experts: A for positions before `split`, B from `split` on (split -1: all A, 0: all B)."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.A = a
        self.B = b

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        if split == -1:
            return self.A(x)
        if split == 0:
            return self.B(x)
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)  # subln
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class SelfAttention(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        d, eps = cfg.embed_dim, cfg.layernorm_eps
        self.heads = cfg.heads
        # q, k and v of one expert in one matrix (rows q, then k, then v): one GEMM instead of three.
        self.qkv_proj = Multiway(nn.Linear(d, 3 * d), nn.Linear(d, 3 * d))
        self.inner_attn_ln = Multiway(nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps))  # subln
        self.out_proj = Multiway(nn.Linear(d, d), nn.Linear(d, d))

    def forward(self, x: torch.Tensor, split: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv_proj(x, split).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(self.inner_attn_ln(out, split), split)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        d, eps = cfg.embed_dim, cfg.layernorm_eps
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = Multiway(nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps))
        self.ffn = Multiway(FeedForward(d, cfg.ffn_dim, eps), FeedForward(d, cfg.ffn_dim, eps))
        self.final_layer_norm = Multiway(nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps))

    def forward(self, x: torch.Tensor, split: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split, attn_mask)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class Encoder(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.embed_positions = Multiway(
            nn.Embedding(cfg.num_patches + 1 + POSITION_OFFSET, d),
            nn.Embedding(cfg.max_text_positions, d),
        )
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.layer_norm = Multiway(nn.LayerNorm(d, eps=cfg.layernorm_eps), nn.LayerNorm(d, eps=cfg.layernorm_eps))

    def positions(self, length: int, split: int) -> torch.Tensor:
        """Position rows for a sequence of `length`; each expert's segment counts from POSITION_OFFSET."""
        table_a, table_b = self.embed_positions.A.weight, self.embed_positions.B.weight
        if split == -1:
            return table_a[POSITION_OFFSET : POSITION_OFFSET + length]
        if split == 0:
            return table_b[POSITION_OFFSET : POSITION_OFFSET + length]
        return torch.cat([
            table_a[POSITION_OFFSET : POSITION_OFFSET + split],
            table_b[POSITION_OFFSET : POSITION_OFFSET + length - split],
        ])

    def forward(self, x: torch.Tensor, split: int, padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.positions(x.shape[1], split).to(x.dtype)
        attn_mask = None
        if padding_mask is not None:
            pad = padding_mask.to(device=x.device, dtype=torch.bool)
            # As the reference: padded positions are zeroed, and masked out as keys (True = may attend).
            x = x * (~pad).unsqueeze(-1).to(x.dtype)
            attn_mask = (~pad)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, split, attn_mask)
        return self.layer_norm(x, split)


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Kept only so that checkpoints round-trip: masked image modelling is not used for retrieval.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[-2:] != (self.img_size, self.img_size):
            raise DsmdError(
                f"BEiT-3 expects images of shape (N, C, {self.img_size}, {self.img_size}), got {tuple(pixels.shape)}"
            )
        x = self.proj(pixels.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


class BEiT3(nn.Module):
    """The backbone (`beit3.*` in the checkpoints). Returns the hidden states after the final LayerNorm."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)

    def forward(
        self,
        pixels: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if pixels is None and text_ids is None:
            raise ValueError("BEiT-3 needs pixels, text_ids or both")
        if text_ids is not None:
            limit = self.cfg.max_text_positions - POSITION_OFFSET
            if text_ids.shape[1] > limit:
                raise DsmdError(f"text of {text_ids.shape[1]} tokens is longer than the {limit} BEiT-3 positions")
        if text_ids is None:
            return self.encoder(self.vision_embed(pixels), -1, None)
        text = self.text_embed(text_ids)
        if pixels is None:
            return self.encoder(text, 0, padding_mask)
        image = self.vision_embed(pixels)
        x = torch.cat([image, text.to(image.dtype)], dim=1)
        if padding_mask is not None:
            image_part = torch.zeros(image.shape[:2], dtype=torch.bool, device=image.device)
            padding_mask = torch.cat([image_part, padding_mask.to(device=image.device, dtype=torch.bool)], dim=1)
        return self.encoder(x, image.shape[1], padding_mask)


class BEiT3Retrieval(nn.Module):
    """BEiT3ForRetrieval: the backbone plus the two retrieval heads and the contrastive temperature."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.beit3 = BEiT3(cfg)
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.vision_head(self.beit3(pixels=pixels)[:, 0])
        return F.normalize(out.float(), dim=-1) if normalize else out

    def encode_text(
        self, text_ids: torch.Tensor, padding_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        out = self.language_head(self.beit3(text_ids=text_ids, padding_mask=padding_mask)[:, 0])
        return F.normalize(out.float(), dim=-1) if normalize else out

    def encode_pair(
        self,
        pixels: torch.Tensor,
        text_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """The fused feature: the first (cls) position of the joint image+caption sequence, no head."""
        out = self.beit3(pixels=pixels, text_ids=text_ids, padding_mask=padding_mask)[:, 0]
        return F.normalize(out.float(), dim=-1) if normalize else out

    def forward(
        self, pixels: torch.Tensor, text_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(text_ids, padding_mask), self.logit_scale.exp()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training from scratch (truncated normal, std 0.02, as BEiT does)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        vision_embed = self.beit3.vision_embed
        nn.init.trunc_normal_(vision_embed.cls_token, std=0.02, a=-0.04, b=0.04, generator=generator)
        nn.init.trunc_normal_(vision_embed.mask_token, std=0.02, a=-0.04, b=0.04, generator=generator)
        self.logit_scale.fill_(math.log(1 / 0.07))


# ------------------------------------------------------------------------------- official checkpoint layout

_QKV = re.compile(r"^(beit3\.encoder\.layers\.\d+\.self_attn\.)qkv_proj\.([AB])\.(weight|bias)$")
_SPLIT = re.compile(r"^(beit3\.encoder\.layers\.\d+\.self_attn\.)([qkv])_proj\.([AB])\.(weight|bias)$")
VISION_POSITIONS = "beit3.encoder.embed_positions.A.weight"


def official_state_dict(model: BEiT3Retrieval) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names (q/k/v split again), ready for torch.save."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        match = _QKV.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, expert, kind = match.groups()
        for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
            out[f"{prefix}{name}_proj.{expert}.{kind}"] = part.clone()
    return out


def _official_shapes(model: BEiT3Retrieval) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}
    for key, value in model.state_dict().items():
        match = _QKV.match(key)
        if match is None:
            shapes[key] = value.shape
            continue
        prefix, expert, kind = match.groups()
        for name in "qkv":
            shapes[f"{prefix}{name}_proj.{expert}.{kind}"] = torch.Size([value.shape[0] // 3, *value.shape[1:]])
    return shapes


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def interpolate_vision_positions(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize the patch rows of the vision position table to grid x grid (bicubic on the 2-D grid).

    The first 3 rows (2 offset rows and the cls row) stay as they are.
    """
    extra = POSITION_OFFSET + 1
    old = round(math.sqrt(weight.shape[0] - extra))
    if old * old != weight.shape[0] - extra:
        raise DsmdError(
            f"{VISION_POSITIONS} has {weight.shape[0]} rows, which is not {extra} + a square number of patches"
        )
    if old == grid:
        return weight
    dim = weight.shape[1]
    patches = weight[extra:].float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, dim).to(weight.dtype)
    return torch.cat([weight[:extra], patches], dim=0)


def _internal_state(
    model: BEiT3Retrieval,
    state: dict[str, torch.Tensor],
    source: str,
    dtype: torch.dtype | None = None,
    release: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Official-layout weights checked key by key and shape by shape, turned into the model's own keys.

    With `dtype`, every tensor is copied into fresh memory of that dtype and `release` (if any) is called on each
    source tensor right after its copy, so that a memory-mapped checkpoint never has to be resident in full
    next to the model. Without it the tensors pass through (q/k/v are concatenated either way).
    """
    shapes = _official_shapes(model)
    missing = sorted(set(shapes) - set(state))
    unknown = sorted(set(state) - set(shapes))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_listing(missing)}")
        if unknown:
            parts.append(f"unexpected key(s) {_listing(unknown)}")
        layers = {int(m.group(1)) for k in state if (m := re.match(r"beit3\.encoder\.layers\.(\d+)\.", k))}
        if layers and max(layers) + 1 != model.cfg.layers:
            parts.append(f"the checkpoint has {max(layers) + 1} layers, the config {model.cfg.layers}")
        raise DsmdError(
            f"{source}: not a BEiT-3 retrieval checkpoint in the official layout: " + "; ".join(parts)
            + ". Use a *_retrieval.pth or *_itc_*.pth file from unilm/beit3 with the matching teacher.size."
        )
    state = dict(state)
    if state[VISION_POSITIONS].ndim == 2:
        state[VISION_POSITIONS] = interpolate_vision_positions(state[VISION_POSITIONS], model.cfg.grid)
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(shape)})"
        for key, shape in shapes.items()
        if state[key].shape != shape
    ]
    if wrong:
        raise DsmdError(
            f"{source}: tensor shapes do not match the configured BEiT-3 size "
            f"(embed_dim {model.cfg.embed_dim}, ffn {model.cfg.ffn_dim}, vocab {model.cfg.vocab_size}): "
            + _listing(wrong, 6) + ". Is teacher.size right for this checkpoint?"
        )

    def done(*sources: torch.Tensor) -> None:
        if release is not None:
            for tensor in sources:
                release(tensor)

    internal: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key in list(state):
        match = _SPLIT.match(key)
        if match is not None:
            prefix, name, expert, kind = match.groups()
            pending.setdefault((prefix, expert, kind), {})[name] = state.pop(key)
            continue
        value = state.pop(key)
        if dtype is not None:
            value_copy = torch.empty(value.shape, dtype=dtype)
            value_copy.copy_(value)
            done(value)
            value = value_copy
        internal[key] = value
    for (prefix, expert, kind), parts in pending.items():
        q, k, v = parts["q"], parts["k"], parts["v"]
        if dtype is None:
            fused = torch.cat([q, k, v], dim=0)
        else:
            # Written part by part into the fused matrix: no float32 intermediate of the whole.
            fused = torch.empty((q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:]), dtype=dtype)
            for part, rows in zip((q, k, v), fused.split([q.shape[0], k.shape[0], v.shape[0]]), strict=True):
                rows.copy_(part)
            done(q, k, v)
        internal[f"{prefix}qkv_proj.{expert}.{kind}"] = fused
    return internal


def load_official_state_dict(model: BEiT3Retrieval, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load official-layout weights into `model` (copied into its tensors), checking every key and shape first.

    The vision position table is interpolated to the model's image size when the checkpoint was made for
    another one. Raises DsmdError naming missing, unexpected or mis-shaped keys.
    """
    model.load_state_dict(_internal_state(model, state, source), strict=True)


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state_dict from {"model": sd}, {"module": sd} or a bare sd, loaded with weights_only=True.

    mmap: map the file instead of reading it (tensors are paged in when used); files in torch's legacy
    (non-zip) format cannot be mapped and are read as before.
    """
    path = Path(path)
    if not path.is_file():
        raise DsmdError(f"{path}: BEiT-3 checkpoint not found (download it yourself and set teacher.checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # unpickling errors come in many types
        raise DsmdError(
            f"{path}: cannot load as a weights-only torch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Only plain tensors are accepted."
        ) from None
    if isinstance(obj, dict):
        for wrapper in ("model", "module"):
            if wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DsmdError(f"{path}: expected a state_dict of tensors (optionally under 'model' or 'module')")
    return obj


def checkpoint_grid(state: dict[str, torch.Tensor]) -> int | None:
    """The patch grid side the checkpoint's vision positions were trained for (None if not readable)."""
    weight = state.get(VISION_POSITIONS)
    if weight is None or weight.ndim != 2:
        return None
    patches = weight.shape[0] - POSITION_OFFSET - 1
    grid = round(math.sqrt(max(patches, 0)))
    return grid if grid * grid == patches else None


def beit3_from_state(
    state: dict[str, torch.Tensor],
    cfg: BEiT3Config,
    source: str = "checkpoint",
    *,
    dtype: torch.dtype = torch.float32,
    release: Callable[[torch.Tensor], None] | None = None,
) -> BEiT3Retrieval:
    """Build the model for `cfg` from official-layout weights (CPU, eval mode, parameters in `dtype`).

    The model is made on the meta device and takes fresh `dtype` copies of the weights as its own
    (load_state_dict(assign=True)): nothing is allocated twice. `release` is called on each source tensor once
    it is copied (MappedFile.release gives a memory-mapped file's pages back).
    """
    with torch.device("meta"):
        model = BEiT3Retrieval(cfg)
    model.load_state_dict(_internal_state(model, state, source, dtype=dtype, release=release), strict=True,
                          assign=True)
    left = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if left:  # strict=True covers the state_dict; this guards a buffer kept out of it
        raise DsmdError(f"{source}: BEiT-3 tensors left without weights: {_listing(left)}")
    return model.eval()


def load_beit3_weights(
    checkpoint: str | Path, cfg: BEiT3Config, dtype: torch.dtype = torch.float32
) -> tuple[BEiT3Retrieval, int | None]:
    """The model for `cfg` with an official checkpoint file's weights in `dtype`, and the patch grid the file
    was trained for (None if unreadable).

    Host memory peaks near one copy of the model in `dtype`, not the file plus the model: the file is memory
    mapped, each tensor is copied (and cast) into the model and its pages are given back at once.
    """
    state = read_checkpoint(checkpoint, mmap=True)
    pages = MappedFile(checkpoint)
    grid = checkpoint_grid(state)
    model = beit3_from_state(state, cfg, source=str(checkpoint), dtype=dtype, release=pages.release)
    return model, grid


def load_beit3(checkpoint: str | Path, cfg: BEiT3Config, dtype: torch.dtype = torch.float32) -> BEiT3Retrieval:
    """Build the model for `cfg` and load an official checkpoint file into it (CPU, eval mode, `dtype`)."""
    return load_beit3_weights(checkpoint, cfg, dtype)[0]


def save_official_checkpoint(model: BEiT3Retrieval, path: str | Path) -> None:
    """Save as the official files are: {"model": state_dict} with the official key names."""
    state = {k: v.detach().cpu().contiguous() for k, v in official_state_dict(model).items()}
    torch.save({"model": state}, Path(path))


def config_dict(cfg: BEiT3Config) -> dict[str, Any]:
    """Plain dict of the config (for provenance)."""
    out = asdict(cfg)
    out["image_mean"] = list(cfg.image_mean)
    out["image_std"] = list(cfg.image_std)
    return out
