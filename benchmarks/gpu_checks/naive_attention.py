"""The official implementation's arithmetic over our model's weights, for the speed comparison.

torchscale (which unilm's BEiT-3 uses) computes attention with three separate projections, q scaled by
head_dim^-0.5, an explicit bmm for q k^T, key padding filled with -inf, a float32 softmax cast back, and a second
bmm with v; its FFN applies GELU in float32 and casts back. `naive_attention(model)` swaps both in for every
layer of a BEiT3Retrieval while the context is open. The weights are the model's own (q, k and v are row
blocks of its fused matrix, no copy), so the timings differ by that arithmetic only, as in the reference
measurement of /work/shared/ANCHORS.md (torchscale as is against the same model with scaled_dot_product_attention).
benchmarks/extract_throughput.py has an image-only reference of the same arithmetic; this one also runs
captions (with their padding mask), which the acceptance run times too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.beit3 import BEiT3Retrieval, FeedForward, Multiway, SelfAttention


class NaiveSelfAttention(nn.Module):
    def __init__(self, ours: SelfAttention) -> None:
        super().__init__()
        self.ours = ours

    def _project(self, part: int, x: torch.Tensor, split: int) -> torch.Tensor:
        """Projection `part` (0 q, 1 k, 2 v) with each expert's rows of the fused matrix (a view, not a copy)."""
        fused: Multiway = self.ours.qkv_proj
        d = x.shape[-1]

        def expert(linear: nn.Linear, y: torch.Tensor) -> torch.Tensor:
            rows = slice(part * d, (part + 1) * d)
            return F.linear(y, linear.weight[rows], linear.bias[rows])

        if split == -1:
            return expert(fused.A, x)
        if split == 0:
            return expert(fused.B, x)
        return torch.cat([expert(fused.A, x[:, :split]), expert(fused.B, x[:, split:])], dim=1)

    def forward(self, x: torch.Tensor, split: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        heads = self.ours.heads
        head_dim = d // heads
        q = self._project(0, x, split) * head_dim**-0.5
        k = self._project(1, x, split)
        v = self._project(2, x, split)

        def by_head(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, heads, head_dim).transpose(1, 2).reshape(b * heads, n, head_dim)

        q, k, v = by_head(q), by_head(k), by_head(v)
        weights = torch.bmm(q, k.transpose(1, 2))
        if attn_mask is not None:  # (b, 1, 1, n), True where a key may be attended to
            weights = weights.view(b, heads, n, n).masked_fill(~attn_mask, float("-inf")).view(b * heads, n, n)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).type_as(weights)
        out = torch.bmm(weights, v).view(b, heads, n, head_dim).transpose(1, 2).reshape(b, n, d)
        return self.ours.out_proj(self.ours.inner_attn_ln(out, split), split)


class TorchscaleFeedForward(nn.Module):
    def __init__(self, ours: FeedForward) -> None:
        super().__init__()
        self.ours = ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.ours.fc1(x)
        hidden = F.gelu(hidden.float()).type_as(hidden)
        return self.ours.fc2(self.ours.ffn_layernorm(hidden))


@contextlib.contextmanager
def naive_attention(model: BEiT3Retrieval) -> Iterator[BEiT3Retrieval]:
    """`model` with torchscale's attention and FFN arithmetic in every layer until the context closes."""
    layers = list(model.beit3.encoder.layers)
    attentions = [layer.self_attn for layer in layers]
    ffns = [(layer.ffn.A, layer.ffn.B) for layer in layers]
    try:
        for layer, attention, (ffn_a, ffn_b) in zip(layers, attentions, ffns, strict=True):
            layer.self_attn = NaiveSelfAttention(attention)
            layer.ffn.A, layer.ffn.B = TorchscaleFeedForward(ffn_a), TorchscaleFeedForward(ffn_b)
        yield model
    finally:
        for layer, attention, (ffn_a, ffn_b) in zip(layers, attentions, ffns, strict=True):
            layer.self_attn = attention
            layer.ffn.A, layer.ffn.B = ffn_a, ffn_b
