"""Image preprocessing for the BEiT-3 teacher, the same torchvision ops as the official evaluation transform.

Official (unilm beit3, evaluation): Resize((S, S), bicubic) on the whole image (no crop) -> ToTensor ->
Normalize(mean 0.5, std 0.5). Every image is converted to RGB first (as torchvision's pil_loader does), so RGBA,
palette and greyscale files give the same tensors as with the official loader.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image
from torchvision import transforms

__all__ = ["to_rgb", "beit3_image_transform", "describe_beit3_transform"]


def to_rgb(image: Image.Image) -> Image.Image:
    # A module-level function (not a lambda) so that the transform pickles into DataLoader workers.
    return image if image.mode == "RGB" else image.convert("RGB")


def beit3_image_transform(
    img_size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> transforms.Compose:
    """PIL image (any mode) -> float32 tensor (3, img_size, img_size)."""
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=list(mean), std=list(std)),
    ])


def describe_beit3_transform(
    img_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
) -> str:
    return (
        f"convert RGB; Resize(({img_size}, {img_size}), bicubic, whole image, no crop, PIL); ToTensor; "
        f"Normalize(mean={list(mean)}, std={list(std)})"
    )
