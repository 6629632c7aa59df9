"""Encoding a split with a dual encoder, in batches: shared by validation during training and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.canonical import CanonicalDataset
from pipeline.data.images import BadImageError, load_rgb


class _Images(Dataset):
    def __init__(self, ds: CanonicalDataset, image_ids: Sequence[int], transform: Callable):
        self.ds, self.image_ids, self.transform = ds, list(image_ids), transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = int(self.image_ids[index])
        try:
            return self.transform(load_rgb(self.ds.image_source(image_id))), True
        except BadImageError:
            return None, False


def _collate(items):
    ok = torch.tensor([item[1] for item in items])
    good = [item[0] for item in items if item[1]]
    return (torch.stack(good) if good else torch.empty(0)), ok


@torch.inference_mode()
def encode_images(
    encode: Callable[[torch.Tensor], torch.Tensor],
    ds: CanonicalDataset,
    image_ids: Sequence[int],
    transform: Callable,
    *,
    dim: int,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 N x dim, decoded mask). Images that fail to decode get a zero row and mask False."""
    loader = DataLoader(
        _Images(ds, image_ids, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        # Its own generator: encoding must not consume the global RNG that a resumed training run restores.
        generator=torch.Generator(),
    )
    out = np.zeros((len(image_ids), dim), np.float32)
    decoded = np.zeros(len(image_ids), bool)
    offset = 0
    for pixels, ok in loader:
        rows = np.arange(offset, offset + len(ok))[ok.numpy()]
        if len(rows):
            out[rows] = encode(pixels.to(device)).float().cpu().numpy()
        decoded[offset : offset + len(ok)] = ok.numpy()
        offset += len(ok)
    return out, decoded


@torch.inference_mode()
def encode_texts(
    encode: Callable[..., torch.Tensor],
    tokenize: Callable[[list[str]], dict],
    texts: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(list(texts[start : start + batch_size]))
        parts.append(encode(**{k: v.to(device) for k, v in tokens.items()}).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
