"""Synthetic HT29-like screen: 14 phenotypes x N fields x 3 channels (DNA, pH3, actin), uint16.

The embedded default data set, standing in for BBBC018. Every field is drawn from its own RNG seeded
by (seed, sample, field), so its bits do not depend on which other fields are made or on workers.

A field is rendered on a canvas with a margin (so border cells are cut, as in a real field):
1. cells are placed (colonies plus scattered cells, minimum spacing) with their nuclei, as
   parameter arrays;
2. a Voronoi partition (EDT indices) gives every pixel its nearest cell and nearest nucleus, and
   whole-canvas numpy tests each pixel against its owner's star-shaped outline; touching cells
   thus share straight junctions, as epithelial cells do;
3. stains: Hoechst fills nuclei (condensed and bright in mitosis), pH3 lights mitotic chromatin
   and G2 foci, phalloidin gives cytoplasm, cortical junctions, stress fibres and ruffles;
4. the microscope: PSF, defocus on ~15% of fields, haze, vignetting and gradient, per-field
   gain, background offset, Poisson and read noise.

``variation`` adds the plate-, well- and field-level nuisances of real screens (cell density, stain
drift, per-channel vignetting, focus, debris, uneven background, cell size and shape spread,
touching colonies; cellmi/data/nuisance.py). The ``base`` level adds none and gives the same bits
as before they existed.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from cellmi.data.nuisance import (
    LEVELS,
    Nuisances,
    artefact_rng,
    channel_vignette,
    debris,
    draw_nuisances,
    focus_tilt,
    texture,
)
from cellmi.data.nuisance import unit_noise as _unit_noise

__all__ = [
    "CHANNELS",
    "PHENOTYPES",
    "Phenotype",
    "SynthField",
    "preview_rgb",
    "sample_id",
    "synth_field",
    "synth_screen",
]

CHANNELS = ("DNA", "pH3", "actin")
MARGIN = 40  # canvas border in px: wider than a cell radius, so the field edge cuts cells
_REF_AREA = 512.0 * 512.0  # densities are cells per 512 x 512 field
_CELL_K = np.arange(2, 6)  # low-order outline harmonics of cells
_NUC_K = np.arange(2, 6)
_INTERPHASE, _MITOTIC, _APOPTOTIC = 0, 1, 2  # cell kinds
# Stain brightness in camera counts at gain 1, before illumination and noise.
_DNA, _PH3_MITOTIC, _PH3_FOCI, _PH3_BASE = 1500.0, 2600.0, 700.0, 30.0
_ACTIN_CYTO, _ACTIN_CORTEX, _ACTIN_FIBRE, _ACTIN_RUFFLE = 330.0, 650.0, 700.0, 1100.0


@dataclass(frozen=True)
class Phenotype:
    """One morphology. Lengths in pixels; intensities and actin structures relative to the control."""

    name: str
    density: float = 40.0  # mean cells per 512 x 512 field
    colonies: float = 0.7  # fraction of cells growing in colonies; the rest are scattered
    colony_cells: float = 10.0  # mean cells per colony
    packing: float = 0.8  # closest centre distance / (sum of the two radii)
    cell_radius: float = 24.0
    cell_elongation: float = 1.25  # aspect ratio of the cell outline
    cell_irregularity: float = 0.07  # amplitude of low-order outline harmonics
    aligned: float = 0.0  # fraction of cells oriented along the field's flow direction
    nucleus_radius: float = 10.0
    nucleus_elongation: float = 1.2
    nucleus_irregularity: float = 0.03
    multinucleate: float = 0.0  # fraction of cells with 2-4 nuclei
    apoptotic: float = 0.01  # fraction of shrunken, blebbing cells with fragmented nuclei
    mitotic: float = 0.04  # fraction of rounded mitotic cells (condensed DNA, bright pH3)
    g2: float = 0.08  # fraction of interphase nuclei with pH3 foci
    dna: float = 1.0
    actin: float = 1.0
    cortical: float = 1.0
    fibres: float = 0.15
    ruffles: float = 0.0


_SPREAD = {
    "cell_radius": 42.0,
    "nucleus_radius": 12.0,
    "density": 11.0,
    "colonies": 0.1,
    "cell_irregularity": 0.16,
    "cortical": 0.5,
    "fibres": 0.35,
    "cell_elongation": 1.15,
}

PHENOTYPES: tuple[Phenotype, ...] = (
    Phenotype("control_colonies"),
    # subtle pair 1: same cells, denser
    Phenotype("confluent_colonies", density=72.0),
    Phenotype("mitotic_arrest", mitotic=0.38, density=48.0, g2=0.2),
    Phenotype("enlarged_nuclei_g2", nucleus_radius=14.5, cell_radius=31.0, density=26.0, g2=0.55, dna=1.1),
    Phenotype(
        "elongated_spindle",
        cell_elongation=2.8,
        nucleus_elongation=1.9,
        aligned=0.85,
        colonies=0.3,
        density=36.0,
        fibres=0.7,
        cortical=0.7,
    ),
    Phenotype("apoptotic_fragmented", apoptotic=0.5, density=44.0, colonies=0.4, cortical=1.3),
    Phenotype(
        "multinucleate_giant",
        multinucleate=0.65,
        cell_radius=30.0,
        density=20.0,
        colonies=0.3,
        cell_irregularity=0.1,
    ),
    Phenotype(
        "stress_fibres",
        fibres=1.7,
        cell_radius=34.0,
        density=21.0,
        colonies=0.2,
        cortical=0.6,
        cell_irregularity=0.14,
    ),
    Phenotype(
        "membrane_ruffles", ruffles=1.6, cell_radius=30.0, density=26.0, colonies=0.3, cell_irregularity=0.12
    ),
    Phenotype(
        "compact_colonies",
        cell_radius=17.0,
        nucleus_radius=8.0,
        density=95.0,
        colonies=0.97,
        colony_cells=22.0,
        packing=0.75,
        cortical=1.9,
        cell_elongation=1.1,
    ),
    Phenotype(
        "scattered_small",
        cell_radius=16.0,
        nucleus_radius=7.5,
        density=62.0,
        colonies=0.0,
        cell_elongation=1.1,
    ),
    Phenotype("spread_flat", **_SPREAD),
    # subtle pair 2: the same spread cells, stained fainter for actin
    Phenotype("spread_flat_dim_actin", actin=0.5, **_SPREAD),
    Phenotype("lobed_nuclei", nucleus_irregularity=0.24, nucleus_radius=11.0, nucleus_elongation=1.1),
)

# BBBC018-like plate positions: the 4-digit prefix of the well file names (e.g. 00733-DNA.DIB).
_SAMPLE_IDS = (
    "0073",
    "0093",
    "0113",
    "0133",
    "0253",
    "0273",
    "0293",
    "0313",
    "0433",
    "0453",
    "0473",
    "0493",
    "0613",
    "0633",
)


@dataclass
class SynthField:
    """One field of view: ``pixels`` (C, Y, X) uint16 in CHANNELS order, ``foreground`` (Y, X) true cells."""

    sample: str
    field: str
    phenotype: str
    pixels: np.ndarray
    foreground: np.ndarray
    defocus: float = 0.0  # sigma (px) of the defocus blur on this field; 0 when in focus


def sample_id(index: int) -> str:
    """4-digit BBBC018-like sample id of sample ``index`` (0..13), e.g. ``sample_id(0) == "0073"``."""
    if not 0 <= index < len(_SAMPLE_IDS):
        raise ValueError(f"sample index {index} outside 0..{len(_SAMPLE_IDS) - 1}")
    return _SAMPLE_IDS[index]


def _lognormal(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    return np.exp(sigma * rng.standard_normal(n))


# ---------------------------------------------------------------- cells and nuclei as parameters


@dataclass
class _Cells:
    """Per-cell parameters, all arrays of length n (harmonics (n, K))."""

    kind: np.ndarray
    n_nuclei: np.ndarray
    radius: np.ndarray
    y: np.ndarray
    x: np.ndarray
    angle: np.ndarray
    elongation: np.ndarray
    amp: np.ndarray
    phase: np.ndarray
    hf_amp: np.ndarray  # high-frequency outline term: blebs all round, ruffles at the leading edge
    hf_k: np.ndarray
    hf_phase: np.ndarray
    hf_focus: np.ndarray  # 0: all round the cell; > 0: concentrated around ``lead``
    lead: np.ndarray
    cyto: np.ndarray
    cortex: np.ndarray
    fibres: np.ndarray
    fibre_angle: np.ndarray
    fibre_period: np.ndarray
    fibre_phase: np.ndarray
    fibre_fan: np.ndarray
    ruffles: np.ndarray


@dataclass
class _Nuclei:
    y: np.ndarray
    x: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    angle: np.ndarray
    amp: np.ndarray
    phase: np.ndarray
    dna: np.ndarray
    texture: np.ndarray
    ph3: np.ndarray
    foci: np.ndarray


def _kinds_and_sizes(
    rng: np.random.Generator, ph: Phenotype, n: int, size_spread: float
) -> tuple[np.ndarray, ...]:
    """Cell kind, nucleus count and radius; multinucleate cells are larger, dividing ones round up small."""
    kind = rng.choice(3, size=n, p=[1.0 - ph.mitotic - ph.apoptotic, ph.mitotic, ph.apoptotic])
    multi = (rng.random(n) < ph.multinucleate) & (kind == _INTERPHASE)
    n_nuclei = np.where(multi, rng.integers(2, 5, n), 1)
    radius = ph.cell_radius * _lognormal(rng, n, size_spread) * np.sqrt(1.0 + 0.45 * (n_nuclei - 1))
    radius = radius * np.select([kind == _MITOTIC, kind == _APOPTOTIC], [0.62, 0.55], 1.0)
    return kind, n_nuclei, radius


def _touch(centres: np.ndarray, spread: float, share: float, art: np.random.Generator) -> None:
    """Move a ``share`` of the colony centres (n, 2) next to an earlier colony, in place, so that
    the two colonies grow into each other."""
    for j in range(1, len(centres)):
        if art.random() < share:
            heading = art.uniform(0, 2 * np.pi)
            centres[j] = centres[art.integers(j)] + 3.0 * spread * np.array([np.sin(heading), np.cos(heading)])


def _positions(
    rng: np.random.Generator,
    ph: Phenotype,
    radius: np.ndarray,
    extent: int,
    size: int,
    touching: tuple[float, np.random.Generator] | None = None,
) -> np.ndarray:
    """Centres (n, 2) with NaN rows for cells that found no room; colonies are Gaussian clumps.

    Colony centres and the first cell lie inside the field proper, so no field comes out empty;
    ``touching`` (share, stream) sets some colonies against others."""
    n, tries = len(radius), 40
    spacing = 2.0 * ph.packing * float(np.mean(radius))
    n_col = max(1, round(n * ph.colonies / ph.colony_cells))
    centres = rng.uniform(MARGIN, MARGIN + size, (n_col, 2))
    spread = 0.35 * spacing * np.sqrt(ph.colony_cells)
    if touching is not None:
        _touch(centres, spread, *touching)
    in_colony = rng.random(n) < ph.colonies
    which = rng.integers(0, n_col, n)
    near = centres[which][:, None, :] + spread * rng.standard_normal((n, tries, 2))
    anywhere = rng.uniform(0, extent, (n, tries, 2))
    anywhere[0] = rng.uniform(MARGIN, MARGIN + size, (tries, 2))
    in_colony[0] = False
    cand = np.where(in_colony[:, None, None], near, anywhere)
    placed = np.full((n, 2), np.nan)
    for i in range(n):
        ok = np.all((cand[i] >= 0) & (cand[i] < extent), axis=1)
        done = ~np.isnan(placed[:i, 0])
        if done.any():
            dist = np.linalg.norm(cand[i][:, None, :] - placed[:i][done][None], axis=2)
            ok &= np.all(dist > ph.packing * (radius[i] + radius[:i][done])[None], axis=1)
        hits = np.flatnonzero(ok)
        if hits.size and in_colony[i]:  # colonies grow compact: take the free spot nearest the centre
            gap = np.linalg.norm(cand[i, hits] - centres[which[i]], axis=1)
            placed[i] = cand[i, hits[np.argmin(gap)]]
        elif hits.size:
            placed[i] = cand[i, hits[0]]
    return placed


def _orientations(rng: np.random.Generator, ph: Phenotype, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cell angles: a fraction follows a smooth flow field (aligned streams), the rest are random."""
    base, wave = rng.uniform(0, np.pi), rng.uniform(0, np.pi)
    flow = base + 0.5 * np.sin((x * np.cos(wave) + y * np.sin(wave)) / 90.0 + rng.uniform(0, 2 * np.pi))
    follow = rng.random(len(y)) < ph.aligned
    return np.where(follow, flow + 0.2 * rng.standard_normal(len(y)), rng.uniform(0, np.pi, len(y)))


