"""load_rgb: every bad-file kind gives its own reason; every pixel mode converts to the hand-computed RGB."""

import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from data_helpers import jpeg_bytes, write_png, write_png_header, write_truncated_jpeg
from PIL import Image

from pipeline.data import images
from pipeline.data.images import (
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_PIXELS,
    BadImageError,
    DecodeMemory,
    decode_cost,
    load_rgb,
    to_rgb,
)
from pipeline.errors import DsmdError


def reason_for(path, **kwargs):
    with pytest.raises(BadImageError) as info:
        load_rgb(path, **kwargs)
    assert isinstance(info.value, DsmdError)
    assert str(path) in str(info.value)
    return info.value.reason


def test_good_png_and_jpeg_load_as_rgb(tmp_path):
    image = load_rgb(write_png(tmp_path / "a.png", colour=(1, 2, 3)))
    assert image.mode == "RGB" and image.size == (8, 8)
    assert image.getpixel((4, 4)) == (1, 2, 3)
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes())
    assert load_rgb(tmp_path / "b.jpg").size == (64, 64)


def test_missing_file(tmp_path):
    assert reason_for(tmp_path / "nope.jpg") == "missing file"


def test_zero_bytes(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_for(tmp_path / "empty.jpg") == "empty file (0 bytes)"


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    assert reason_for(tmp_path / "dir.jpg") == "not a regular file"


def test_truncated_jpeg_is_detected(tmp_path):
    path = write_truncated_jpeg(tmp_path / "cut.jpg")
    # The header alone is intact: only decoding all the data shows the damage.
    with Image.open(path) as header_only:
        assert header_only.size == (64, 64)
    assert reason_for(path) == "truncated image data"


def test_garbage_bytes(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is certainly not an image" * 10)
    assert reason_for(tmp_path / "junk.jpg").startswith("not an image file")


def test_corrupt_png_body(tmp_path):
    path = write_png(tmp_path / "x.png", size=(32, 32))
    data = bytearray(path.read_bytes())
    data[60:80] = b"\xff" * 20  # inside the compressed IDAT data
    path.write_bytes(bytes(data))
    reason = reason_for(path)
    assert reason.startswith("cannot decode") or reason == "truncated image data"


def test_size_limit(tmp_path):
    path = write_png(tmp_path / "a.png", size=(8, 8))
    assert reason_for(path, max_pixels=63).startswith("too large: 8 x 8 pixels")
    assert load_rgb(path, max_pixels=64).size == (8, 8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    # A valid PNG header claiming 100,000 x 100,000 pixels; the body is empty.
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    assert reason_for(tmp_path / "bomb.png").startswith("too large")


def pixels_of(path):
    return np.asarray(load_rgb(path))


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.array([[[200, 100, 50, 128], [0, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # 200 * 128/255 + 255 * 127/255 = 227.4; 100 -> 177.2; 50 -> 152.1
    assert pixels_of(tmp_path / "a.png").tolist() == [[[227, 177, 152], [255, 255, 255], [10, 20, 30]]]


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=1)
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert pixels_of(tmp_path / "p.png").tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (1, 1))
    image.putpalette([12, 34, 56] + [0] * 765)
    image.save(tmp_path / "p.png")
    assert pixels_of(tmp_path / "p.png").tolist() == [[[12, 34, 56]]]


def test_greyscale_and_grey_with_alpha(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert pixels_of(tmp_path / "l.png").tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 255))
    la.putpixel((1, 0), (100, 51))  # 100 * 0.2 + 255 * 0.8 = 224
    la.save(tmp_path / "la.png")
    assert pixels_of(tmp_path / "la.png").tolist() == [[[100, 100, 100], [224, 224, 224]]]


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (10, 20, 30, 40))
    image.putpixel((1, 0), (0, 0, 0, 255))
    image.save(tmp_path / "c.tiff")  # lossless, keeps CMYK
    assert Image.open(tmp_path / "c.tiff").mode == "CMYK"
    # R = (255-10)(255-40)/255 = 206.6 -> 207; G = 235*215/255 = 198.1; B = 225*215/255 = 189.7
    assert pixels_of(tmp_path / "c.tiff").tolist() == [[[207, 198, 190], [0, 0, 0]]]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([0, 257, 1000, 32896, 65535], dtype="<u2")
    Image.frombytes("I;16", (5, 1), values.tobytes()).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    # value / 257, rounded: 0, 1, 3.89 -> 4, 128, 255 (clipping would give 255 for all but 0)
    grey = pixels_of(tmp_path / "g16.png")
    assert grey[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()


def test_mode_i_and_big_endian_sixteen_bit():
    as_int32 = Image.fromarray(np.array([[-5, 0, 514, 65535, 70000]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(as_int32))[0, :, 0].tolist() == [0, 0, 2, 255, 255]
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([514, 65535], dtype=">u2").tobytes())
    assert np.asarray(to_rgb(big_endian))[0, :, 0].tolist() == [2, 255]


def test_returned_image_is_independent_of_the_file(tmp_path):
    path = write_png(tmp_path / "a.png", colour=(5, 6, 7))
    image = load_rgb(path)
    path.unlink()
    assert image.getpixel((0, 0)) == (5, 6, 7)


# ------------------------------------------------------------------------------------------ decoding cost


def test_decode_cost_is_decoded_pixels_plus_the_rgb_result():
    # Pillow's storage per pixel (1 for L/P, 2 for 16-bit grey, 4 for the rest) plus 4 for the RGB result.
    assert decode_cost("RGB", (640, 480)) == 640 * 480 * (4 + 4)
    assert decode_cost("L", (500, 375)) == 500 * 375 * (1 + 4)
    assert decode_cost("P", (10, 10)) == 10 * 10 * (1 + 4)
    assert decode_cost("I;16", (9400, 9400)) == decode_cost("I;16B", (9400, 9400)) == 88_360_000 * (2 + 4)
    assert decode_cost("I", (3, 3)) == decode_cost("CMYK", (3, 3)) == decode_cost("RGBA", (3, 3)) == 9 * 8


@pytest.mark.parametrize(
    "size",
    [(500, 375), (640, 480), (4032, 3024), (6000, 4000), (8688, 5792)],  # Flickr30k, COCO, phone, 24 MP, 50 MP
)
def test_ordinary_photos_fit_the_default_decode_budget(size):
    for mode in ("RGB", "L", "CMYK"):
        assert decode_cost(mode, size) <= DEFAULT_MAX_DECODE_BYTES


def test_huge_sixteen_bit_png_under_the_pixel_limit_is_refused_from_its_header(tmp_path):
    path = write_png_header(tmp_path / "huge16.png", 9400, 9400, bit_depth=16, colour_type=0)
    assert 9400 * 9400 <= DEFAULT_MAX_PIXELS
    assert reason_for(path) == "too large to decode: 9400 x 9400 pixels of mode I;16 need about 506 MiB (limit 384 MiB)"
    # A budget it fits goes on to decode, and finds the missing data.
    assert not reason_for(path, max_decode_bytes=600 * 2**20).startswith("too large")


@pytest.fixture
def tiny_strips(monkeypatch):
    monkeypatch.setattr(images, "_STRIP_PIXELS", 7)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "CMYK", "I;16", "I;16B", "I", "P"])
def test_conversion_in_strips_equals_the_whole(tiny_strips, mode):
    # 7-pixel strips of a 3-pixel-wide image are 2 rows high: 11 rows make 6 strips, the last one short.
    rng = np.random.default_rng(1)
    if mode in ("I;16", "I;16B", "I"):
        values = rng.integers(-10 if mode == "I" else 0, 70000 if mode == "I" else 65536, (11, 3))
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
        image = Image.frombytes(mode, (3, 11), values.astype(dtype).tobytes())
        expected = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        expected = np.repeat(expected[..., None], 3, axis=2)
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        image = Image.frombytes(mode, (3, 11), rng.integers(0, 256, (11, 3, bands), dtype=np.uint8).tobytes())
        if mode == "P":
            image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
            image.info["transparency"] = int(np.asarray(image)[0, 0])
        expected = np.asarray(to_rgb_whole(image))
    converted = to_rgb(image)
    assert converted.mode == "RGB" and converted.size == (3, 11)
    assert np.array_equal(np.asarray(converted), expected)


def to_rgb_whole(image):
    """The same conversion with one strip for the whole image."""
    previous = images._STRIP_PIXELS
    images._STRIP_PIXELS = 1 << 20
    try:
        return to_rgb(image)
    finally:
        images._STRIP_PIXELS = previous


def test_decode_memory_bounds_what_runs_at_once():
    memory = DecodeMemory(limit=100)
    running, peak_small, big_alone = [0], [0], []
    lock = threading.Lock()

    def decode(cost):
        with memory.hold(cost):
            with lock:
                running[0] += cost
                if cost > memory.limit:
                    big_alone.append(running[0] == cost)
                else:
                    peak_small[0] = max(peak_small[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= cost

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(decode, [40] * 6 + [150] + [40] * 6))
    assert peak_small[0] == 80  # two 40s side by side, never three (120 > 100), though eight threads wait
    assert big_alone == [True]  # larger than the whole limit: it ran, and alone
    assert memory.in_use == 0
