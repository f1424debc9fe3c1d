"""Log intensities of one field, ready to be standardised with the store's statistics.

Two modes, chosen at ingest and recorded in the store:

``field`` (default)
    Per field: each channel's background level (the median of its background pixels) is
    subtracted; the signal is divided by the field's scale, ``exp(offset)`` with ``offset`` the
    median over foreground pixels of the channel-mean ``log1p`` signal; then
    ``log(signal + pedestal_c)``, the pedestal being one number per channel for the whole store
    (the median over training fields of background / scale). A change of gain or exposure of a
    whole field cancels; channel ratios (one stain dimmer than the others) and spatial structure
    stay; and the pedestal keeps camera noise near zero signal from being blown up by the log.
    An encoder trained on a few samples does not learn to ignore the gain of samples it never
    saw, so this is done to the pixels instead.
``store``
    ``log1p`` of the raw counts: every intensity difference between fields survives, the
    microscope's included.

The levels are measured on the whole field; a crop is normalised with its field's levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MODES", "Levels", "field_levels", "log_intensity", "store_pedestal"]

MODES = ("field", "store")
# Fewer background pixels than this give no stable median; a low percentile of the field stands in.
MIN_BACKGROUND = 1_000
LOW_PERCENTILE = 1.0


@dataclass(frozen=True)
class Levels:
    """What normalises one field: ``background`` (C,) counts off each channel, ``offset`` the log
    of the field's scale, ``pedestal`` (C,) the store's floor under the scaled signal (None in
    ``store`` mode: plain log1p)."""

    background: np.ndarray
    offset: float
    pedestal: np.ndarray | None = None

    def channel(self, index: int) -> Levels:
        """The levels of one channel, for (1, ...) arrays."""
        pedestal = None if self.pedestal is None else self.pedestal[index : index + 1]
        return Levels(self.background[index : index + 1], self.offset, pedestal)


def background_levels(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(C, Y, X) raw, (Y, X) foreground -> (C,) float32 background level per channel."""
    flat = pixels.reshape(pixels.shape[0], -1)
    background = ~mask.reshape(-1)
    if background.sum() >= MIN_BACKGROUND:
        return np.median(flat[:, background], axis=1).astype(np.float32)
    return np.percentile(flat, LOW_PERCENTILE, axis=1).astype(np.float32)


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(values, np.float32).reshape((-1,) + (1,) * (ndim - 1))


def _signal(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(C, ...) raw counts -> (C, ...) float32 counts above each channel's background (none below 0)."""
    return np.maximum(pixels.astype(np.float32) - _per_channel(background, pixels.ndim), 0.0)


def log_intensity(pixels: np.ndarray, levels: Levels) -> np.ndarray:
    """(C, ...) raw counts -> (C, ...) float32 log intensities (see the module docstring)."""
    if levels.pedestal is None:
        return np.log1p(pixels.astype(np.float32))
    signal = _signal(pixels, levels.background) * np.float32(np.exp(-levels.offset))
    return np.log(signal + _per_channel(levels.pedestal, pixels.ndim))


def field_levels(
    pixels: np.ndarray, mask: np.ndarray, mode: str, pedestal: Sequence[float] | None = None
) -> Levels:
    """The levels of mode ``mode`` for one field: (C, Y, X) raw counts, (Y, X) foreground mask.

    ``pedestal`` is the store's (``store_pedestal``); leave it out while it is being measured.
    """
    if mode == "store":
        return Levels(np.zeros(pixels.shape[0], np.float32), 0.0)
    if mode != "field":
        raise ValueError(f"intensity mode {mode!r} is not one of {MODES}")
    background = background_levels(pixels, mask)
    offset = 0.0
    if mask.any():
        offset = float(np.median(np.log1p(_signal(pixels[:, mask], background)).mean(axis=0)))
    return Levels(background, offset, None if pedestal is None else np.asarray(pedestal, np.float32))


def store_pedestal(levels: Sequence[Levels]) -> np.ndarray:
    """(C,) pedestal of a store: the median over (training) fields of background / scale, the
    background taken as at least one count (a camera without offset still has noise)."""
    if not levels:
        raise ValueError("no fields to measure the pedestal on")
    floors = np.stack([np.maximum(lv.background, 1.0) * np.exp(-lv.offset) for lv in levels])
    return np.median(floors, axis=0).astype(np.float32)
