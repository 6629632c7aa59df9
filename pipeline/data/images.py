"""Reading one image as 8-bit RGB, or saying precisely why it cannot be read.

Every stage that touches pixels goes through `load_rgb`, so a bad file is judged the same way by `dsmd data
check` and by extraction. The conversions are explicit (numpy) rather than left to ``Image.convert`` because
Pillow's defaults are wrong for our purpose in two places: 16-bit greyscale is clipped to 255 instead of scaled,
and transparent pixels keep whatever colour happens to be stored under alpha 0 (often black).
Nothing here touches Pillow's global settings (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``).

Memory: the conversions run over horizontal strips, so an image costs its decoded pixels plus the RGB result,
and no more; `decode_cost` estimates that from the header, before anything is decoded.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.shards import BadMemberError, ShardError, TarMember
from pipeline.errors import DsmdError

__all__ = [
    "BadImageError",
    "DecodeMemory",
    "decode_cost",
    "load_rgb",
    "load_or_skip",
    "to_rgb",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_DECODE_BYTES",
]

# Same threshold at which Pillow starts warning about decompression bombs (about 9,459 x 9,459): no caption
# dataset has real photos this large, while a hostile PNG of this size would take gigabytes to decode.
DEFAULT_MAX_PIXELS = 89_478_485

# What one image may cost to decode (`decode_cost`): room for an 8-bit RGB photo of 50 megapixels (8688 x
# 5792, the largest full-frame cameras) and its RGB copy. Flickr30k and COCO images (at most 640 pixels a
# side) need under 4 MiB; a 9400 x 9400 16-bit greyscale PNG, under the pixel limit, would need 506 MiB.
DEFAULT_MAX_DECODE_BYTES = 384 * 2**20

# Conversions work on strips of about this many pixels, so their numpy temporaries stay a few tens of MB.
_STRIP_PIXELS = 1 << 20

# Transparent regions are shown over white, as browsers and image viewers show them.
_BACKGROUND = 255


class BadImageError(DsmdError):
    """An image that cannot be used; ``reason`` is a short phrase for reports (``"truncated image data"``)."""

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def decode_cost(mode: str, size: tuple[int, int]) -> int:
    """Bytes `load_rgb` needs for an image of this Pillow mode and size: the decoded pixels plus the RGB result.

    Pillow stores 1 byte per pixel for modes 1, L and P, 2 for 16-bit greyscale and 4 for every other mode (RGB
    included); the result is RGB. Decoders' own buffers and the conversion strips are small beside these.
    """
    width, height = size
    if mode in ("1", "L", "P"):
        stored = 1
    elif mode.startswith("I;16"):
        stored = 2
    else:
        stored = 4
    return width * height * (stored + 4)


class DecodeMemory:
    """Bounds the memory of decodes running at once in several threads, by their `decode_cost`.

    Decodes are admitted in arrival order, each once its cost fits beside those running: small images run side
    by side, large ones wait their turn, and one larger than the whole limit runs alone (never forever waiting).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._admitting = 0

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(
                lambda: self._admitting == ticket and (self.in_use == 0 or self.in_use + cost <= self.limit)
            )
            self._admitting += 1
            self.in_use += cost
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= cost
                self._changed.notify_all()


def _opened(source: str | Path | TarMember, max_bytes: int) -> tuple[Path | io.BytesIO, str | Path]:
    """What Pillow opens for ``source`` (a file's path, or a tar member's bytes) and the name errors give it.
    A missing shard raises `ShardError`, which no stage turns into a skip."""
    if isinstance(source, TarMember):
        if source.size > max_bytes:
            # A member is read whole before its header is seen; an encoded image is smaller than its pixels.
            raise BadImageError(
                f"too large: a member of {source.size / 2**20:,.0f} MiB (limit {max_bytes / 2**20:,.0f} MiB)",
                str(source),
            )
        try:
            data = source.read()
        except BadMemberError as exc:
            raise BadImageError(exc.reason, str(source)) from None
        if not data:
            raise BadImageError("empty member (0 bytes)", str(source))
        return io.BytesIO(data), str(source)
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError("missing file", path) from None
    except OSError as exc:
        raise BadImageError(f"cannot read file: {exc.strerror or exc}", path) from None
    if not path.is_file():
        raise BadImageError("not a regular file", path)
    if size == 0:
        raise BadImageError("empty file (0 bytes)", path)
    return path, path


