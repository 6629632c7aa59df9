"""Augmented views of an image for dataset reinforcement: crop boxes drawn once at extraction, replayed in training.

A view is a crop box (x0, y0, x1, y1) in the decoded image's own pixels. The extract stage draws K of them per
training image from (view_seed, image id, view) alone, encodes each crop with the teacher and stores rows and
boxes; distill crops the same box out of the same decoded image and then applies the student's own resize and
normalisation. Both sides crop with `crop_view`, so the two inputs come from the very same pixels.

Crops only: no flip (captions say left and right) and no colour change (they name colours).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# RandomResizedCrop's aspect ratio range; the area range starts at extract.view_min_scale.
RATIO = (3 / 4, 4 / 3)
_TRIES = 10  # as torchvision: after that many boxes that do not fit, take the whole image


def draw_boxes(seed: int, image_id: int, views: int, width: int, height: int, min_scale: float) -> np.ndarray:
    """(views, 4) int64 boxes for one image; view v depends on (seed, image_id, v) and the image's size only,
    never on the other views, the batch or the worker that draws it."""
    boxes = np.empty((views, 4), np.int64)
    for view in range(views):
        rng = np.random.default_rng([seed, image_id, view])
        boxes[view] = _one_box(rng, width, height, min_scale)
    return boxes


def _one_box(rng: np.random.Generator, width: int, height: int, min_scale: float) -> tuple[int, int, int, int]:
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(_TRIES):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    return 0, 0, width, height


def crop_view(image: Image.Image, box) -> Image.Image:
    """The view's pixels: exactly the box, in the image's own pixel grid (a stored float32 box holds integers)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
        raise ValueError(f"view box {(x0, y0, x1, y1)} is not inside the {image.width}x{image.height} image")
    return image.crop((x0, y0, x1, y1))


def choose_view(order: str, seed: int, epoch: int, image_id: int, views: int) -> int:
    """The stored view an image uses in an epoch of training (distill.view_order)."""
    if order == "cycle":
        return (epoch + image_id) % views
    return int(np.random.default_rng([seed, epoch, image_id]).integers(views))
