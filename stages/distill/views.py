"""Stored teacher views in training (distill.views): which view an image uses per epoch, its crop box, and the
teacher image row that goes with it.

The boxes come from the store (`<teacher>/image_view_box`, written by `dsmd extract` with extract.views > 0),
so the student's crop is the teacher's crop to the pixel; the student then applies its own resize and
normalisation. "replay" pairs the crop with the view's teacher row, "mismatch" with the plain image's row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.views import choose_view
from pipeline.errors import DsmdError

VIEW_KIND, BOX_KIND = "image_view", "image_view_box"


@dataclass(frozen=True)
class ViewPlan:
    """One epoch's choice of stored view per image, with the boxes to crop (picklable, for loader workers)."""

    boxes: np.ndarray  # (N images, K, 4) float32: x0, y0, x1, y1 in the decoded image's pixels
    order: str  # distill.view_order
    seed: int
    epoch: int

    @property
    def views(self) -> int:
        return self.boxes.shape[1]

    def view(self, image_id: int) -> int:
        return choose_view(self.order, self.seed, self.epoch, image_id, self.views)


def check_views(reader, store: str, teachers: list[str], mode: str) -> None:
    """distill.views other than plain needs every teacher's stored views; say how to make them."""
    for name in teachers:
        missing = [kind for kind in (VIEW_KIND, BOX_KIND) if (name, kind) not in reader.arrays()]
        if missing:
            raise DsmdError(
                f"distill.views={mode}: {store} has no {name}/{missing[0]} (the stored teacher views); run dsmd "
                "extract with extract.views=K > 0, or set distill.views=plain"
            )


def load_boxes(reader, teacher: str) -> np.ndarray:
    """(N images, K, 4) float32 boxes of every image row (zero rows where the image has no views)."""
    n = reader.shape(teacher, BOX_KIND)[0]
    views = reader.attrs(teacher, BOX_KIND)["views"]
    return reader.get(teacher, BOX_KIND, np.arange(n)).reshape(n, views, 4)


def view_valid(reader, teachers: list[str]) -> np.ndarray:
    """Image rows with valid stored views for every teacher (only training images have them)."""
    keep = None
    for name in teachers:
        valid = reader.valid(name, VIEW_KIND)
        keep = valid if keep is None else keep & valid
    return keep


def teacher_image_rows(reader, teacher: str, image_ids: np.ndarray, views: np.ndarray | None, mode: str):
    """(rows (B, D) float32, the array they came from): the chosen view's rows under "replay", else the plain
    image rows ("mismatch" and "plain", and validation)."""
    if mode != "replay" or views is None:
        return reader.get(teacher, "image", image_ids), f"{teacher}/image"
    if (views < 0).any():
        raise ValueError("distill.views=replay: a training item carries no stored view")
    k = reader.attrs(teacher, VIEW_KIND)["views"]
    rows = reader.get(teacher, VIEW_KIND, image_ids)
    picked = rows.reshape(len(image_ids), k, -1)[np.arange(len(image_ids)), views]
    return np.ascontiguousarray(picked), f"{teacher}/{VIEW_KIND}"