def load_rgb(
    source: str | Path | TarMember,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    memory: DecodeMemory | None = None,
) -> Image.Image:
    """Decode the whole image at ``source`` (a file, or a member of a tar shard: `CanonicalDataset.image_source`)
    into a new 8-bit RGB image, or raise `BadImageError`.

    ``max_decode_bytes`` bounds `decode_cost`, checked from the header; ``memory`` is shared by threads that
    decode at the same time, to bound their sum.
    """
    opened, path = _opened(source, max_decode_bytes)
    try:
        with Image.open(opened) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise BadImageError(f"invalid size {width} x {height}", path)
            if width * height > max_pixels:
                raise BadImageError(
                    f"too large: {width} x {height} pixels (limit {max_pixels:,}; decompression bomb?)", path
                )
            cost = decode_cost(image.mode, image.size)
            if cost > max_decode_bytes:
                raise BadImageError(
                    f"too large to decode: {width} x {height} pixels of mode {image.mode} need about "
                    f"{cost / 2**20:,.0f} MiB (limit {max_decode_bytes / 2**20:,.0f} MiB)",
                    path,
                )
            with memory.hold(cost) if memory is not None else nullcontext():
                # Opening reads only the header; load() decodes everything, which is where truncation shows.
                image.load()
                return to_rgb(image)
    except BadImageError:
        raise
    except Image.DecompressionBombError:
        raise BadImageError("too large: refused as a decompression bomb", path) from None
    except UnidentifiedImageError:
        raise BadImageError("not an image file (unknown or corrupt format)", path) from None
    except OSError as exc:
        message = str(exc)
        if "truncated" in message.lower():
            raise BadImageError("truncated image data", path) from None
        raise BadImageError(f"cannot decode: {message}", path) from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # Plugins report corrupt headers with these (SyntaxError is Pillow's historic "bad file" error).
        raise BadImageError(f"cannot decode: {type(exc).__name__}: {exc}", path) from None


def load_or_skip(
    path_of: Callable[[int], Path | TarMember], image_id: int, known_bad: Mapping[int, str]
) -> tuple[Image.Image | None, str]:
    """``(image, "")``, or ``(None, reason)`` for an image every stage skips: one the last `dsmd data check`
    recorded as bad (not opened again), or one that fails to decode now, with the reason worded as the check
    words it. ``path_of(image_id)`` gives its file or tar member (``CanonicalDataset.image_source``). A missing
    or changed shard is no skip: it raises `ShardError`."""
    if image_id in known_bad:
        return None, known_bad[image_id]
    try:
        return load_rgb(path_of(image_id)), ""
    except BadImageError as exc:
        return None, exc.reason
    except ShardError:
        raise
    except DsmdError as exc:  # the path leaves the images root (a symlink changed since prepare)
        return None, f"path outside the images root: {exc}"
    except Exception as exc:  # a decoder bug: a skip, never a crash of the whole run
        return None, f"{type(exc).__name__}: {exc}"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any common mode to a new 8-bit RGB image (see the module notes)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _by_strips(image, lambda strip: _over_white(strip.convert("RGBA")))
    if mode == "CMYK":
        return _by_strips(image, _cmyk_to_rgb)
    if mode.startswith("I;16") or mode == "I":
        return _by_strips(image, _sixteen_bit_to_rgb)
    if mode == "F":
        raise BadImageError("unsupported mode F (32-bit float pixels)")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise BadImageError(f"unsupported mode {mode}: {exc}") from None


def _by_strips(image: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """``convert`` (any image -> RGB) applied to horizontal strips of ``image``, pasted into one RGB image."""
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    if rows >= height:
        return convert(image)
    result = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        box = (0, top, width, min(top + rows, height))
        result.paste(convert(image.crop(box)), box[:2])
    return result


def _over_white(rgba: Image.Image) -> Image.Image:
    """Composite straight (non-premultiplied) RGBA over white, rounding to nearest."""
    pixels = np.asarray(rgba, dtype=np.uint32)
    alpha = pixels[..., 3:4]
    mixed = (pixels[..., :3] * alpha + _BACKGROUND * (255 - alpha) + 127) // 255
    return Image.fromarray(mixed.astype(np.uint8), "RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """R = (255 - C)(255 - K) / 255, and likewise for G (M) and B (Y). No colour management."""
    pixels = np.asarray(image, dtype=np.uint32)
    ink_free = 255 - pixels[..., :3]
    black_free = 255 - pixels[..., 3:4]
    rgb = (ink_free * black_free + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


# value / 257, rounded to nearest, for every 16-bit value: one lookup instead of wide integer arithmetic.
_GREY_OF_16_BIT = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255 (value / 257, rounded) and repeat it in three channels.

    Mode "I" holds 32-bit integers, but Pillow uses it for 16-bit greyscale PNG/TIFF data; values outside
    0..65535 cannot come from such files and are clamped to that range before scaling.
    """
    values = np.asarray(image)
    if values.dtype.kind == "i":
        values = np.clip(values, 0, 65535)
    # Indexing reads big-endian "I;16B" data correctly, so every 16-bit layout takes the same path.
    return Image.fromarray(_GREY_OF_16_BIT[values]).convert("RGB")