def _make_cells(
    rng: np.random.Generator, ph: Phenotype, extent: int, size: int, nz: Nuisances, art: np.random.Generator
) -> _Cells:
    """Draw the cells of one canvas: count, kinds, sizes, places, outlines and actin make-up."""
    expected = ph.density * extent * extent / _REF_AREA * np.exp(0.12 * rng.standard_normal())
    kind, n_nuclei, radius = _kinds_and_sizes(rng, ph, max(1, round(expected)), nz.size_spread)
    placed = _positions(rng, ph, radius, extent, size, (nz.touching, art) if nz.touching > 0 else None)
    keep = ~np.isnan(placed[:, 0])
    kind, n_nuclei, radius, (y, x) = kind[keep], n_nuclei[keep], radius[keep], placed[keep].T
    n, k = len(y), len(_CELL_K)
    interphase, mitotic, apoptotic = kind == _INTERPHASE, kind == _MITOTIC, kind == _APOPTOTIC
    angle = _orientations(rng, ph, y, x)
    elongation = np.where(interphase, ph.cell_elongation * _lognormal(rng, n, nz.shape_spread), 1.05)
    irregular = np.where(interphase, ph.cell_irregularity, 0.025)[:, None]
    amp = irregular * rng.standard_normal((n, k)) / np.sqrt(_CELL_K - 1.0)
    ruffles = np.where(interphase, ph.ruffles * _lognormal(rng, n, 0.25), 0.0)
    hf_amp = np.select([apoptotic, ruffles > 0], [0.11, 0.02 * ruffles], 0.015)
    return _Cells(
        kind=kind,
        n_nuclei=n_nuclei,
        radius=radius,
        y=y,
        x=x,
        angle=angle,
        elongation=elongation,
        amp=amp,
        phase=rng.uniform(0, 2 * np.pi, (n, k)),
        hf_amp=hf_amp,
        hf_k=np.where(apoptotic, 9.0, 14.0),
        hf_phase=rng.uniform(0, 2 * np.pi, n),
        hf_focus=np.where(ruffles > 0, 2.5, 0.0),
        lead=rng.uniform(0, 2 * np.pi, n),
        cyto=_lognormal(rng, n, 0.15) * np.select([mitotic, apoptotic], [1.3, 1.5], 1.0),
        cortex=ph.cortical * _lognormal(rng, n, 0.2) * np.select([mitotic, apoptotic], [2.2, 1.6], 1.0),
        fibres=np.where(interphase, ph.fibres * _lognormal(rng, n, 0.25), 0.0),
        fibre_angle=angle + 0.3 * rng.standard_normal(n),
        fibre_period=rng.uniform(5.0, 7.5, n),
        fibre_fan=rng.uniform(-0.35, 0.35, n) / radius,
        fibre_phase=rng.uniform(0, 2 * np.pi, n),
        ruffles=ruffles,
    )


