import io
import struct

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellmi.data.readers import read_dib, read_image_file, write_dib
from cellmi.errors import UserError


def dib_bytes(pixels: np.ndarray, channels: int = 1, depth: int = 16, header_len: int = 52) -> bytes:
    h, w = pixels.shape
    header = struct.pack("<iiiHH", header_len, w, h, channels, depth).ljust(header_len, b"\0")
    return header + pixels.astype("<u2").tobytes()


def test_dib_reads_header_and_pixels_built_by_hand():
    pixels = np.arange(6 * 5, dtype=np.uint16).reshape(6, 5) * 1000
    out = read_dib(dib_bytes(pixels), "a.DIB")
    assert out.shape == (6, 5)
    np.testing.assert_array_equal(out, pixels)


def test_dib_writer_round_trips():
    pixels = np.random.default_rng(0).integers(0, 65535, (7, 9), dtype=np.uint16)
    np.testing.assert_array_equal(read_dib(write_dib(pixels)), pixels)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:40], "truncated DIB header"),
        (lambda b: b[:-10], "truncated DIB"),
        (lambda b: b[:4] + struct.pack("<i", -3) + b[8:], "corrupt DIB header"),
        (lambda b: b[:12] + struct.pack("<H", 3) + b[14:], "3 channels"),
        (lambda b: b[:14] + struct.pack("<H", 12) + b[16:], "bit depth 12"),
    ],
)
def test_dib_problems_name_the_file(mutate, message):
    data = dib_bytes(np.ones((4, 4), np.uint16))
    with pytest.raises(UserError, match=message) as err:
        read_dib(mutate(data), "00733-actin.DIB")
    assert "00733-actin.DIB" in str(err.value)


def test_tiff_and_png_read_by_extension():
    pixels = np.random.default_rng(1).integers(0, 4000, (8, 8), dtype=np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels)
    np.testing.assert_array_equal(read_image_file(buf.getvalue(), "x.tif"), pixels)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    np.testing.assert_array_equal(read_image_file(buf.getvalue(), "x.png"), pixels)


def test_float_tiff_with_nan_is_refused():
    pixels = np.ones((8, 8), np.float32)
    pixels[2, 3] = np.nan
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels)
    with pytest.raises(UserError, match=r"x\.tif: 1 NaN/Inf pixels"):
        read_image_file(buf.getvalue(), "x.tif")


def test_corrupt_tiff_and_multichannel_tiff_are_refused():
    with pytest.raises(UserError, match=r"bad\.tif: unreadable TIFF"):
        read_image_file(b"II*\0garbage", "bad.tif")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((3, 8, 8), np.uint16))
    with pytest.raises(UserError, match="expected one channel"):
        read_image_file(buf.getvalue(), "rgb.tif")
