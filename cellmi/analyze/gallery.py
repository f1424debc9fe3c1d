"""Pixels behind the clusters: windows cut from the image store, colour composites, per-cluster traits.

Composites paint each channel in the store's display colour (NGFF omero ``color``, chosen at
ingest: :mod:`cellmi.colours`) and add them up. Every composite of one report shares the same
per-channel display range, so brightness differences between clusters are real intensity
differences.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from cellmi.colours import rgb
from cellmi.store import ImageStore

BRIGHT_SDS = 2.0  # a bright pixel: log intensity above the store's foreground mean + 2 std of its channel
MIN_OBJECT = 4  # pixels; smaller above-mean specks are noise, not objects


def cut_windows(
    store: ImageStore, requests: pd.DataFrame, window: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Crops for rows of ``requests`` (``sample, field, y, x``), in request order.

    Each field is read once. Returns per request the pixels (C, window, window) as stored, the
    foreground mask (window, window) bool and the standardised log intensities (C, window,
    window) float32 that the encoder sees (``ImageStore.normalise``).
    """
    crops: list[np.ndarray | None] = [None] * len(requests)
    masks: list[np.ndarray | None] = [None] * len(requests)
    normal: list[np.ndarray | None] = [None] * len(requests)
    positions = np.arange(len(requests))
    for (sample, field), group in requests.assign(_pos=positions).groupby(["sample", "field"], sort=True):
        pixels = store.read_image(str(sample), str(field))
        mask = store.read_mask(str(sample), str(field))
        scaled = store.normalise(pixels, mask)
        for pos, y, x in zip(group["_pos"], group["y"], group["x"], strict=True):
            cut = np.s_[y : y + window, x : x + window]
            crops[pos], masks[pos], normal[pos] = pixels[(slice(None), *cut)], mask[cut], scaled[(slice(None), *cut)]
    return crops, masks, normal  # type: ignore[return-value]


def display_range(crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (C,) low and high display limits of log1p intensities over all crops (C, H, W)."""
    stacked = np.log1p(np.concatenate([c.reshape(c.shape[0], -1) for c in crops], axis=1).astype(np.float32))
    low, high = np.percentile(stacked, 1.0, axis=1), np.percentile(stacked, 99.8, axis=1)
    return low, np.maximum(high, low + 1e-3)


def composite(crop: np.ndarray, colours: list[str], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(C, H, W) pixels -> (H, W, 3) uint8 RGB: each channel in its ``RRGGBB`` colour, added, clipped."""
    values = (np.log1p(crop.astype(np.float32)) - low[:, None, None]) / (high - low)[:, None, None]
    weights = np.array([rgb(c) for c in colours], np.float32)  # (C, 3)
    mixed = np.tensordot(np.clip(values, 0, 1), weights, axes=([0], [0]))  # (H, W, 3)
    return (np.clip(mixed, 0, 1) * 255).round().astype(np.uint8)


def thumbnail(image: np.ndarray, edge: int) -> np.ndarray:
    """(H, W, 3) uint8 shrunk by area averaging so that its height is at most ``edge``."""
    h, w = image.shape[:2]
    if h <= edge:
        return image
    size = (max(1, round(w * edge / h)), edge)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def strip_png(images: list[np.ndarray], gap: int = 2, edge: int = 128) -> bytes:
    """(H, W, 3) uint8 images, each at most ``edge`` pixels tall, side by side with white gaps, as PNG bytes."""
    images = [thumbnail(i, edge) for i in images] or [np.zeros((8, 8, 3), np.uint8)]
    h = max(i.shape[0] for i in images)
    canvas = np.full((h, sum(i.shape[1] for i in images) + gap * (len(images) - 1), 3), 255, np.uint8)
    x = 0
    for img in images:
        canvas[: img.shape[0], x : x + img.shape[1]] = img
        x += img.shape[1] + gap
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def object_size(above: np.ndarray) -> float:
    """Mean area in pixels of the connected regions of a (H, W) bool image; NaN when there are none."""
    regions, count = ndimage.label(above)
    areas = np.bincount(regions.ravel())[1:]
    areas = areas[areas >= MIN_OBJECT]
    return float(areas.mean()) if count and areas.size else float("nan")


def window_traits(scaled: list[np.ndarray], masks: list[np.ndarray], channels: list[str]) -> pd.DataFrame:
    """One row per window, measured on its standardised log intensities (C, H, W) and mask (H, W).

    Columns: ``fg_fraction``; per channel ``intensity_<name>`` (mean over foreground, in SDs of
    the store's training foreground), ``bright_area_<name>`` (share of the window above
    ``BRIGHT_SDS``) and ``object_size_<name>`` (mean area in pixels of the foreground regions
    brighter than that channel's store mean).
    """
    rows = []
    for values, mask in zip(scaled, masks, strict=True):
        row = {"fg_fraction": float(mask.mean())}
        for c, name in enumerate(channels):
            row[f"intensity_{name}"] = float(values[c][mask].mean()) if mask.any() else float("nan")
            row[f"bright_area_{name}"] = float((values[c] > BRIGHT_SDS).mean())
            row[f"object_size_{name}"] = object_size((values[c] > 0) & mask)
        rows.append(row)
    return pd.DataFrame(rows)


def cluster_traits(
    labels: np.ndarray, samples: np.ndarray, fg_fraction: np.ndarray, sampled: pd.DataFrame
) -> pd.DataFrame:
    """Per cluster: size, share, main sample, mean foreground fraction, and sampled pixel traits.

    ``labels``, ``samples`` and ``fg_fraction`` are (N,) over all windows; ``sampled`` has a
    ``cluster`` column and the columns of ``window_traits`` for a sample of windows.
    """
    frame = pd.DataFrame({"cluster": labels, "sample": samples, "fg": fg_fraction})
    rows = []
    for k, group in frame.groupby("cluster", sort=True):
        top = group["sample"].value_counts()
        row = {
            "cluster": int(k),
            "windows": len(group),
            "share": len(group) / len(frame),
            "main_sample": str(top.index[0]),
            "main_sample_share": float(top.iloc[0] / len(group)),
            "fg_fraction": float(group["fg"].mean()),
        }
        picked = sampled[sampled["cluster"] == k].drop(columns=["cluster", "fg_fraction"], errors="ignore")
        row.update(
            {name: float(picked[name].mean()) if len(picked) else float("nan") for name in picked.columns}
        )
        rows.append(row)
    return pd.DataFrame(rows)