class _Nucleus(NamedTuple):
    """One nucleus in its cell's frame: offsets and semi-axes in px, stains relative to the control."""

    dy: float
    dx: float
    ra: float
    rb: float
    turn: float = 0.0
    dna: float = 1.0
    texture: float = 0.15
    ph3: float = 0.0
    foci: float = 0.0


def _mitotic_chromatin(rng: np.random.Generator, ph: Phenotype, r: float) -> list[_Nucleus]:
    """Condensed, pH3-bright chromatin: a prometaphase ball, a metaphase plate or two anaphase plates."""
    stage = rng.choice(3, p=[0.3, 0.5, 0.2])
    bright = {"dna": 2.0 * ph.dna, "texture": 0.35, "ph3": 1.0}
    if stage == 0:
        return [_Nucleus(0.0, 0.0, 0.7 * r, 0.7 * r, **bright)]
    if stage == 1:
        return [_Nucleus(0.0, 0.0, 0.3 * r, 0.9 * r, **bright)]
    return [_Nucleus(0.0, side * 0.8 * r, 0.25 * r, 0.75 * r, **bright) for side in (-1.0, 1.0)]


def _nucleus_layout(
    rng: np.random.Generator, ph: Phenotype, kind: int, count: int, r: float
) -> list[_Nucleus]:
    """Nuclei of one cell of the given kind, ``count`` of them if interphase, mean radius ``r`` px."""
    if kind == _MITOTIC:
        return _mitotic_chromatin(rng, ph, r)
    if kind == _APOPTOTIC:  # chromatin broken into 3-7 bright fragments
        m = int(rng.integers(3, 8))
        rho = 0.8 * r * np.sqrt(rng.random(m))
        phi = rng.uniform(0, 2 * np.pi, m)
        size = r * rng.uniform(0.22, 0.38, m)
        frag = {"dna": 2.3 * ph.dna, "texture": 0.1, "ph3": 0.06}
        return [
            _Nucleus(a * np.sin(b), a * np.cos(b), c, c, **frag)
            for a, b, c in zip(rho, phi, size, strict=True)
        ]
    foci = float(rng.random() < ph.g2)
    dna = ph.dna * float(_lognormal(rng, 1, 0.12)[0])
    e = np.sqrt(ph.nucleus_elongation)
    if count == 1:
        dy, dx = 0.15 * r * rng.standard_normal(2)
        return [_Nucleus(dy, dx, r * e, r / e, 0.3 * rng.standard_normal(), dna, foci=foci)]
    out, turn = [], rng.uniform(0, 2 * np.pi)
    for j in range(count):  # a rosette of smaller nuclei around the cell centre
        phi = turn + 2 * np.pi * j / count + 0.3 * rng.standard_normal()
        rr = 0.8 * r * float(_lognormal(rng, 1, 0.1)[0])
        out.append(
            _Nucleus(
                0.95 * r * np.sin(phi),
                0.95 * r * np.cos(phi),
                rr * e,
                rr / e,
                rng.uniform(0, np.pi),
                dna,
                foci=foci,
            )
        )
    return out


