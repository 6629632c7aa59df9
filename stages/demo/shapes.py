"""The built-in demo dataset, "shapes world": small pictures of coloured shapes with paraphrased captions.

Four kinds of scene, each fully described by its captions:
- one object:   "a large red circle at the top"       (shape x colour x size x position: 400 descriptions)
- a count:      "three small blue squares"             (shape x colour x size x 2|3:           160)
- a relation:   "a red circle to the left of a green cross" / "... above ..." (ordered pairs:  3,120)
- three objects "a red circle, a blue square and a green triangle" (sets of three:          9,880)
Sizes are only named where they are part of the description; elsewhere they vary freely, as do the exact
positions, a small rotation, the colour shades and the background (tint, gradient, noise), so that a model has
to read the attributes rather than match pixels. Word order matters (relations) and colours must be bound to
the right shape (three objects), which keeps small models below perfect recall.

Every caption of an image is a paraphrase of the same description (other templates, synonyms and item order).
Within the test split, and within the validation split, no two images share a description, so retrieval has
exactly one right answer. The same seed gives the same JSON and the same PNG bytes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import DsmdError

__all__ = ["generate_shapes", "generate_pretrain_corpus", "PRETRAIN_FILE", "sample_scene", "render_scene",
           "scene_captions", "Scene", "ShapeObject"]

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (230, 210, 25),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 45, 175),
    "pink": (240, 120, 190),
    "black": (25, 25, 25),
}
COLOUR_WORDS = {name: (name,) for name in COLOURS} | {"purple": ("purple", "violet")}
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# Object radius as a fraction of the image side.
RADIUS = {"small": 0.09, "large": 0.165}
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_CENTRES = {
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "centre": (0.5, 0.5),
}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side", "in the left part"),
    "right": ("on the right", "at the right", "on the right side", "in the right part"),
    "top": ("at the top", "near the top", "in the upper part", "at the top of the picture"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part", "at the bottom of the picture"),
    "centre": ("in the centre", "in the middle", "in the center"),
}
COUNT_WORDS = {2: ("two", "2"), 3: ("three", "3")}
KINDS = ("single", "count", "relation", "triple")
KIND_WEIGHTS = (0.2, 0.15, 0.35, 0.3)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# The random stream of the teacher's pretraining corpus, apart from every split's.
PRETRAIN_CODE = 3
PRETRAIN_FILE = "dataset_pretrain.json"
# Shapes are drawn on a canvas this much larger and reduced, for antialiased edges; large images need less.
MAX_SUPERSAMPLE = 4
MARGIN = 0.02


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, fractions of the image side
    y: float
    radius: float
    angle: float  # degrees of rotation jitter
    shade: tuple[int, int, int]  # the colour actually painted (jittered around COLOURS[colour])

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "x": round(self.x, 4),
            "y": round(self.y, 4),
            "radius": round(self.radius, 4),
        }


@dataclass(frozen=True)
class Scene:
    kind: str
    objects: tuple[ShapeObject, ...]
    position: str | None = None  # single
    relation: str | None = None  # relation: "left_of" | "above" (objects[0] is left of / above objects[1])

    def description(self) -> str:
        """The canonical description: canonical words, canonical order. Two scenes with the same description
        are indistinguishable from their captions."""
        first = self.objects[0]
        if self.kind == "single":
            return (
                f"{_article(first.size)} {first.size} {first.colour} {first.shape} {POSITION_WORDS[self.position][0]}"
            )
        if self.kind == "count":
            plural = SHAPE_WORDS[first.shape][0][1]
            return f"{COUNT_WORDS[len(self.objects)][0]} {first.size} {first.colour} {plural}"
        if self.kind == "relation":
            a, b = (f"{_article(o.colour)} {o.colour} {o.shape}" for o in self.objects)
            return f"{a} to the left of {b}" if self.relation == "left_of" else f"{a} above {b}"
        items = sorted(f"{_article(o.colour)} {o.colour} {o.shape}" for o in self.objects)
        return f"{items[0]}, {items[1]} and {items[2]}"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "description": self.description(),
            "position": self.position,
            "relation": self.relation,
            "objects": [o.to_dict() for o in self.objects],
        }


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------------------- sampling


def _shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[colour], dtype=float)
    return tuple(int(v) for v in np.clip(base + rng.uniform(-18, 18, 3), 0, 255))


def _object(rng: np.random.Generator, shape: str, colour: str, size: str, x: float, y: float) -> ShapeObject:
    radius = RADIUS[size] * rng.uniform(0.9, 1.1)
    return ShapeObject(shape, colour, size, x, y, radius, float(rng.uniform(-10, 10)), _shade(rng, colour))


def _clamp(value: float, radius: float) -> float:
    return float(np.clip(value, radius + MARGIN, 1 - radius - MARGIN))


def _free_positions(rng: np.random.Generator, radii: list[float], gap: float = 0.04) -> list[tuple[float, float]]:
    """Random centres for non-overlapping objects (rejection sampling; these sizes always fit)."""
    for _ in range(1000):
        centres = [(rng.uniform(r + MARGIN, 1 - r - MARGIN), rng.uniform(r + MARGIN, 1 - r - MARGIN)) for r in radii]
        if all(
            np.hypot(centres[i][0] - centres[j][0], centres[i][1] - centres[j][1]) >= radii[i] + radii[j] + gap
            for i in range(len(radii))
            for j in range(i)
        ):
            return [(float(x), float(y)) for x, y in centres]
    raise RuntimeError("no room for the objects")  # unreachable with the radii above


def _pick(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> Scene:
    kind = KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
    if kind == "single":
        shape, colour, size, position = (
            _pick(rng, SHAPES),
            _pick(rng, tuple(COLOURS)),
            _pick(rng, SIZES),
            _pick(rng, POSITIONS),
        )
        radius = RADIUS[size] * 1.1
        cx, cy = POSITION_CENTRES[position]
        x = _clamp(cx + rng.uniform(-0.06, 0.06), radius)
        y = _clamp(cy + rng.uniform(-0.06, 0.06), radius)
        return Scene(kind, (_object(rng, shape, colour, size, x, y),), position=position)
    if kind == "count":
        shape, colour, size = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), _pick(rng, SIZES)
        count = int(rng.integers(2, 4))
        centres = _free_positions(rng, [RADIUS[size] * 1.1] * count)
        return Scene(kind, tuple(_object(rng, shape, colour, size, x, y) for x, y in centres))
    items = _distinct_items(rng, 2 if kind == "relation" else 3)
    sizes = [_pick(rng, SIZES) for _ in items]
    if kind == "triple":
        centres = _free_positions(rng, [RADIUS[s] * 1.1 for s in sizes])
        return Scene(kind, _objects(rng, items, sizes, centres))
    relation = _pick(rng, ("left_of", "above"))
    radii = [RADIUS[s] * 1.1 for s in sizes]
    for _ in range(1000):
        # Along the relation axis the objects are far apart; across it they are nearly aligned, so that
        # "left of" and "above" never both apply.
        along = [rng.uniform(radii[0] + MARGIN, 0.45), rng.uniform(0.55, 1 - radii[1] - MARGIN)]
        middle = rng.uniform(0.3, 0.7)
        across = [_clamp(middle + rng.uniform(-0.07, 0.07), r) for r in radii]
        if along[1] - along[0] >= radii[0] + radii[1] + 0.06:
            break
    pairs = zip(along, across, strict=True) if relation == "left_of" else zip(across, along, strict=True)
    return Scene(kind, _objects(rng, items, sizes, list(pairs)), relation=relation)


def _objects(
    rng: np.random.Generator, items: list[tuple[str, str]], sizes: list[str], centres: list[tuple[float, float]]
) -> tuple[ShapeObject, ...]:
    return tuple(
        _object(rng, shape, colour, size, x, y)
        for (shape, colour), size, (x, y) in zip(items, sizes, centres, strict=True)
    )


def _distinct_items(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    while len(items) < n:
        item = (_pick(rng, SHAPES), _pick(rng, tuple(COLOURS)))
        if item not in items:
            items.append(item)
    return items


# -------------------------------------------------------------------------------------- rendering


def _outline(obj: ShapeObject, scale: float) -> list[tuple[float, float]] | None:
    """Polygon of the shape in canvas pixels (None for the circle, drawn as an ellipse)."""
    cx, cy, r = obj.x * scale, obj.y * scale, obj.radius * scale
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        half = 0.85 * r
        points = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif obj.shape == "diamond":
        points = [(0, -1.2 * r), (0.75 * r, 0), (0, 1.2 * r), (-0.75 * r, 0)]
    elif obj.shape == "triangle":
        points = [(0, -1.1 * r), (0.95 * r, 0.65 * r), (-0.95 * r, 0.65 * r)]
    else:  # cross
        a, t = r, 0.34 * r
        points = [
            (-t, -a),
            (t, -a),
            (t, -t),
            (a, -t),
            (a, t),
            (t, t),
            (t, a),
            (-t, a),
            (-t, t),
            (-a, t),
            (-a, -t),
            (-t, -t),
        ]
    angle = np.deg2rad(obj.angle)
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in points]


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene: a tinted, graded, noisy background and antialiased shapes (drawn larger, reduced)."""
    tint = rng.uniform(195, 245, 3)
    ramp = np.linspace(-1, 1, size)
    gx, gy = rng.uniform(-12, 12, 2)
    background = tint[None, None, :] + (gx * ramp[None, :, None] + gy * ramp[:, None, None])
    pixels = np.broadcast_to(background, (size, size, 3)).astype(np.float32)
    factor = max(1, min(MAX_SUPERSAMPLE, 256 // size))
    for obj in scene.objects:
        # Draw only the object's neighbourhood (every shape fits in 1.3 radii of its centre); a box aligned
        # to whole pixels reduces exactly like the full canvas would.
        reach = 1.3 * obj.radius * size
        x0, y0 = (max(0, int(np.floor(c * size - reach))) for c in (obj.x, obj.y))
        x1, y1 = (min(size, int(np.ceil(c * size + reach)) + 1) for c in (obj.x, obj.y))
        mask = Image.new("L", ((x1 - x0) * factor, (y1 - y0) * factor), 0)
        draw = ImageDraw.Draw(mask)
        outline = _outline(obj, size * factor)
        if outline is None:
            cx, cy, r = (obj.x * size - x0) * factor, (obj.y * size - y0) * factor, obj.radius * size * factor
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        else:
            draw.polygon([(px - x0 * factor, py - y0 * factor) for px, py in outline], fill=255)
        reduced = mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        alpha = np.asarray(reduced, dtype=np.float32)[..., None] / 255.0
        region = pixels[y0:y1, x0:x1]
        pixels[y0:y1, x0:x1] = region * (1 - alpha) + np.asarray(obj.shade, dtype=np.float32) * alpha
    pixels += rng.normal(0.0, 5.0, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------- captions


def _phrase(rng: np.random.Generator, obj: ShapeObject, with_size: bool = False, plural: bool = False) -> str:
    shape = _pick(rng, SHAPE_WORDS[obj.shape])[1 if plural else 0]
    words = ([_pick(rng, SIZE_WORDS[obj.size])] if with_size else []) + [_pick(rng, COLOUR_WORDS[obj.colour]), shape]
    text = " ".join(words)
    return text if plural else f"{_article(text)} {text}"


def _single_templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    obj = scene.objects[0]
    size, colour = _pick(rng, SIZE_WORDS[obj.size]), _pick(rng, COLOUR_WORDS[obj.colour])
    shape = _pick(rng, SHAPE_WORDS[obj.shape])[0]
    where = _pick(rng, POSITION_WORDS[scene.position])
    thing = f"{size} {colour} {shape}"
    return [
        f"{_article(thing)} {thing} {where}",
        f"there is {_article(thing)} {thing} {where}",
        f"{where}, {_article(thing)} {thing}",
        f"{_article(shape)} {shape}, {size} and {colour}, {where}",
        f"one {thing} {where}",
        f"{_article(size)} {size} {shape} coloured {colour} {where}",
        f"{where} there is {_article(thing)} {thing}",
        f"a picture with {_article(thing)} {thing} {where}",
    ]


def _count_templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    obj = scene.objects[0]
    n = _pick(rng, COUNT_WORDS[len(scene.objects)])
    size, colour = _pick(rng, SIZE_WORDS[obj.size]), _pick(rng, COLOUR_WORDS[obj.colour])
    shapes = _pick(rng, SHAPE_WORDS[obj.shape])[1]
    return [
        f"{n} {size} {colour} {shapes}",
        f"there are {n} {size} {colour} {shapes}",
        f"{n} {shapes} that are {size} and {colour}",
        f"a picture of {n} {size} {colour} {shapes}",
        f"{n} {size} {shapes} coloured {colour}",
        f"exactly {n} {size} {colour} {shapes}",
    ]


def _relation_templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    a, b = (_phrase(rng, o) for o in scene.objects)
    if scene.relation == "left_of":
        return [
            f"{a} to the left of {b}",
            f"{a} left of {b}",
            f"{b} to the right of {a}",
            f"{b} is right of {a}",
            f"{a} on the left and {b} on the right",
            f"{b} on the right and {a} on the left",
            f"on the left {a}, on the right {b}",
        ]
    return [
        f"{a} above {b}",
        f"{a} over {b}",
        f"{b} below {a}",
        f"{b} under {a}",
        f"{a} at the top and {b} at the bottom",
        f"{b} at the bottom and {a} at the top",
        f"{a} is above {b}",
    ]


def _triple_templates(scene: Scene, rng: np.random.Generator) -> list[str]:
    order = rng.permutation(3)
    x, y, z = (_phrase(rng, scene.objects[i]) for i in order)
    return [
        f"{x}, {y} and {z}",
        f"three shapes: {x}, {y} and {z}",
        f"there are {x}, {y} and {z}",
        f"{x}, {y}, and {z}",
        f"a picture with {x}, {y} and {z}",
        f"{x} together with {y} and {z}",
    ]


_TEMPLATES = {
    "single": _single_templates,
    "count": _count_templates,
    "relation": _relation_templates,
    "triple": _triple_templates,
}


def scene_captions(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` different paraphrases of the scene's description (templates, synonyms, item order vary)."""
    make = _TEMPLATES[scene.kind]
    count = len(make(scene, rng))
    captions: list[str] = []
    order: list[int] = []
    # Every template is used once (in random order) before any is used again; each use draws fresh synonyms.
    for _ in range(50 * n):
        if not order:
            order = rng.permutation(count).tolist()
        text = make(scene, rng)[order.pop()]
        if text not in captions:
            captions.append(text)
            if len(captions) == n:
                return captions
    raise DsmdError(f"cannot write {n} different captions for one scene; lower demo.captions_per_image")


# ------------------------------------------------------------------------------------- generation


def description_space() -> int:
    """How many different descriptions exist (single + count + relation + triple)."""
    items = len(SHAPES) * len(COLOURS)
    single = items * len(SIZES) * len(POSITIONS)
    count = items * len(SIZES) * len(COUNT_WORDS)
    relation = items * (items - 1) * 2
    triple = items * (items - 1) * (items - 2) // 6
    return single + count + relation + triple


def _split_scenes(rng: np.random.Generator, n: int, distinct: bool, split: str) -> list[Scene]:
    # Rejection sampling slows down as the space fills up; half of it is plenty for any sensible demo.
    if distinct and n > description_space() // 2:
        raise DsmdError(
            f"demo.n_{split}={n} is too many scenes with distinct descriptions (at most "
            f"{description_space() // 2:,}); lower demo.n_{split}"
        )
    scenes: list[Scene] = []
    seen: set[str] = set()
    while len(scenes) < n:
        scene = sample_scene(rng)
        if distinct:
            description = scene.description()
            if description in seen:
                continue
            seen.add(description)
        scenes.append(scene)
    return scenes


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _write_split(cfg: Any, split: str, code: int, n: int, distinct: bool, image_dir: Path, name_of,
                 entries: list[dict], sentence_id: int) -> tuple[set[str], int]:
    """Render one split's n scenes into image_dir and append their Karpathy entries; returns the file names
    written and the next sentence id."""
    written: set[str] = set()
    scenes = _split_scenes(np.random.default_rng([cfg.seed, code]), n, distinct, split)
    for index, scene in enumerate(scenes):
        # One generator per image for drawing and wording: an image does not depend on how many
        # random numbers the images before it used.
        rng = np.random.default_rng([cfg.seed, code, index, 1])
        image_id = len(entries)
        filename = name_of(image_id)
        render_scene(scene, cfg.image_size, rng).save(image_dir / filename, format="PNG", compress_level=6)
        written.add(filename)
        sentences = []
        for text in scene_captions(scene, cfg.captions_per_image, rng):
            sentences.append({"raw": text, "tokens": _tokens(text), "imgid": image_id, "sentid": sentence_id})
            sentence_id += 1
        entries.append(
            {
                "filename": filename,
                "imgid": image_id,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "scene": scene.to_dict(),
            }
        )
    return written, sentence_id


def _check_settings(cfg: Any, counts: tuple[str, ...]) -> None:
    for name in counts:
        if getattr(cfg, name) < 0:
            raise DsmdError(f"demo.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.image_size < 16:
        raise DsmdError(f"demo.image_size must be at least 16 pixels, got {cfg.image_size}")
    if cfg.captions_per_image < 1:
        raise DsmdError(f"demo.captions_per_image must be at least 1, got {cfg.captions_per_image}")


def _write_document(cfg: Any, entries: list[dict], json_path: Path, image_dir: Path, written: set[str],
                    pattern: str, name: str) -> Path:
    # Images of an earlier, larger run would otherwise linger next to the new ones.
    for stale in image_dir.glob("*.png"):
        if re.fullmatch(pattern, stale.name) and stale.name not in written:
            stale.unlink()
    document = {
        "dataset": name,
        "generator": {"seed": cfg.seed, "image_size": cfg.image_size, "captions_per_image": cfg.captions_per_image},
        "images": entries,
    }
    temporary = json_path.with_name(f".{json_path.name}.tmp")
    temporary.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, json_path)
    return json_path


def generate_shapes(cfg: Any) -> Path:
    """Write ``images/*.png`` and ``dataset_shapes.json`` (Karpathy format) into ``cfg.out_dir``
    (a `DemoConfig`); returns the JSON path."""
    _check_settings(cfg, ("n_train", "n_val", "n_test"))
    out_dir = Path(cfg.out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    written: set[str] = set()
    sentence_id = 0
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        names, sentence_id = _write_split(cfg, split, SPLIT_CODES[split], n, split != "train", image_dir,
                                          lambda image_id: f"{image_id:06d}.png", entries, sentence_id)
        written |= names
    return _write_document(cfg, entries, out_dir / "dataset_shapes.json", image_dir, written, r"\d{6}\.png",
                           "shapes")


def generate_pretrain_corpus(cfg: Any) -> Path:
    """The demo teacher's pretraining corpus: ``cfg.n_pretrain`` further scenes of the same world, written as a
    Karpathy dataset (``dataset_pretrain.json``, every image in split "train", ``images/p*.png``) into
    ``cfg.pretrain_dir``; returns the JSON path.

    Its scenes come from their own random stream (PRETRAIN_CODE), so no picture is one of the train, val or
    test split's; descriptions may recur, as "a dog on the grass" recurs between BEiT-3's pretraining data and
    Flickr30k, but every render differs (tests compare the pixels).
    """
    _check_settings(cfg, ("n_pretrain",))
    out_dir = Path(cfg.pretrain_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    written, _ = _write_split(cfg, "train", PRETRAIN_CODE, cfg.n_pretrain, False, image_dir,
                              lambda image_id: f"p{image_id:06d}.png", entries, 0)
    return _write_document(cfg, entries, out_dir / PRETRAIN_FILE, image_dir, written, r"p\d{6}\.png",
                           "shapes-pretrain")
