"""Illumination correction: a flat-field per plate and channel, divided out at ingest.

As image-based profiling does it (CellProfiler's CorrectIlluminationCalculate, "regular" method,
applied by division): the flat-field of a plate is a robust average of all its fields, heavily
smoothed (Gaussian-weighted local planes, ``local_linear``), rescaled so that its robust minimum
is 1. Dividing by it evens out the fall-off towards
the corners without brightening any pixel, so nothing saturates.

The average is the per-pixel median over fields of block means (each field first divided by its
own median, so bright and dim wells weigh alike); cells sit in different places in different
fields, so the median keeps the illumination and drops the cells. How many fields that takes
depends on the screen (dense colonies need more), so the data decide: the flats of two halves of
the fields (alternate fields) are compared, and ``auto`` divides out only a pattern at least twice
as strong as the halves' disagreement, from at least ``MIN_FIELDS`` fields. On the Transfluor
plate (72 fields) the pattern is 1.8 (brightest / darkest - 1) and the halves differ by 0.10: it is
corrected. On the synthetic screen (56 fields of 14 very different samples, no vignetting) the
estimate is 0.10 and the halves differ by 0.13: left alone.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cellmi.errors import UserError
from cellmi.store import exists, join, read_bytes

__all__ = ["MIN_FIELDS", "Check", "FlatFields", "apply_flat", "corner_ratio", "load_flats", "local_linear",
           "normalise_flat"]

MIN_FIELDS = 10  # fewer fields per plate: auto leaves the plate uncorrected (5 per half at least)
MAX_FIELDS = 500  # fields per plate that enter the median (a seeded choice above it); memory stays bounded
GRID = 64  # the block-mean image's long side
SMOOTH = 1 / 8  # smoothing width as a share of the grid's short side: heavy, so no cell shape survives
FLOOR_PERCENTILE = 2.0


def _block_mean(plane: np.ndarray, factor: int) -> np.ndarray:
    h, w = (plane.shape[0] // factor) * factor, (plane.shape[1] // factor) * factor
    return plane[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _factor(shape: tuple[int, int]) -> int:
    return max(1, math.ceil(max(shape) / GRID))


def normalise_flat(flat: np.ndarray) -> np.ndarray:
    """(C, Y, X) positive flat-field -> float32 with each channel's robust minimum at 1 (values below: 1)."""
    flat = np.asarray(flat, np.float64)
    floor = np.percentile(flat.reshape(flat.shape[0], -1), FLOOR_PERCENTILE, axis=1)
    return np.maximum(flat / np.maximum(floor, 1e-12)[:, None, None], 1.0).astype(np.float32)


