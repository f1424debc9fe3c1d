"""Hand-crafted window features, the second baseline: intensity statistics and simple texture.

Per channel, in this order: mean, std and 5th/50th/95th percentiles of the raw pixels and of the
normalised pixels (percentiles as order statistics, numpy's method "lower"), the mean normalised
intensity over the window's foreground, the gradient energy (mean squared finite difference) and
the variance of the 4-neighbour Laplacian of the normalised pixels; then the window's foreground
fraction. Texture is computed inside the window
only, so a window's features do not depend on its neighbours.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PERCENTILES", "feature_names", "window_features"]

PERCENTILES = (5, 50, 95)
_STATS = ("mean", "std", *(f"p{q:02d}" for q in PERCENTILES))
_PER_CHANNEL = (
    *(f"raw_{s}" for s in _STATS),
    *(f"norm_{s}" for s in _STATS),
    "fg_norm_mean",
    "grad_energy",
    "lap_var",
)


def feature_names(channels: list[str]) -> list[str]:
    """Column names of :func:`window_features` for these channels."""
    return [f"{ch}_{name}" for ch in channels for name in _PER_CHANNEL] + ["fg_fraction"]


def _box_means(values: np.ndarray, corners: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mean of values (C, H, W) over the box [y, y+height) x [x, x+width) at each corner -> (n, C).

    A summed-area table per channel; values are centred first so the float64 sums stay exact enough.
    """
    centre = values.mean(axis=(1, 2), keepdims=True)
    table = np.zeros((values.shape[0], values.shape[1] + 1, values.shape[2] + 1), np.float64)
    inner = table[:, 1:, 1:]
    np.subtract(values, centre, out=inner)
    np.cumsum(inner, axis=1, out=inner)
    np.cumsum(inner, axis=2, out=inner)
    y0, x0 = corners[:, 0], corners[:, 1]
    y1, x1 = y0 + height, x0 + width
    sums = table[:, y1, x1] - table[:, y0, x1] - table[:, y1, x0] + table[:, y0, x0]
    return (sums / (height * width) + centre[:, 0]).T


def _moments(values: np.ndarray, corners: np.ndarray, window: int) -> np.ndarray:
    """(C, Y, X) -> (n, C, 2): mean and std over each window."""
    values = values.astype(np.float64)
    mean = _box_means(values, corners, window, window)
    square = _box_means(values**2, corners, window, window)
    return np.stack([mean, np.sqrt(np.maximum(square - mean**2, 0))], axis=2)


def _texture(norm: np.ndarray, corners: np.ndarray, window: int) -> np.ndarray:
    """(C, Y, X) -> (n, C, 2): gradient energy and Laplacian variance, from pixels inside each window."""
    norm = norm.astype(np.float64)
    w = window
    energy = _box_means(np.diff(norm, axis=1) ** 2, corners, w - 1, w)
    energy += _box_means(np.diff(norm, axis=2) ** 2, corners, w, w - 1)
    lap = (
        norm[:, :-2, 1:-1]
        + norm[:, 2:, 1:-1]
        + norm[:, 1:-1, :-2]
        + norm[:, 1:-1, 2:]
        - 4 * norm[:, 1:-1, 1:-1]
    )
    lap_mean = _box_means(lap, corners, w - 2, w - 2)
    lap_var = _box_means(lap**2, corners, w - 2, w - 2) - lap_mean**2
    return np.stack([energy, np.maximum(lap_var, 0)], axis=2)


def _fg_mean(norm: np.ndarray, mask: np.ndarray, corners: np.ndarray, window: int) -> np.ndarray:
    """(n, C) mean normalised intensity over each window's foreground; 0 where there is none."""
    count = _box_means(mask[None].astype(np.float64), corners, window, window)
    total = _box_means(norm * mask, corners, window, window)
    return np.where(count > 0.5 / window**2, total / np.maximum(count, 1e-12), 0.0)


def _percentiles(raw: np.ndarray, norm: np.ndarray, corners: np.ndarray, window: int) -> np.ndarray:
    """(n, C, 2, len(PERCENTILES)): order statistics (numpy's method "lower") of raw and normalised pixels.

    The normalisation is a monotone function of each pixel's raw value per channel, so a raw order
    statistic's normalised value is that of any pixel with the same raw value (a lookup table).
    ``np.partition`` (unlike ``argpartition``) lets other threads run: fields are prepared on
    several threads in a GPU task.
    """
    c, n_px = raw.shape[0], window * window
    kth = [int(q / 100 * (n_px - 1)) for q in PERCENTILES]
    windows = np.stack([raw[:, y : y + window, x : x + window].reshape(c, -1) for y, x in corners])
    raw_stats = np.partition(windows, kth, axis=2)[:, :, kth]  # (n, C, len(PERCENTILES))
    lookup = np.zeros((c, int(raw.max()) + 1), np.float32)
    for channel in range(c):
        lookup[channel, raw[channel].ravel()] = norm[channel].ravel()
        if not np.array_equal(lookup[channel, raw[channel]], norm[channel]):
            raise ValueError("normalised pixels are not a function of the raw ones (per channel)")
    out = np.zeros((len(corners), c, 2, len(PERCENTILES)))
    out[:, :, 0] = raw_stats
    out[:, :, 1] = lookup[np.arange(c)[None, :, None], raw_stats]
    return out


def window_features(
    raw: np.ndarray, norm: np.ndarray, mask: np.ndarray, corners: np.ndarray, window: int
) -> np.ndarray:
    """Features of each window.

    raw (C, Y, X) uint16, norm (C, Y, X) float32, mask (Y, X) bool, corners (n, 2) as (y, x)
    -> (n, K) float32 with K = len(feature_names(channels)).
    """
    n, c = len(corners), raw.shape[0]
    if n == 0:
        return np.zeros((0, c * len(_PER_CHANNEL) + 1), np.float32)
    pct = _percentiles(raw, norm, corners, window)
    per_channel = np.concatenate(
        [
            _moments(raw, corners, window),
            pct[:, :, 0],
            _moments(norm, corners, window),
            pct[:, :, 1],
            _fg_mean(norm, mask, corners, window)[:, :, None],
            _texture(norm, corners, window),
        ],
        axis=2,
    )  # (n, C, features per channel)
    fg = _box_means(mask[None].astype(np.float64), corners, window, window)
    return np.concatenate([per_channel.reshape(n, -1), fg], axis=1).astype(np.float32)
