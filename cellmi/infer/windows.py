"""Sliding-window geometry: pure functions of sizes and arrays (no I/O, no torch).

A field of shape (Y, X) is covered by square windows of edge ``window`` whose top-left corners
step by ``stride`` along each axis; the last window of each axis is flush with the field's edge,
so the windows cover the field edge to edge.

Exact shared-map inference needs every corner on the encoder's stride grid (a multiple of the
encoder stride). The flush last window breaks that grid when ``(size - window) % stride != 0``;
such windows are not dropped or moved: :func:`map_groups` puts every window in a group of
corners with the same offset modulo the encoder stride, and each group gets its own local map
over the bounding box of its windows (the bottom strip, the right strip, the corner). Every
window is then still cut from a map computed over pixels aligned with its own corner, so shared
and per-window encoding agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellmi.errors import UserError

__all__ = [
    "MapGroup",
    "axis_starts",
    "check_geometry",
    "foreground_fraction",
    "map_groups",
    "window_grid",
]


@dataclass(frozen=True)
class MapGroup:
    """Windows that share one local map.

    rows: (k,) indices into the corner array; box: (y0, x0, y1, x1) pixel box the map is computed
    over; cells: (k, 2) top-left (row, col) of each window in that map, in encoder-stride units.
    """

    rows: np.ndarray
    box: tuple[int, int, int, int]
    cells: np.ndarray


def check_geometry(window: int, stride: int, encoder_stride: int, shape: tuple[int, int]) -> None:
    """Refuse a window/stride that cannot be cut exactly from the local map, or that exceeds the field."""
    if window % encoder_stride:
        raise UserError(
            f"CELLMI_INFER__WINDOW (--infer.window): {window} is not a multiple of the encoder stride "
            f"{encoder_stride}; use e.g. {max(encoder_stride, window - window % encoder_stride)}"
        )
    if stride <= 0 or stride % encoder_stride:
        raise UserError(
            f"CELLMI_INFER__STRIDE (--infer.stride): {stride} is not a positive multiple of the encoder "
            f"stride {encoder_stride}; use e.g. {max(encoder_stride, stride - stride % encoder_stride)}"
        )
    if window > min(shape):
        raise UserError(
            f"CELLMI_INFER__WINDOW (--infer.window): window {window} is larger than the fields "
            f"({shape[0]}x{shape[1]} pixels)"
        )


def axis_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Window starts along one axis: 0, stride, 2*stride, ... and a last one flush with the edge."""
    if window > size:
        return np.zeros(0, np.int64)
    starts = np.arange(0, size - window + 1, stride, dtype=np.int64)
    if starts[-1] != size - window:
        starts = np.append(starts, size - window)
    return starts


def window_grid(shape: tuple[int, int], window: int, stride: int) -> np.ndarray:
    """Top-left corners (n, 2) as (y, x), row-major (y slowest), covering a (Y, X) field."""
    ys = axis_starts(shape[0], window, stride)
    xs = axis_starts(shape[1], window, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def foreground_fraction(mask: np.ndarray, corners: np.ndarray, window: int) -> np.ndarray:
    """Share of foreground pixels in each window: mask (Y, X) bool, corners (n, 2) -> (n,) float32."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    y0, x0 = corners[:, 0], corners[:, 1]
    y1, x1 = y0 + window, x0 + window
    counts = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return (counts / float(window * window)).astype(np.float32)


def map_groups(corners: np.ndarray, window: int, encoder_stride: int) -> list[MapGroup]:
    """Group corners (n, 2) by their offset modulo the encoder stride; one local map per group.

    Corners on the stride grid form one group whose box is their bounding box (the whole field
    when nothing was dropped); flush edge windows off the grid form the extra groups.
    """
    groups = []
    if len(corners) == 0:
        return groups
    offsets = corners % encoder_stride
    keys = offsets[:, 0] * encoder_stride + offsets[:, 1]
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        sub = corners[rows]
        y0, x0 = (int(v) for v in sub.min(axis=0))
        y1, x1 = (int(v) + window for v in sub.max(axis=0))
        cells = (sub - np.array([y0, x0])) // encoder_stride
        groups.append(MapGroup(rows=rows, box=(y0, x0, y1, x1), cells=cells))
    return groups
