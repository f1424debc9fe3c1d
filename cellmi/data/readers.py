"""Image file readers: Cellomics ``.DIB`` (BBBC018), TIFF and PNG.

Each reader takes the file's bytes and its name (for messages) and returns one channel as a
2-D array (Y, X). Problems raise ``UserError`` naming the file and what is wrong.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from cellmi.errors import UserError

DIB_HEADER = 52
_DIB_DTYPES = {8: np.dtype("<u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4")}


def read_dib(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Cellomics ArrayScan ``.DIB``: a 52-byte little-endian header, then raw pixels.

    Header: int32 header length at 0, int32 width at 4, int32 height at 8, uint16 channel count
    at 12, uint16 bit depth at 14. Pixels are row-major, little-endian; more than one channel is
    refused (BBBC018 stores one channel per file).
    """
    if len(data) < DIB_HEADER:
        raise UserError(f"{name}: truncated DIB header ({len(data)} of {DIB_HEADER} bytes)")
    header_len, width, height = struct.unpack_from("<iii", data, 0)
    channels, depth = struct.unpack_from("<HH", data, 12)
    if header_len < DIB_HEADER or header_len > len(data):
        raise UserError(f"{name}: corrupt DIB header (header length {header_len})")
    if width <= 0 or height <= 0 or width > 65536 or height > 65536:
        raise UserError(f"{name}: corrupt DIB header (size {width}x{height})")
    if channels != 1:
        raise UserError(f"{name}: DIB has {channels} channels; expected 1 channel per file")
    if depth not in _DIB_DTYPES:
        raise UserError(f"{name}: unsupported DIB bit depth {depth} (8, 16 or 32)")
    dtype = _DIB_DTYPES[depth]
    need = width * height * dtype.itemsize
    have = len(data) - header_len
    if have < need:
        raise UserError(f"{name}: truncated DIB ({have} of {need} pixel bytes)")
    pixels = np.frombuffer(data, dtype=dtype, count=width * height, offset=header_len)
    return pixels.reshape(height, width).astype(dtype.newbyteorder("="))


def write_dib(pixels: np.ndarray) -> bytes:
    """Encode a (Y, X) uint16 image as a single-channel 16-bit ``.DIB`` file."""
    if pixels.ndim != 2 or pixels.dtype != np.uint16:
        raise ValueError("write_dib takes a 2-D uint16 array")
    height, width = pixels.shape
    header = struct.pack("<iiiHH", DIB_HEADER, width, height, 1, 16).ljust(DIB_HEADER, b"\0")
    return header + pixels.astype("<u2").tobytes()


def read_tiff(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """A single-channel TIFF (one page, 2-D; a leading axis of length 1 is dropped)."""
    import tifffile

    try:
        pixels = tifffile.imread(io.BytesIO(data))
    except Exception as err:  # tifffile raises many types for damaged files
        raise UserError(f"{name}: unreadable TIFF ({type(err).__name__}: {err})") from None
    if np.asarray(pixels).size == 0:
        raise UserError(f"{name}: unreadable TIFF (no image data)")
    return _single_channel(np.asarray(pixels), name)


def read_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """A single-channel 8- or 16-bit PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"{name}: unreadable PNG ({err})") from None
    return _single_channel(pixels, name)


def _single_channel(pixels: np.ndarray, name: str) -> np.ndarray:
    squeezed = pixels.squeeze()
    if squeezed.ndim != 2:
        raise UserError(f"{name}: expected one channel (Y, X), found shape {pixels.shape}")
    return squeezed


READERS = {".dib": read_dib, ".tif": read_tiff, ".tiff": read_tiff, ".png": read_png}


def read_image_file(data: bytes, name: str) -> np.ndarray:
    """Decode by extension and check the values: integer up to 16 bit, or finite float >= 0."""
    ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in READERS:
        raise UserError(f"{name}: unsupported file type (DIB, TIFF or PNG)")
    return check_pixels(READERS[ext](data, name), name)


def check_pixels(pixels: np.ndarray, name: str) -> np.ndarray:
    """Refuse NaN/Inf or negative floats and integers wider than 16 bit that overflow uint16."""
    if pixels.size == 0:
        raise UserError(f"{name}: empty image")
    if np.issubdtype(pixels.dtype, np.floating):
        bad = ~np.isfinite(pixels)
        if bad.any():
            raise UserError(f"{name}: {int(bad.sum())} NaN/Inf pixels")
        if pixels.min() < 0:
            raise UserError(f"{name}: negative pixel values")
        return pixels.astype(np.float32)
    if not np.issubdtype(pixels.dtype, np.integer) and pixels.dtype != bool:
        raise UserError(f"{name}: unsupported pixel type {pixels.dtype}")
    if pixels.dtype.itemsize > 2 and int(pixels.max()) > 65535:
        raise UserError(f"{name}: pixel values exceed 16 bit")
    return pixels.astype(np.uint16)
