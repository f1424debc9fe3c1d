"""What varies in a real screen besides the biology: plate-, well- and field-level nuisances of the
synthetic screen, at a named strength (``synth.variation``).

A synthetic *draw* (one ``synth.seed``) stands for one plate; a sample is one well; a field is one
field of view. Each scope has its own random stream, seeded by (seed[, sample[, field]]) apart from
the stream that draws the cells, so a field's bits never depend on which other fields are made,
and the ``base`` level (no extra nuisance) leaves the generator's original draw bit for bit.

Levels (ranges in ``LEVELS``; docs/quality-protocol.md tabulates them):

- ``base``: none of these; the generator's own per-field gain, defocus, vignetting and noise.
- ``dev``: the variation of the development draws, on which settings may be chosen.
- ``heldout``: wider in every nuisance; the draws the protocol reports on.

No nuisance may imitate a phenotype's defining trait; the bounds that keep them apart:

- density: the control/confluent pair differs by 1.8x in cells per field, with the same cells; the
  area the cells cover (density x size^2) differs between two wells of a draw by at most
  (1.08 * 1.04^2) / (0.92 * 0.96^2) = 1.38x (the per-draw factor moves all wells alike);
- stain: the spread_flat/dim-actin pair differs by 2x in actin; per-channel drift and per-well stain
  change a well's actin/DNA ratio by at most (1.03/0.97 * 1.05/0.95)^2 = 1.38x against another
  well; the larger drift shared by all channels cancels in the channel ratios;
- size: at most 4 % per well, against 45 % between enlarged and control nuclei;
- specks and fibres are bright in every channel, not in DNA alone like apoptotic fragments, and
  lie across cells and background; stress fibres are actin-only, parallel and inside cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "LEVELS",
    "Nuisances",
    "Ranges",
    "artefact_rng",
    "channel_vignette",
    "debris",
    "draw_nuisances",
    "focus_ramp",
    "focus_tilt",
    "plate_position",
    "ramp_along",
    "texture",
    "unit_noise",
]

_PLATE, _WELL, _FIELD, _ART = 1, 2, 3, 4  # stream tags, one per scope (and one for artefact pixels)
_GRID = 4  # wells sit on a 4 x 4 grid over the plate, shuffled per draw
N_CHANNELS = 3


@dataclass(frozen=True)
class Ranges:
    """Strength of each nuisance at one level. ``+-r`` means a uniform factor in [1 - r, 1 + r]."""

    plate_density: float = 0.0  # draw: cells per field x (1 +- r), every well alike
    well_density: float = 0.0  # well: cells per field x (1 +- r)
    plate_stain: float = 0.0  # draw: stain drift across the plate, all channels alike, up to +-r
    channel_drift: float = 0.0  # draw: each channel's own drift across the plate, up to +-r
    well_stain: float = 0.0  # well: each channel's stain x (1 +- r)
    vignette: tuple[float, float] = (0.0, 0.0)  # draw, per channel: extra corner fall-off in [lo, hi]
    defocus_rate: float = 0.15  # field: share of badly defocused fields (1.5-3.5 px blur)
    blur: float = 0.0  # field: extra blur of every field, sigma in [0, r] px
    tilt_rate: float = 0.0  # field: share of fields whose focus worsens across the field
    tilt_blur: float = 0.0  # ... to a blur sigma in [1, 1 + r] px at the far edge
    specks: float = 0.0  # field: mean number of bright (often saturated) debris specks
    fibres: float = 0.0  # field: mean number of lint fibres
    texture: float = 0.0  # field: relative standard deviation of the uneven background, up to r
    cell_size: float = 0.0  # well: cell and nucleus radii x (1 +- r)
    size_spread: float = 0.14  # per cell: log-normal sigma of the cell radius
    shape_spread: float = 0.12  # per cell: log-normal sigma of the outline's elongation
    touching: float = 0.0  # well: share of colonies seeded against another colony, up to r


LEVELS: dict[str, Ranges] = {
    "base": Ranges(),
    "dev": Ranges(
        plate_density=0.10,
        well_density=0.06,
        plate_stain=0.15,
        channel_drift=0.02,
        well_stain=0.03,
        vignette=(0.0, 0.15),
        defocus_rate=0.15,
        blur=0.5,
        tilt_rate=0.10,
        tilt_blur=1.0,
        specks=0.7,
        fibres=0.15,
        texture=0.08,
        cell_size=0.03,
        size_spread=0.16,
        shape_spread=0.14,
        touching=0.3,
    ),
    "heldout": Ranges(
        plate_density=0.15,
        well_density=0.08,
        plate_stain=0.25,
        channel_drift=0.03,
        well_stain=0.05,
        vignette=(0.05, 0.30),
        defocus_rate=0.25,
        blur=0.8,
        tilt_rate=0.25,
        tilt_blur=2.0,
        specks=2.0,
        fibres=0.4,
        texture=0.16,
        cell_size=0.04,
        size_spread=0.19,
        shape_spread=0.17,
        touching=0.6,
    ),
}


@dataclass(frozen=True)
class Nuisances:
    """The nuisances drawn for one field; the defaults are the ``base`` level (none)."""

    density: float = 1.0  # x the phenotype's cells per field
    size: float = 1.0  # x the phenotype's cell and nucleus radii
    size_spread: float = 0.14
    shape_spread: float = 0.12
    touching: float = 0.0
    stain: tuple[float, ...] = (1.0,) * N_CHANNELS  # per channel, on the stains only
    vignette: tuple[float, ...] = (0.0,) * N_CHANNELS  # per channel corner fall-off
    defocus_rate: float = 0.15
    blur: float = 0.0
    tilt: float = 0.0  # blur sigma (px) at the far edge; 0: no focus gradient
    tilt_angle: float = 0.0
    specks: int = 0
    fibres: int = 0
    texture: float = 0.0

    @property
    def extra(self) -> bool:
        """Whether anything differs from the base level."""
        return self != Nuisances()


def _rng(tag: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([0x1CE, tag, *key])


def artefact_rng(seed: int, sample_index: int, field_index: int) -> np.random.Generator:
    """The stream that places a field's touching colonies, debris and background texture."""
    return _rng(_ART, seed, sample_index, field_index)