def _make_nuclei(rng: np.random.Generator, ph: Phenotype, cells: _Cells) -> _Nuclei:
    """Nuclei of all cells, placed in each cell's frame (rotated with the cell)."""
    rows, owner = [], []
    radius = ph.nucleus_radius * _lognormal(rng, len(cells.y), 0.12)
    for i in range(len(cells.y)):
        layout = _nucleus_layout(rng, ph, int(cells.kind[i]), int(cells.n_nuclei[i]), float(radius[i]))
        rows += layout
        owner += [i] * len(layout)
    t = np.array(rows, dtype=np.float64).reshape(-1, len(_Nucleus._fields))
    own = np.array(owner, dtype=np.intp)
    c, s = np.cos(cells.angle[own]), np.sin(cells.angle[own])
    n, k = len(t), len(_NUC_K)
    irregular = np.where(cells.kind[own] == _MITOTIC, 0.12, ph.nucleus_irregularity)
    irregular = np.where(cells.kind[own] == _APOPTOTIC, 0.04, irregular)[:, None]
    return _Nuclei(
        y=cells.y[own] + t[:, 0] * c + t[:, 1] * s,
        x=cells.x[own] + t[:, 1] * c - t[:, 0] * s,
        ra=t[:, 2],
        rb=t[:, 3],
        angle=cells.angle[own] + t[:, 4],
        amp=irregular * rng.standard_normal((n, k)) / np.sqrt(_NUC_K - 1.0),
        phase=rng.uniform(0, 2 * np.pi, (n, k)),
        dna=t[:, 5],
        texture=t[:, 6],
        ph3=t[:, 7],
        foci=t[:, 8],
    )


