"""load_rgb: every bad-file kind gives its own reason; every pixel mode converts to the hand-computed RGB."""

import struct
import zlib

import numpy as np
import pytest
from data_helpers import jpeg_bytes, write_png, write_truncated_jpeg
from PIL import Image

from pipeline.data.images import BadImageError, load_rgb, to_rgb
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
