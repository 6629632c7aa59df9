"""Reading one image as 8-bit RGB, or saying precisely why it cannot be read.

Every stage that touches pixels goes through `load_rgb`, so a bad file is judged the same way by `dsmd data
check` and by extraction. The conversions are explicit (numpy) rather than left to ``Image.convert`` because
Pillow's defaults are wrong for our purpose in two places: 16-bit greyscale is clipped to 255 instead of scaled,
and transparent pixels keep whatever colour happens to be stored under alpha 0 (often black).
Nothing here touches Pillow's global settings (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DsmdError

__all__ = ["BadImageError", "load_rgb", "to_rgb", "DEFAULT_MAX_PIXELS"]

# Same threshold at which Pillow starts warning about decompression bombs (about 9,459 x 9,459): no caption
# dataset has real photos this large, while a hostile PNG of this size would take gigabytes to decode.
DEFAULT_MAX_PIXELS = 89_478_485

# Transparent regions are shown over white, as browsers and image viewers show them.
_BACKGROUND = 255


class BadImageError(DsmdError):
    """An image that cannot be used; ``reason`` is a short phrase for reports (``"truncated image data"``)."""

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the whole image at ``path`` into a new 8-bit RGB image, or raise `BadImageError`."""
    path = Path(path)
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
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise BadImageError(f"invalid size {width} x {height}", path)
            if width * height > max_pixels:
                raise BadImageError(
                    f"too large: {width} x {height} pixels (limit {max_pixels:,}; decompression bomb?)", path
                )
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


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any common mode to a new 8-bit RGB image (see the module notes)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return _over_white(image.convert("RGBA"))
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(image)
    if mode == "F":
        raise BadImageError("unsupported mode F (32-bit float pixels)")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise BadImageError(f"unsupported mode {mode}: {exc}") from None


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


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 0..65535 to 0..255 (value / 257, rounded) and repeat it in three channels.

    Mode "I" holds 32-bit integers, but Pillow uses it for 16-bit greyscale PNG/TIFF data; values outside
    0..65535 cannot come from such files and are clamped to that range before scaling.
    """
    # astype reads big-endian "I;16B" data correctly, so every 16-bit layout takes the same path.
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