# ---------------------------------------------------------------- geometry on the pixel grid


def _voronoi(extent: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(Y, X) index of the nearest seed for every pixel of an extent x extent canvas."""
    seeds = np.zeros((extent, extent), np.int32)
    iy = np.clip(np.round(y).astype(int), 0, extent - 1)
    ix = np.clip(np.round(x).astype(int), 0, extent - 1)
    seeds[iy, ix] = np.arange(1, len(y) + 1, dtype=np.int32)
    ry, rx = ndi.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    return seeds[ry, rx] - 1


def _polar(extent: int, owner: np.ndarray, y, x, ra, rb, angle) -> tuple[np.ndarray, ...]:
    """Per pixel, in its owner's frame: (du, dv) in px along/across the long axis, elliptic radius q
    (1 on the unperturbed outline) and polar angle."""
    grid = np.arange(extent, dtype=np.float32)
    dy = grid[:, None] - y.astype(np.float32)[owner]
    dx = grid[None, :] - x.astype(np.float32)[owner]
    c, s = np.cos(angle).astype(np.float32)[owner], np.sin(angle).astype(np.float32)[owner]
    du, dv = dx * c + dy * s, dy * c - dx * s
    u, v = du / ra.astype(np.float32)[owner], dv / rb.astype(np.float32)[owner]
    return du, dv, np.hypot(u, v), np.arctan2(v, u)


def _outline(
    theta: np.ndarray, owner: np.ndarray, ks: np.ndarray, amp: np.ndarray, phase: np.ndarray
) -> np.ndarray:
    """Outline radius (in units of the ellipse) at each pixel's angle: 1 + sum of harmonics."""
    bound = np.ones_like(theta)
    for j, k in enumerate(ks):
        wave = np.cos(np.float32(k) * theta + phase[:, j].astype(np.float32)[owner])
        bound += amp[:, j].astype(np.float32)[owner] * wave
    return np.maximum(bound, 0.35)


def _cell_geometry(extent: int, cells: _Cells) -> dict[str, np.ndarray]:
    """Cell ownership, soft body mask (1-px anti-aliased edge), normalised radius, angle, frame."""
    owner = _voronoi(extent, cells.y, cells.x)
    root = np.sqrt(cells.elongation)
    ra, rb = cells.radius * root, cells.radius / root
    du, dv, q, theta = _polar(extent, owner, cells.y, cells.x, ra, rb, cells.angle)
    bound = _outline(theta, owner, _CELL_K, cells.amp, cells.phase)
    near_lead = np.exp(
        cells.hf_focus.astype(np.float32)[owner]
        * (np.cos(theta - cells.lead.astype(np.float32)[owner]) - 1.0)
    )
    hf = cells.hf_amp.astype(np.float32)[owner] * np.cos(
        cells.hf_k.astype(np.float32)[owner] * theta + cells.hf_phase.astype(np.float32)[owner]
    )
    lamella = 0.15 * cells.ruffles.astype(np.float32)[owner] * near_lead  # ruffling cells spread at the front
    bound += hf * near_lead + lamella
    scale = np.sqrt(ra * rb).astype(np.float32)[owner]
    body = np.clip((bound - q) * scale + 0.5, 0.0, 1.0)
    return {
        "owner": owner,
        "body": body,
        "q": q / bound,
        "theta": theta,
        "du": du,
        "dv": dv,
        "near_lead": near_lead,
    }


def _junction_distance(owner: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel to the nearest cell outline or cell-cell junction."""
    lab = np.where(body > 0.5, owner + 1, 0)
    edge = np.zeros(lab.shape, bool)
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge &= lab > 0
    return ndi.distance_transform_edt(~edge).astype(np.float32)


def _nucleus_geometry(extent: int, nuclei: _Nuclei) -> dict[str, np.ndarray]:
    owner = _voronoi(extent, nuclei.y, nuclei.x)
    _, _, q, theta = _polar(extent, owner, nuclei.y, nuclei.x, nuclei.ra, nuclei.rb, nuclei.angle)
    bound = _outline(theta, owner, _NUC_K, nuclei.amp, nuclei.phase)
    scale = np.sqrt(nuclei.ra * nuclei.rb).astype(np.float32)[owner]
    body = np.clip((bound - q) * scale + 0.5, 0.0, 1.0)
    return {"owner": owner, "body": body, "q": np.minimum(q / bound, 1.0)}


# ---------------------------------------------------------------- stains


def _dna_ph3(
    nuc: dict[str, np.ndarray],
    nuclei: _Nuclei,
    cell_body: np.ndarray,
    chromatin: np.ndarray,
    speckle: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Hoechst: domed, textured nuclei. pH3: mitotic chromatin, G2 foci, faint non-specific cytoplasm."""
    own, body = nuc["owner"], nuc["body"]
    dome = 1.0 - 0.35 * nuc["q"] ** 2
    tex = 1.0 + nuclei.texture.astype(np.float32)[own] * chromatin
    dna = _DNA * body * nuclei.dna.astype(np.float32)[own] * dome * np.maximum(tex, 0.2)
    foci = np.maximum(speckle - 1.3, 0.0) * 3.0
    ph3 = body * (
        _PH3_MITOTIC * nuclei.ph3.astype(np.float32)[own] * np.maximum(tex, 0.2)
        + _PH3_FOCI * nuclei.foci.astype(np.float32)[own] * foci
    )
    return dna, ph3 + _PH3_BASE * cell_body


def _actin(
    geo: dict[str, np.ndarray],
    cells: _Cells,
    junction: np.ndarray,
    nuc_body: np.ndarray,
    mottle: np.ndarray,
    grain: np.ndarray,
) -> np.ndarray:
    """Phalloidin: cytoplasm thinning to the edge, cortical ring and junctions, stress fibres, ruffles."""
    own, body = geo["owner"], geo["body"]
    inner = np.clip(1.0 - geo["q"], 0.0, 1.0)
    cyto = _ACTIN_CYTO * cells.cyto.astype(np.float32)[own] * (0.55 + 0.45 * inner) * (1.0 + 0.25 * mottle)
    cyto *= 1.0 - 0.35 * nuc_body
    cortex = _ACTIN_CORTEX * cells.cortex.astype(np.float32)[own] * np.exp(-junction / 1.4)
    fa = cells.fibre_angle - cells.angle  # fibre direction in the cell frame
    along = geo["du"] * np.cos(fa).astype(np.float32)[own] + geo["dv"] * np.sin(fa).astype(np.float32)[own]
    across = geo["dv"] * np.cos(fa).astype(np.float32)[own] - geo["du"] * np.sin(fa).astype(np.float32)[own]
    across *= 1.0 + cells.fibre_fan.astype(np.float32)[own] * along  # fibres fan out towards one end
    stripes = np.cos(
        2 * np.pi * across / cells.fibre_period.astype(np.float32)[own]
        + cells.fibre_phase.astype(np.float32)[own]
    )
    # uneven brightness from fibre to fibre: a slower wave across the stripes
    bundles = 0.6 + 0.4 * np.cos(2 * np.pi * across / (2.7 * cells.fibre_period.astype(np.float32)[own]))
    fibres = np.maximum(stripes, 0.0) ** 8 * bundles * np.clip(0.7 + 0.6 * mottle, 0.0, 1.6)
    fibres *= _ACTIN_FIBRE * cells.fibres.astype(np.float32)[own] * (0.4 + 0.6 * (1.0 - inner))
    ruffle = np.exp(-junction / 6.0) * geo["near_lead"] * np.clip(0.5 + 0.8 * grain, 0.0, 2.0)
    ruffle *= _ACTIN_RUFFLE * cells.ruffles.astype(np.float32)[own]
    return body * (cyto + cortex + fibres + ruffle)


# ---------------------------------------------------------------- microscope


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """(Y, X) smooth vignetting times a linear gradient, 1 at the optical centre."""
    grid = np.arange(size, dtype=np.float32) - size / 2
    cy, cx = 0.12 * size * rng.standard_normal(2)
    fall, tilt, direction = rng.uniform(0.1, 0.35), rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)
    r2 = ((grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2) / (0.5 * size * size)
    ramp = (grid[None, :] * np.cos(direction) + grid[:, None] * np.sin(direction)) / (size / 2)
    return np.clip((1.0 - fall * r2) * (1.0 + tilt * ramp), 0.3, None).astype(np.float32)


def _haze(signal: np.ndarray) -> np.ndarray:
    """Out-of-focus glow, (C, Y, X) with Y, X multiples of 4: a wide blur computed at 1/4 scale."""
    c, h, w = signal.shape
    small = signal.reshape(c, h // 4, 4, w // 4, 4).mean(axis=(2, 4))
    small = ndi.gaussian_filter(small, (0, 2.5, 2.5), truncate=2.5)
    return np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)


def _microscope(
    rng: np.random.Generator,
    signal: np.ndarray,
    size: int,
    nz: Nuisances,
    art: np.random.Generator,
    dust: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """(C, Y, X) clean canvas (and debris on the coverslip, which casts no haze) -> (C, size, size)
    uint16 field and the defocus sigma used."""
    defocus = float(rng.uniform(1.5, 3.5)) if rng.random() < nz.defocus_rate else 0.0
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.95, 1.05, 3)
    # medium and plastic autofluorescence, lit like the cells: one level per well, similar in all channels
    background = rng.uniform(40.0, 100.0) * rng.uniform(0.85, 1.15, 3)
    offset = 100.0 + rng.uniform(-10.0, 10.0, 3)
    sigma = float(np.hypot(np.hypot(0.8, defocus), nz.blur))
    glow = signal + 0.12 * _haze(signal)
    if dust is not None:
        glow += dust
    image = ndi.gaussian_filter(glow, (0, sigma, sigma), truncate=3.0)
    if nz.tilt:
        image = focus_tilt(image, nz.tilt, nz.tilt_angle)
    image = image[:, MARGIN : MARGIN + size, MARGIN : MARGIN + size]
    if nz.texture:
        image += background[:, None, None].astype(np.float32) * texture(art, size, nz.texture)[None]
    else:
        image += background[:, None, None].astype(np.float32)
    light = _illumination(rng, size)[None]
    if any(nz.vignette):
        light = light * channel_vignette(size, nz.vignette)
    photons = image * light * gain[:, None, None].astype(np.float32)
    counts = rng.poisson(photons).astype(np.float32)
    counts += offset[:, None, None].astype(np.float32) + 6.0 * rng.standard_normal(counts.shape, np.float32)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16), defocus


# ---------------------------------------------------------------- public


def _field_rng(seed: int, sample_index: int, field_index: int) -> np.random.Generator:
    return np.random.default_rng([0x5EED, seed, sample_index, field_index])


def _with_nuisances(ph: Phenotype, nz: Nuisances) -> Phenotype:
    """The phenotype as this well shows it: the same biology at the well's density and cell size."""
    if nz.density == 1.0 and nz.size == 1.0:
        return ph
    return replace(
        ph,
        density=ph.density * nz.density,
        cell_radius=ph.cell_radius * nz.size,
        nucleus_radius=ph.nucleus_radius * nz.size,
    )


def _dust(shape: tuple[int, ...], nz: Nuisances, art: np.random.Generator) -> np.ndarray | None:
    """(C, Y, X) debris of the field (specks, fibres), or None when it has none."""
    if not (nz.specks or nz.fibres):
        return None
    canvas = np.zeros(shape, np.float32)
    debris(canvas, nz, art)
    return canvas


def synth_field(
    sample_index: int,
    field_index: int,
    seed: int = 0,
    size: int = 512,
    variation: str = "base",
    nuisances: Nuisances | None = None,
) -> SynthField:
    """One field of sample ``sample_index`` (phenotype ``PHENOTYPES[sample_index]``), field id
    ``str(field_index + 1)``, with the nuisances of level ``variation`` (base, dev or heldout).
    Pixels (C, Y, X) = (3, size, size) uint16; the same arguments give the same bits.

    ``nuisances``, when given, replace the drawn ones: the same cells under other optics, stain or
    debris (what ``benchmarks/bench_nuisance.py`` puts a trained encoder through)."""
    if not 0 <= sample_index < len(PHENOTYPES):
        raise ValueError(f"sample index {sample_index} outside 0..{len(PHENOTYPES) - 1}")
    if field_index < 0 or size < 16:
        raise ValueError(f"bad field index {field_index} or size {size} (need >= 0 and >= 16)")
    rng = _field_rng(seed, sample_index, field_index)
    nz = nuisances if nuisances is not None else draw_nuisances(seed, sample_index, field_index, variation)
    art = artefact_rng(seed, sample_index, field_index)
    ph = _with_nuisances(PHENOTYPES[sample_index], nz)
    extent = -(-(size + 2 * MARGIN) // 4) * 4  # a multiple of 4 for the haze; the excess is cropped
    cells = _make_cells(rng, ph, extent, size, nz, art)
    nuclei = _make_nuclei(rng, ph, cells)
    chromatin, speckle = _unit_noise(rng, (extent, extent), 1.2), _unit_noise(rng, (extent, extent), 1.0)
    mottle, grain = _unit_noise(rng, (extent, extent), 4.0), _unit_noise(rng, (extent, extent), 1.5)
    geo = _cell_geometry(extent, cells)
    nuc = _nucleus_geometry(extent, nuclei)
    junction = _junction_distance(geo["owner"], geo["body"])
    dna, ph3 = _dna_ph3(nuc, nuclei, geo["body"], chromatin, speckle)
    actin = ph.actin * _actin(geo, cells, junction, nuc["body"], mottle, grain)
    signal = np.stack([dna, ph3, actin])
    if nz.extra:
        signal *= np.asarray(nz.stain, np.float32)[:, None, None]
    pixels, defocus = _microscope(rng, signal, size, nz, art, _dust(signal.shape, nz, art))
    inside = slice(MARGIN, MARGIN + size)
    foreground = (np.maximum(geo["body"], nuc["body"]) > 0.5)[inside, inside]
    return SynthField(sample_id(sample_index), str(field_index + 1), ph.name, pixels, foreground, defocus)


def _field_task(args: tuple[int, int, int, int, str]) -> SynthField:
    return synth_field(*args)


def synth_screen(
    samples: int = 14, fields: int = 4, size: int = 512, seed: int = 0, workers: int = 1, variation: str = "base"
) -> Iterator[SynthField]:
    """Yield ``samples`` x ``fields`` fields in sample-major order (field ids "1".."N"), with the
    nuisances of level ``variation``.

    ``workers > 1`` renders in a process pool, a bounded number of fields ahead of the consumer;
    the fields are identical to ``workers=1``.
    """
    if not 1 <= samples <= len(PHENOTYPES) or fields < 1:
        raise ValueError(f"need 1..{len(PHENOTYPES)} samples and >= 1 field, got {samples} and {fields}")
    if variation not in LEVELS:
        raise ValueError(f"unknown variation level {variation!r}; choose one of {sorted(LEVELS)}")
    tasks = [(s, f, seed, size, variation) for s in range(samples) for f in range(fields)]
    if workers <= 1:
        yield from map(_field_task, tasks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[Future[SynthField]] = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_field_task, task))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def preview_rgb(pixels: np.ndarray) -> np.ndarray:
    """(3, Y, X) uint16 in CHANNELS order -> (Y, X, 3) uint8: actin red, pH3 green, DNA blue.

    Each channel is stretched from its 1st to 99.9th percentile, but never over less than 25 robust
    noise deviations, so a channel with nothing in it stays dark instead of showing amplified noise."""
    rgb = np.empty((*pixels.shape[1:], 3), np.uint8)
    for out, channel in zip((2, 1, 0), pixels.astype(np.float32), strict=True):
        lo, med, hi = np.percentile(channel, [1.0, 50.0, 99.9])
        noise = 1.4826 * np.median(np.abs(channel - med))
        top = max(hi, med + 25.0 * noise, lo + 1.0)
        rgb[..., out] = np.clip((channel - lo) / (top - lo) * 255.0, 0, 255).astype(np.uint8)
    return rgb
