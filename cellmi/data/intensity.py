"""Log intensities of one field, ready to be standardised with the store's statistics.

Two modes, chosen at ingest and recorded in the store:

``field`` (default)
    Each channel's background level (the median of its background pixels) is subtracted, and
    one log offset per field, the median over foreground pixels of the mean log signal across
    channels, is taken off every channel. A change of gain or exposure of the whole field
    cancels; ratios between channels (one stain dimmer than the others) and all spatial
    structure stay. An encoder trained on a few samples does not learn to ignore the gain of
    samples it never saw, so this is done to the pixels instead.
``store``
    log1p of the raw counts: every intensity difference between fields survives, the
    microscope's included.

The levels are measured on the whole field; a crop is normalised with its field's levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MODES", "Levels", "field_levels", "log_intensity"]

MODES = ("field", "store")
# Fewer background pixels than this give no stable median; a low percentile of the field stands in.
MIN_BACKGROUND = 1_000
LOW_PERCENTILE = 1.0


@dataclass(frozen=True)
class Levels:
    """What is taken off one field: ``background`` (C,) counts before the log, ``offset`` after it."""

    background: np.ndarray
    offset: float


def background_levels(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C, Y, X) raw, (Y, X) foreground -> (C,) float32 background level per channel."""
    flat = pixels.reshape(pixels.shape[0], -1)
    background = ~mask.reshape(-1)
    if background.sum() >= MIN_BACKGROUND:
        return np.median(flat[:, background], axis=1).astype(np.float32)
    return np.percentile(flat, LOW_PERCENTILE, axis=1).astype(np.float32)


def log_intensity(pixels: np.ndarray, levels: Levels) -> np.ndarray:
    """(C, ...) raw counts -> (C, ...) float32 ``log1p(max(x - background, 0)) - offset``."""
    background = levels.background.astype(np.float32).reshape((-1,) + (1,) * (pixels.ndim - 1))
    signal = pixels.astype(np.float32) - background
    logs = np.log1p(np.maximum(signal, 0.0))
    return logs - np.float32(levels.offset) if levels.offset else logs


def field_levels(pixels: np.ndarray, mask: np.ndarray, mode: str) -> Levels:
    """The levels of mode ``mode`` for one field: (C, Y, X) raw counts, (Y, X) foreground mask."""
    if mode == "store":
        return Levels(np.zeros(pixels.shape[0], np.float32), 0.0)
    if mode != "field":
        raise ValueError(f"intensity mode {mode!r} is not one of {MODES}")
    background = background_levels(pixels, mask)
    if not mask.any():
        return Levels(background, 0.0)
    logs = log_intensity(pixels[:, mask], Levels(background, 0.0))  # (C, K)
    return Levels(background, float(np.median(logs.mean(axis=0))))
