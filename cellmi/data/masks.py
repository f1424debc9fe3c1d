"""Foreground masks: a per-image two-class Gaussian mixture on log intensities.

The mask decides which crops train the model and which windows are clustered; it never alters
the pixels the encoder sees.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.mixture import GaussianMixture


def combined_log_intensity(pixels: np.ndarray) -> np.ndarray:
    """(C, Y, X) -> (Y, X): mean over channels of log intensities scaled to a robust [0, 1] range."""
    logs = np.log1p(pixels.astype(np.float32))
    lo = np.percentile(logs, 1, axis=(1, 2), keepdims=True)
    hi = np.percentile(logs, 99.5, axis=(1, 2), keepdims=True)
    scaled = (logs - lo) / np.maximum(hi - lo, 1e-6)
    return ndimage.gaussian_filter(scaled.mean(axis=0), sigma=1.0)


def foreground_mask(pixels: np.ndarray, n_pixels: int = 40_000, seed: int = 0,
                    min_object: int = 30) -> np.ndarray:
    """Foreground of one field, (C, Y, X) -> (Y, X) bool.

    A two-component Gaussian mixture is fitted to a seeded pixel subsample of the combined log
    intensity; the component with the brighter mean is foreground. Light clean-up follows:
    opening, hole filling and removal of objects under ``min_object`` pixels.
    """
    signal = combined_log_intensity(pixels)
    values = signal.reshape(-1, 1)
    rng = np.random.default_rng(seed)
    take = rng.choice(values.shape[0], size=min(n_pixels, values.shape[0]), replace=False)
    gmm = GaussianMixture(n_components=2, covariance_type="tied", random_state=seed, n_init=1)
    gmm.fit(values[take])
    bright = int(np.argmax(gmm.means_[:, 0]))
    mask = (gmm.predict(values) == bright).reshape(signal.shape)
    return clean_mask(mask, min_object)


def clean_mask(mask: np.ndarray, min_object: int = 30) -> np.ndarray:
    """Opening, hole filling and removal of small objects on a (Y, X) bool mask."""
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_object
        keep[0] = False
        mask = keep[labels]
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
