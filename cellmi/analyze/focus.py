"""Image QC: a per-field focus score, so defocused fields are flagged in the image table.

Defocus removes fine detail before coarse detail, so the ratio of Laplacian-of-Gaussian energy at
a fine scale to that at a coarse scale drops on a blurred field. On the store's log intensities a
per-field gain is an additive constant, which the Laplacian removes: the score does not depend on
gain or offset. It is measured on the first channel (the nuclear stain in BBBC018: small, sharp
objects) over foreground pixels. A field scoring below a fraction of the median field of its split
is flagged as blurred, like CellProfiler's image-quality flags. With Ward linkage flagged fields
are best left out when the field clusters are fitted (``cluster.fit_blurred``); the spectral
graph links them to their own sample's fields anyway.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from cellmi.store import ImageStore

FINE_SIGMA, COARSE_SIGMA = 1.0, 3.0


def focus_score(channel: np.ndarray, mask: np.ndarray) -> float:
    """(Y, X) log-intensity channel and foreground mask -> fine-to-coarse LoG variance ratio.

    NaN for a field without foreground.
    """
    if not mask.any():
        return float("nan")
    channel = np.asarray(channel, np.float32)
    fine = ndi.gaussian_laplace(channel, FINE_SIGMA)[mask].var()
    coarse = ndi.gaussian_laplace(channel, COARSE_SIGMA)[mask].var()
    return float(fine / coarse) if coarse > 0 else float("nan")


def field_focus(store: ImageStore, fields: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Focus score of each (sample, field) of the store."""
    scores = {}
    for sample, field in fields:
        # log intensities; the ratio ignores the data-set standardisation (an affine map)
        first = np.log1p(store.read_channel(sample, field, 0).astype(np.float32))
        scores[(sample, field)] = focus_score(first, store.read_mask(sample, field))
    return scores


def sharp_fields(scores: np.ndarray, fraction: float, least: int) -> np.ndarray:
    """(M,) focus scores -> (M,) bool, True for fields scoring at least ``fraction`` of the median.

    Every field counts as sharp when ``fraction`` is 0, or when fewer than ``least`` would (a split
    that is mostly blurred is not worth clustering on its few sharp fields alone).
    """
    scores = np.asarray(scores, np.float64)
    if fraction <= 0 or not np.isfinite(scores).any():
        return np.ones(len(scores), bool)
    sharp = ~(scores < fraction * np.nanmedian(scores))  # NaN (no foreground) counts as sharp
    return sharp if sharp.sum() >= least else np.ones(len(scores), bool)
