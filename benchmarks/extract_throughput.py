"""Teacher forward throughput: our BEiT-3 against a naive reference with the same weights, side by side.

The reference is written here the way the official torchscale code computes: separate q/k/v projections,
explicit softmax(QK^T)V with the softmax in float32, the multiway split as slicing + concatenation. Ours uses
scaled_dot_product_attention and a fused qkv matrix. Both run on random weights and random inputs; the outputs
are compared as well (max |difference| of the normalised embeddings).

    python benchmarks/extract_throughput.py                 # CPU, small config
    python benchmarks/extract_throughput.py --device cuda   # also BEiT-3 giant, 384 px, bf16, batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models.beit3 import BEiT3Config, BEiT3Retrieval, official_state_dict, resolve_config  # noqa: E402


class NaiveBEiT3:
    """Image-only BEiT-3 retrieval forward, straight from official-layout weights (expert A everywhere)."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: BEiT3Config) -> None:
        self.sd, self.cfg = state, cfg

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.sd[name + ".weight"], self.sd[name + ".bias"],
                            self.cfg.layernorm_eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        sd, cfg = self.sd, self.cfg
        x = F.conv2d(pixels, sd["beit3.vision_embed.proj.weight"], sd["beit3.vision_embed.proj.bias"],
                     stride=cfg.patch_size).flatten(2).transpose(1, 2)
        x = torch.cat([sd["beit3.vision_embed.cls_token"].expand(len(x), -1, -1), x], dim=1)
        x = x + sd["beit3.encoder.embed_positions.A.weight"][2 : 2 + x.shape[1]]
        b, n, d = x.shape
        h, hd = cfg.heads, d // cfg.heads
        for i in range(cfg.layers):
            p = f"beit3.encoder.layers.{i}."
            y = self._ln(x, p + "self_attn_layer_norm.A")
            q = self._linear(y, p + "self_attn.q_proj.A").view(b, n, h, hd).transpose(1, 2) * hd**-0.5
            k = self._linear(y, p + "self_attn.k_proj.A").view(b, n, h, hd).transpose(1, 2)
            v = self._linear(y, p + "self_attn.v_proj.A").view(b, n, h, hd).transpose(1, 2)
            attn = F.softmax(q @ k.transpose(-1, -2), dim=-1, dtype=torch.float32).type_as(q)
            y = (attn @ v).transpose(1, 2).reshape(b, n, d)
            y = self._linear(self._ln(y, p + "self_attn.inner_attn_ln.A"), p + "self_attn.out_proj.A")
            x = x + y
            y = self._linear(self._ln(x, p + "final_layer_norm.A"), p + "ffn.A.fc1")
            y = F.gelu(y.float()).type_as(y)
            x = x + self._linear(self._ln(y, p + "ffn.A.ffn_layernorm"), p + "ffn.A.fc2")
        cls = self._ln(x[:, 0], "beit3.encoder.layer_norm.A")
        return F.normalize(F.linear(cls, sd["vision_head.weight"]).float(), dim=-1)


def forward_flops(cfg: BEiT3Config) -> float:
    """Multiply-adds x 2 of one image's forward (matrix products only)."""
    n, d, f = cfg.num_patches + 1, cfg.embed_dim, cfg.ffn_dim
    per_layer = 2 * n * (4 * d * d + 2 * d * f) + 2 * 2 * n * n * d
    return cfg.layers * per_layer


def time_pair(fn_a, fn_b, pixels: torch.Tensor, repeats: int, warmup: int, device: torch.device):
    """(median, best) seconds per call of two functions, timed alternately so that load hits both alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for _ in range(warmup):
            fn_a(pixels)
            fn_b(pixels)
        sync()
        for _ in range(repeats):
            for fn, bucket in ((fn_a, times[0]), (fn_b, times[1])):
                start = time.perf_counter()
                fn(pixels)
                sync()
                bucket.append(time.perf_counter() - start)
    return [(statistics.median(t), min(t)) for t in times]


def compare(cfg: BEiT3Config, batch: int, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int,
            label: str) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = BEiT3Retrieval(cfg)
    model = model.to(dtype).eval()
    naive = NaiveBEiT3(official_state_dict(model), cfg)
    pixels = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    with torch.inference_mode():
        diff = float((model.encode_image(pixels) - naive.encode_image(pixels)).abs().max())
    (ours, ours_best), (ref, ref_best) = time_pair(
        model.encode_image, naive.encode_image, pixels, repeats, warmup, device
    )
    flops = forward_flops(cfg) * batch
    row = {
        "what": label,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "naive_img_per_s": batch / ref,
        "ours_img_per_s": batch / ours,
        "speedup": ref / ours,
        "speedup_best": ref_best / ours_best,
        "ours_tflops": flops / ours / 1e12,
        "max_abs_diff": diff,
    }
    print(f"{label:<34} {row['device']:<20} {row['dtype']:<9} batch {batch:>4}   "
          f"naive {row['naive_img_per_s']:8.1f} img/s   ours {row['ours_img_per_s']:8.1f} img/s   "
          f"x{row['speedup']:.2f} (best-of x{row['speedup_best']:.2f})   "
          f"({row['ours_tflops']:.2f} TFLOP/s, max|diff| {diff:.1e})", flush=True)
    del model, naive
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    # A small config on CPU: 6 layers of 384 wide (ViT-S-like) at 224 px, 197 positions.
    small = BEiT3Config(embed_dim=384, heads=6, ffn_dim=1536, layers=6, img_size=224)
    rows.append(compare(small, 16, torch.device("cpu"), torch.float32, args.repeats, 1, "small (384w x 6) 224px fp32"))
    if args.device == "cuda":
        device = torch.device("cuda")
        giant = resolve_config("giant", img_size=384)
        repeats = max(args.repeats, 10)
        rows.append(compare(giant, 64, device, torch.bfloat16, repeats, 3, "giant 384px bf16 model-only"))
        large = resolve_config("large", img_size=384)
        rows.append(compare(large, 128, device, torch.bfloat16, repeats, 3, "large 384px bf16 model-only"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