def corner_ratio(image: np.ndarray) -> float:
    """Centre-to-corner ratio of a (Y, X) image: mean of the central ninth over the mean of the four
    corner ninths' outer quarters (1.0 for even illumination)."""
    h, w = image.shape
    centre = image[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()
    ch, cw = max(h // 6, 1), max(w // 6, 1)
    corners = [image[:ch, :cw], image[:ch, -cw:], image[-ch:, :cw], image[-ch:, -cw:]]
    return float(centre / max(np.mean([c.mean() for c in corners]), 1e-12))


@dataclass
class FlatFields:
    """Collects block-mean images per plate while fields are read; ``estimate`` gives the flats."""

    seed: int = 0

    def __post_init__(self) -> None:
        self.small: dict[str, list[np.ndarray]] = defaultdict(list)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.seen: dict[str, int] = defaultdict(int)

    def add(self, plate: str, pixels: np.ndarray) -> None:
        """One field's raw (C, Y, X) pixels. A field of another size than the plate's first is left out
        (a store holds one size; ingest reports the odd ones)."""
        shape = (int(pixels.shape[1]), int(pixels.shape[2]))
        if self.shapes.setdefault(plate, shape) != shape:
            return
        self.seen[plate] += 1
        factor = _factor(shape)
        small = np.stack([_block_mean(p.astype(np.float32), factor) for p in pixels])
        small /= np.maximum(np.median(small.reshape(small.shape[0], -1), axis=1), 1e-6)[:, None, None]
        kept = self.small[plate]
        if len(kept) < MAX_FIELDS:
            kept.append(small)
        else:  # reservoir sampling keeps a uniform, seeded choice of MAX_FIELDS
            slot = np.random.default_rng((self.seed, self.seen[plate])).integers(self.seen[plate])
            if slot < MAX_FIELDS:
                kept[slot] = small

    def fields(self, plate: str) -> int:
        return self.seen.get(plate, 0)

    def estimate(self, plate: str) -> np.ndarray:
        """(C, Y, X) float32 flat-field of one plate, robust minimum 1."""
        return self._flat(self.small[plate], self.shapes[plate])

    def check(self, plate: str) -> Check:
        """How strong the plate's pattern is, and how well two halves of its fields agree on it."""
        small = self.small[plate]
        whole, first, second = (self._flat(part, self.shapes[plate]) for part in (small, small[::2], small[1::2]))
        return Check(len(small), _amplitude(whole), _disagreement(first, second))

    @staticmethod
    def _flat(small: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        average = np.median(np.stack(small), axis=0)
        sigma = SMOOTH * min(average.shape[1:])
        smooth = np.stack([local_linear(a, sigma) for a in average])
        return normalise_flat(_upsample(smooth, shape))


@dataclass(frozen=True)
class Check:
    """``amplitude``: brightest over darkest of the flat-field, less 1 (worst channel);
    ``disagreement``: largest relative difference between the flats of two halves of the fields."""

    fields: int
    amplitude: float
    disagreement: float

    @property
    def reliable(self) -> bool:
        """Worth dividing out: enough fields, and a pattern clearly above what the halves disagree on."""
        return self.fields >= MIN_FIELDS and self.disagreement < self.amplitude / 2


def _amplitude(flat: np.ndarray) -> float:
    return float((flat.max(axis=(1, 2)) / flat.min(axis=(1, 2))).max() - 1)


def _disagreement(a: np.ndarray, b: np.ndarray) -> float:
    ratio = a / b
    ratio /= np.median(ratio, axis=(1, 2), keepdims=True)
    return float(np.abs(ratio - 1).max())


def local_linear(image: np.ndarray, sigma: float) -> np.ndarray:
    """(Y, X) -> (Y, X): at each pixel, the value of a plane fitted by least squares with Gaussian
    weights of width ``sigma``. A plain Gaussian blur pulls the edges towards the interior and
    flattens the fall-off exactly where it is steepest (corners 16 % off on a radial test pattern,
    7 % here); held-out wells of the Transfluor plate come out more even (docs/data.md)."""
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]].astype(np.float64)

    def blur(values: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(values, sigma, mode="constant", cval=0.0)

    basis = [np.ones_like(rows), rows, cols]
    gram = np.stack([np.stack([blur(a * b) for b in basis], -1) for a in basis], -2)
    moments = np.stack([blur(a * image) for a in basis], -1)
    coef = np.linalg.solve(gram, moments[..., None])[..., 0]
    return coef[..., 0] + coef[..., 1] * rows + coef[..., 2] * cols


def _upsample(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, y, x) block means -> (C, Y, X), linear between block centres, edges held."""
    factor = _factor(shape)
    rows = np.clip((np.arange(shape[0]) + 0.5) / factor - 0.5, 0, small.shape[1] - 1)
    cols = np.clip((np.arange(shape[1]) + 0.5) / factor - 0.5, 0, small.shape[2] - 1)
    grid = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([ndimage.map_coordinates(c, grid, order=1, mode="nearest") for c in small])


def _read_flat(url: str) -> np.ndarray:
    from cellmi.data.readers import read_tiff

    data = read_bytes(url)
    name = url.rsplit("/", 1)[-1]
    if url.lower().endswith(".npy"):
        try:
            flat = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            raise UserError(f"{url}: unreadable flat-field ({err})") from None
    else:
        flat = read_tiff(data, name)
    flat = np.squeeze(np.asarray(flat, np.float64))
    if flat.ndim != 2 or not np.isfinite(flat).all() or flat.min() <= 0:
        raise UserError(f"{url}: a flat-field must be one 2-D plane of finite values above 0")
    return flat


def load_flats(folder: str, plates: list[str], channels: list[str], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Supplied flat-fields: per plate (C, Y, X), from ``{plate}_{channel}`` or ``{channel}`` files
    (.tif, .tiff or .npy) in ``folder``; a missing one, or one of another size, is an error."""
    out = {}
    for plate in plates:
        planes = []
        for channel in channels:
            names = [f"{plate}_{channel}" if plate else None, channel]
            urls = [join(folder, f"{n}{ext}") for n in names if n for ext in (".tif", ".tiff", ".npy")]
            url = next((u for u in urls if exists(u)), None)
            if url is None:
                raise UserError(f"CELLMI_INGEST__ILLUMINATION: no flat-field for channel {channel}"
                                f"{' of plate ' + plate if plate else ''} in {folder} (looked for "
                                f"{', '.join(u.rsplit('/', 1)[-1] for u in urls)})")
            plane = _read_flat(url)
            if plane.shape != shape:
                raise UserError(f"{url}: flat-field is {plane.shape[0]}x{plane.shape[1]}, the fields are "
                                f"{shape[0]}x{shape[1]}")
            planes.append(plane)
        out[plate] = normalise_flat(np.stack(planes))
    return out


def apply_flat(pixels: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Divide (C, Y, X) pixels by a flat-field (robust minimum 1), rounded back to the input's type."""
    corrected = pixels.astype(np.float32) / flat
    if np.issubdtype(pixels.dtype, np.integer):
        return np.rint(corrected).astype(pixels.dtype)
    return corrected.astype(pixels.dtype)
