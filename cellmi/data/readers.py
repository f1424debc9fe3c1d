"""Image file readers: Cellomics ``.DIB`` and ``.C01``, TIFF and PNG.

Each reader takes the file's bytes and its name (for messages) and returns one channel as a
2-D array (Y, X). Problems raise ``UserError`` naming the file and what is wrong.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from cellmi.errors import UserError

# Cellomics ArrayScan .DIB: a 40-byte Windows BITMAPINFOHEADER, 12 more bytes, then the pixels.
# The header's first field is its own size (40), not the pixel offset: pixels always start at 52.
DIB_HEADER_SIZE = 40
DIB_PIXELS_AT = 52
C01_MAGIC = 16
_DIB_DTYPES = {8: np.dtype("<u1"), 16: np.dtype("<u2")}
_MAX_EDGE = 65536


def read_dib(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Cellomics ArrayScan ``.DIB`` -> (Y, X) uint8 or uint16.

    Layout (little-endian): int32 header size at 0 (40; any value >= 40 is accepted), int32 width
    at 4, int32 height at 8, uint16 planes at 12, uint16 bits per pixel at 14, uint32 compression
    at 16 (must be 0), then image size, pixels per metre and colour counts to byte 40, 12 more
    bytes, and raw pixels from byte 52, rows top to bottom, no padding. 12-bit data is stored as 16.
    """
    if len(data) < DIB_PIXELS_AT:
        raise UserError(f"{name}: truncated DIB header ({len(data)} of {DIB_PIXELS_AT} bytes)")
    header_size, width, height = struct.unpack_from("<iii", data, 0)
    planes, depth = struct.unpack_from("<HH", data, 12)
    (compression,) = struct.unpack_from("<I", data, 16)
    if header_size < DIB_HEADER_SIZE:
        raise UserError(f"{name}: corrupt DIB header (header size field {header_size}, expected at least 40)")
    if not (0 < width <= _MAX_EDGE and 0 < height <= _MAX_EDGE):
        raise UserError(f"{name}: corrupt DIB header (size {width}x{height})")
    if compression != 0:
        raise UserError(f"{name}: DIB compression {compression} is not supported (only uncompressed, 0)")
    if planes != 1:
        raise UserError(f"{name}: DIB holds {planes} planes (a z-stack); cellmi reads single-plane images: "
                        "export one plane per file or a projection")
    if depth not in _DIB_DTYPES:
        raise UserError(f"{name}: unsupported DIB bit depth {depth} (8 or 16)")
    dtype = _DIB_DTYPES[depth]
    need = width * height * dtype.itemsize
    have = len(data) - DIB_PIXELS_AT
    if have < need:
        raise UserError(f"{name}: truncated DIB ({have} of {need} pixel bytes)")
    pixels = np.frombuffer(data, dtype=dtype, count=width * height, offset=DIB_PIXELS_AT)
    return pixels.reshape(height, width).astype(dtype.newbyteorder("="))


def read_c01(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Cellomics ``.C01``: int32 16 at byte 0, then a zlib stream whose bytes are a ``.DIB``."""
    if len(data) < 4:
        raise UserError(f"{name}: truncated C01 ({len(data)} bytes)")
    (magic,) = struct.unpack_from("<i", data, 0)
    if magic != C01_MAGIC:
        raise UserError(f"{name}: not a Cellomics C01 file (magic number {magic}, expected {C01_MAGIC})")
    inflater = zlib.decompressobj()
    try:
        dib = inflater.decompress(data[4:])
    except zlib.error as err:
        raise UserError(f"{name}: corrupt C01 compressed data ({err})") from None
    if not inflater.eof:
        raise UserError(f"{name}: truncated C01 (the compressed stream ends early)")
    return read_dib(dib, name)


def write_dib(pixels: np.ndarray) -> bytes:
    """Encode a (Y, X) uint8 or uint16 image as a Cellomics ``.DIB`` (the layout ``read_dib`` reads)."""
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError("write_dib takes a 2-D uint8 or uint16 array")
    height, width = pixels.shape
    depth = pixels.dtype.itemsize * 8
    body = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    header = struct.pack("<iiiHHIIiiII", DIB_HEADER_SIZE, width, height, 1, depth, 0, len(body), 0, 0, 0, 0)
    return header.ljust(DIB_PIXELS_AT, b"\0") + body


def write_c01(pixels: np.ndarray) -> bytes:
    """Encode a (Y, X) image as a Cellomics ``.C01`` (a zlib-compressed ``.DIB``)."""
    return struct.pack("<i", C01_MAGIC) + zlib.compress(write_dib(pixels))


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


READERS = {".dib": read_dib, ".c01": read_c01, ".tif": read_tiff, ".tiff": read_tiff, ".png": read_png}


def read_image_file(data: bytes, name: str) -> np.ndarray:
    """Decode by extension (any case) and check the values (``check_pixels``)."""
    ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in READERS:
        raise UserError(f"{name}: unsupported file type (DIB, C01, TIFF or PNG)")
    return check_pixels(READERS[ext](data, name), name)


def check_pixels(pixels: np.ndarray, name: str) -> np.ndarray:
    """Integers up to 16 bit as uint16; floats (finite, >= 0) as float32; anything else refused."""
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
    if np.issubdtype(pixels.dtype, np.signedinteger) and int(pixels.min()) < 0:
        raise UserError(f"{name}: negative pixel values")
    if pixels.dtype.itemsize > 2 and int(pixels.max()) > 65535:
        raise UserError(f"{name}: pixel values exceed 16 bit")
    return pixels.astype(np.uint16)