def _spread(u: float | np.ndarray, r: float) -> float | np.ndarray:
    """Uniform draw(s) ``u`` in [0, 1) to a factor in [1 - r, 1 + r]."""
    return 1.0 + r * (2.0 * u - 1.0)


def plate_position(seed: int, sample_index: int) -> tuple[float, float]:
    """(row, column) of a sample's well on the draw's plate, each in [-1, 1]."""
    slot = int(_rng(_PLATE, seed).permutation(_GRID * _GRID)[sample_index % (_GRID * _GRID)])
    row, col = divmod(slot, _GRID)
    return 2.0 * row / (_GRID - 1) - 1.0, 2.0 * col / (_GRID - 1) - 1.0


def _plate(seed: int, r: Ranges, row: float, col: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Density factor, per-channel stain factor at (row, col), per-channel vignetting of a draw."""
    rng = _rng(_PLATE, seed)
    rng.permutation(_GRID * _GRID)  # the layout (plate_position): drawn first, so it never shifts
    density = _spread(rng.random(), r.plate_density)
    angle = rng.uniform(0, 2 * np.pi, 1 + N_CHANNELS)
    size = rng.uniform(0.5, 1.0, 1 + N_CHANNELS) * np.r_[r.plate_stain, [r.channel_drift] * N_CHANNELS]
    along = (row * np.cos(angle) + col * np.sin(angle)) / np.sqrt(2.0)  # in [-1, 1] over the plate
    drift = 1.0 + size * along
    vignette = r.vignette[0] + (r.vignette[1] - r.vignette[0]) * rng.random(N_CHANNELS)
    return float(density), drift[0] * drift[1:], vignette


def draw_nuisances(seed: int, sample_index: int, field_index: int, level: str = "base") -> Nuisances:
    """Nuisances of field ``field_index`` of sample ``sample_index`` in draw ``seed`` at ``level``."""
    if level not in LEVELS:
        raise ValueError(f"unknown variation level {level!r}; choose one of {sorted(LEVELS)}")
    r = LEVELS[level]
    if r == LEVELS["base"]:
        return Nuisances()
    row, col = plate_position(seed, sample_index)
    plate_density, drift, vignette = _plate(seed, r, row, col)
    well = _rng(_WELL, seed, sample_index)
    density, size, touching = well.random(3)
    stain = drift * _spread(well.random(N_CHANNELS), r.well_stain)
    field = _rng(_FIELD, seed, sample_index, field_index)
    blur, tilted, tilt, tilt_angle, texture = field.random(5)
    return Nuisances(
        density=plate_density * float(_spread(density, r.well_density)),
        size=float(_spread(size, r.cell_size)),
        size_spread=r.size_spread,
        shape_spread=r.shape_spread,
        touching=float(touching * r.touching),
        stain=tuple(float(s) for s in stain),
        vignette=tuple(float(v) for v in vignette),
        defocus_rate=r.defocus_rate,
        blur=float(blur * r.blur),
        tilt=float(1.0 + tilt * r.tilt_blur) if tilted < r.tilt_rate else 0.0,
        tilt_angle=float(2 * np.pi * tilt_angle),
        specks=int(field.poisson(r.specks)),
        fibres=int(field.poisson(r.fibres)),
        texture=float((0.5 + 0.5 * texture) * r.texture),
    )


# ---------------------------------------------------------------- pixels


def unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, (Y, X) float32 with unit standard deviation."""
    white = rng.standard_normal(shape, dtype=np.float32)
    return ndi.gaussian_filter(white, sigma, truncate=3.0) * np.float32(2.0 * np.sqrt(np.pi) * sigma)


def _speck(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Add one debris speck to (C, Y, X) ``canvas``: a small spot, bright in every channel and often
    bright enough to saturate the camera."""
    _, h, w = canvas.shape
    sigma, peak = rng.uniform(0.6, 2.0), np.exp(rng.uniform(np.log(5e3), np.log(5e5)))
    y, x = rng.uniform(0, h), rng.uniform(0, w)
    half = int(np.ceil(3 * sigma)) + 1
    ys = np.arange(max(0, int(y) - half), min(h, int(y) + half + 1))
    xs = np.arange(max(0, int(x) - half), min(w, int(x) + half + 1))
    spot = np.exp(-((ys[:, None] - y) ** 2 + (xs[None, :] - x) ** 2) / (2 * sigma**2)) * peak
    weights = rng.uniform(0.4, 1.0, canvas.shape[0])
    canvas[:, ys[:, None], xs[None, :]] += (weights[:, None, None] * spot).astype(np.float32)


def _fibre(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """Add one lint fibre to (C, Y, X) ``canvas``: a long, thin, gently curved line in every channel."""
    _, h, w = canvas.shape
    start = rng.uniform(0, (h, w))
    length, heading, bend = rng.uniform(60, 260), rng.uniform(0, 2 * np.pi), rng.uniform(-0.6, 0.6)
    end = start + length * np.array([np.sin(heading), np.cos(heading)])
    middle = (start + end) / 2 + bend * length * np.array([np.cos(heading), -np.sin(heading)])
    t = np.linspace(0.0, 1.0, int(2 * length))[:, None]
    points = (1 - t) ** 2 * start + 2 * t * (1 - t) * middle + t**2 * end  # a quadratic Bezier curve
    iy, ix = np.round(points).astype(int).T
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    line = np.zeros((h, w), np.float32)
    np.add.at(line, (iy[inside], ix[inside]), 0.5)  # two points per px of length: about 1 per px
    sigma = rng.uniform(0.8, 1.6)
    line = ndi.gaussian_filter(line, sigma, truncate=3.0) * np.float32(np.sqrt(2 * np.pi) * sigma)
    weights = rng.uniform(0.3, 1.0, canvas.shape[0]) * rng.uniform(300.0, 1500.0)
    canvas += weights[:, None, None].astype(np.float32) * line[None]


def debris(canvas: np.ndarray, nz: Nuisances, rng: np.random.Generator) -> None:
    """Add a field's specks and fibres to its (C, Y, X) stain canvas, in place (before the optics)."""
    for _ in range(nz.specks):
        _speck(canvas, rng)
    for _ in range(nz.fibres):
        _fibre(canvas, rng)


def texture(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    """(size, size) float32 factor on the background: uneven at two scales (blotches ~100 px and a
    structured grain ~25 px), mean 1, relative standard deviation about ``amount``."""
    small = -(-size // 4)
    blotch = unit_noise(rng, (small, small), 6.0)
    grain = unit_noise(rng, (small, small), 1.5)
    field = ndi.zoom(0.9 * blotch + 0.45 * grain, size / small, order=1)[:size, :size]
    return np.clip(1.0 + amount * field, 0.2, None).astype(np.float32)


def channel_vignette(size: int, fall: tuple[float, ...]) -> np.ndarray:
    """(C, size, size) float32 illumination factor per channel: 1 at the centre, 1 - fall[c] at the
    corners, falling with the fourth power of the distance (each filter path vignettes its own way)."""
    half = (size - 1) / 2
    grid = np.arange(size, dtype=np.float32) - half
    r2 = (grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * half * half)  # 1 in the corners
    return 1.0 - np.asarray(fall, np.float32)[:, None, None] * (r2**2)[None]


def focus_tilt(image: np.ndarray, sigma: float, angle: float) -> np.ndarray:
    """(C, Y, X) -> (C, Y, X): focus worsening across the field, sharp at one edge and blurred by
    ``sigma`` px at the opposite one (a tilted sample or a curved plate bottom)."""
    far = ndi.gaussian_filter(image, (0, sigma, sigma), truncate=3.0)
    ramp = focus_ramp(*image.shape[1:], angle)
    return image * (1.0 - ramp) + far * ramp


def focus_ramp(h: int, w: int, angle: float) -> np.ndarray:
    """(Y, X) ramp rising from 0 at one edge to 1 at the opposite one along direction ``angle``
    (radians; 0 points along +x): how far out of focus a tilted sample is at each pixel."""
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    return ramp_along(xs, ys, np.cos(angle), np.sin(angle))


def ramp_along(xs, ys, cos, sin):
    """The focus ramp over coordinates ``xs``, ``ys`` in [-1, 1] along the direction (``cos``,
    ``sin``), broadcast together; numpy arrays or torch tensors alike, so training crops get the
    generator's ramp built where they live."""
    reach = abs(cos) + abs(sin)  # the projection's extent over the field
    return 0.5 + 0.5 * (xs * cos + ys * sin) / reach
