import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellmi.data.readers import read_c01, read_dib, read_image_file, write_c01, write_dib
from cellmi.errors import UserError


def dib_bytes(pixels: np.ndarray, planes: int = 1, compression: int = 0, header_size: int = 40) -> bytes:
    """A Cellomics .DIB built from the published layout, not with cellmi's writer: a 40-byte
    BITMAPINFOHEADER (size, width, height, planes, bits per pixel, compression, image size,
    x/y pixels per metre, colours used, colours important), 12 more bytes, pixels from byte 52."""
    h, w = pixels.shape
    bits = pixels.dtype.itemsize * 8
    body = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    header = struct.pack("<i", header_size)           # 0: header size, 40 in every real file
    header += struct.pack("<i", w)                    # 4: width
    header += struct.pack("<i", h)                    # 8: height
    header += struct.pack("<H", planes)               # 12: planes
    header += struct.pack("<H", bits)                 # 14: bits per pixel
    header += struct.pack("<I", compression)          # 16: compression
    header += struct.pack("<I", len(body))            # 20: image size
    header += struct.pack("<ii", 0, 0)                # 24, 28: pixels per metre
    header += struct.pack("<II", 0, 0)                # 32, 36: colours used, important
    assert len(header) == 40
    return header + bytes(12) + body                  # 40-52: 12 more bytes; pixels at 52


def c01_bytes(dib: bytes) -> bytes:
    """A Cellomics .C01: int32 16, then the .DIB as a zlib stream."""
    return struct.pack("<i", 16) + zlib.compress(dib)


def test_dib_in_the_real_layout_reads_rows_top_to_bottom():
    pixels = np.arange(6 * 5, dtype=np.uint16).reshape(6, 5) * 1000 + 7
    data = dib_bytes(pixels)
    assert struct.unpack_from("<i", data, 0)[0] == 40 and len(data) == 52 + pixels.size * 2
    out = read_dib(data, "00733-actin.DIB")
    assert out.dtype == np.uint16 and out.shape == (6, 5)
    np.testing.assert_array_equal(out, pixels)
    assert out[0, 0] == 7 and out[5, 4] == 29007  # first row first, no bottom-up flip


def test_dib_8_bit_and_any_header_size_of_at_least_40():
    pixels = np.random.default_rng(2).integers(0, 255, (3, 7), dtype=np.uint8)
    out = read_dib(dib_bytes(pixels), "a.DIB")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)
    wide = np.random.default_rng(3).integers(0, 4095, (4, 4), dtype=np.uint16)
    np.testing.assert_array_equal(read_dib(dib_bytes(wide, header_size=44), "b.DIB"), wide)  # still from byte 52


def test_c01_is_a_compressed_dib():
    pixels = np.random.default_rng(4).integers(0, 65535, (9, 11), dtype=np.uint16)
    np.testing.assert_array_equal(read_c01(c01_bytes(dib_bytes(pixels)), "x.C01"), pixels)
    np.testing.assert_array_equal(read_image_file(c01_bytes(dib_bytes(pixels)), "A01f00d0.c01"), pixels)


def test_writer_output_is_the_real_layout_byte_for_byte():
    pixels = np.random.default_rng(0).integers(0, 65535, (7, 9), dtype=np.uint16)
    assert write_dib(pixels) == dib_bytes(pixels)
    assert write_dib(pixels.astype(np.uint8)) == dib_bytes(pixels.astype(np.uint8))
    np.testing.assert_array_equal(read_c01(write_c01(pixels)), pixels)


GOOD = dib_bytes(np.ones((4, 4), np.uint16))


@pytest.mark.parametrize(
    ("reader", "data", "message"),
    [
        (read_dib, GOOD[:40], "truncated DIB header"),
        (read_dib, GOOD[:-10], "truncated DIB"),
        (read_dib, dib_bytes(np.ones((4, 4), np.uint16), header_size=12), "header size field 12"),
        (read_dib, GOOD[:4] + struct.pack("<i", -3) + GOOD[8:], "corrupt DIB header"),
        (read_dib, dib_bytes(np.ones((4, 4), np.uint16), compression=1), "DIB compression 1 is not supported"),
        (read_dib, dib_bytes(np.ones((4, 4), np.uint16), planes=3), "holds 3 planes"),
        (read_dib, GOOD[:14] + struct.pack("<H", 12) + GOOD[16:], "bit depth 12"),
        (read_c01, c01_bytes(GOOD)[:-6], "truncated C01"),
        (read_c01, c01_bytes(GOOD[:-10]), "truncated DIB"),
        (read_c01, struct.pack("<i", 17) + zlib.compress(GOOD), "not a Cellomics C01 file"),
        (read_c01, struct.pack("<i", 16) + b"not zlib at all", "corrupt C01"),
    ],
)
def test_cellomics_problems_are_one_line_naming_the_file(reader, data, message):
    with pytest.raises(UserError, match=message) as err:
        reader(data, "00733-actin.DIB")
    assert str(err.value).startswith("00733-actin.DIB: ") and "\n" not in str(err.value)


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
