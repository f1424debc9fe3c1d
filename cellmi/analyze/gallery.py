"""Pixels behind the clusters: windows cut from the image store, RGB composites, per-cluster traits.

Composites show DNA in blue, pH3 in green and actin in red (other channels take the remaining
colours in order). Every composite of one report shares the same per-channel display range, so
brightness differences between clusters are real intensity differences.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from cellmi.data.intensity import Levels, log_intensity
from cellmi.store import ImageStore

CHANNEL_COLOURS = {"DNA": 2, "pH3": 1, "actin": 0}  # index into (R, G, B)
PH3 = "pH3"
PH3_SIGMAS = 2.0  # pH3-positive: log intensity above the data set's foreground mean + 2 std


def cut_windows(
    store: ImageStore, requests: pd.DataFrame, window: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[Levels]]:
    """Crops for rows of ``requests`` (``sample, field, y, x``), in request order.

    Each field is read once. Returns pixels (C, window, window) uint16, masks (window, window)
    bool and the intensity levels of the crop's field, per request.
    """
    crops: list[np.ndarray | None] = [None] * len(requests)
    masks: list[np.ndarray | None] = [None] * len(requests)
    levels: list[Levels | None] = [None] * len(requests)
    positions = np.arange(len(requests))
    for (sample, field), group in requests.assign(_pos=positions).groupby(["sample", "field"], sort=True):
        pixels = store.read_image(str(sample), str(field))
        mask = store.read_mask(str(sample), str(field))
        level = store.levels(pixels, mask)
        for pos, y, x in zip(group["_pos"], group["y"], group["x"], strict=True):
            crops[pos] = pixels[:, y : y + window, x : x + window]
            masks[pos] = mask[y : y + window, x : x + window]
            levels[pos] = level
    return crops, masks, levels  # type: ignore[return-value]


def colour_slots(channels: list[str]) -> list[int]:
    """RGB slot (0 red, 1 green, 2 blue) of each channel; unnamed channels fill the free slots."""
    free = [s for s in (0, 1, 2) if s not in {CHANNEL_COLOURS.get(c) for c in channels}]
    slots = []
    for name in channels:
        if name in CHANNEL_COLOURS:
            slots.append(CHANNEL_COLOURS[name])
        else:
            slots.append(free.pop(0) if free else -1)
    return slots


def display_range(crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (C,) low and high display limits of log1p intensities over all crops (C, H, W)."""
    stacked = np.log1p(np.concatenate([c.reshape(c.shape[0], -1) for c in crops], axis=1).astype(np.float32))
    low, high = np.percentile(stacked, 1.0, axis=1), np.percentile(stacked, 99.8, axis=1)
    return low, np.maximum(high, low + 1e-3)


def composite(crop: np.ndarray, slots: list[int], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(C, H, W) uint16 -> (H, W, 3) uint8 RGB with the given per-channel display limits."""
    values = (np.log1p(crop.astype(np.float32)) - low[:, None, None]) / (high - low)[:, None, None]
    values = np.clip(values, 0, 1)
    rgb = np.zeros((*crop.shape[1:], 3), np.float32)
    for c, slot in enumerate(slots):
        if slot >= 0:
            rgb[..., slot] = np.maximum(rgb[..., slot], values[c])
    return (rgb * 255).round().astype(np.uint8)


def strip_png(images: list[np.ndarray], gap: int = 2) -> bytes:
    """(H, W, 3) uint8 images side by side with white gaps, as PNG bytes."""
    if not images:
        images = [np.zeros((8, 8, 3), np.uint8)]
    h = max(i.shape[0] for i in images)
    canvas = np.full((h, sum(i.shape[1] for i in images) + gap * (len(images) - 1), 3), 255, np.uint8)
    x = 0
    for img in images:
        canvas[: img.shape[0], x : x + img.shape[1]] = img
        x += img.shape[1] + gap
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def window_traits(
    crops: list[np.ndarray],
    masks: list[np.ndarray],
    levels: list[Levels],
    channels: list[str],
    stats: dict[str, list[float]],
) -> pd.DataFrame:
    """One row per crop: foreground fraction, mean foreground intensity per channel, pH3-positive area.

    ``levels`` are each crop's field levels and ``stats`` the store's per-channel ``mean``/``std``
    of the resulting log intensities over foreground; the pH3-positive area is the share of
    window pixels above mean + 2 std of pH3.
    """
    rows = []
    ph3 = channels.index(PH3) if PH3 in channels else None
    for crop, mask, level in zip(crops, masks, levels, strict=True):
        row = {"fg_fraction": float(mask.mean())}
        for c, name in enumerate(channels):
            row[f"intensity_{name}"] = float(crop[c][mask].mean()) if mask.any() else float("nan")
        if ph3 is not None and stats.get("mean"):
            cut = stats["mean"][ph3] + PH3_SIGMAS * stats["std"][ph3]
            logs = log_intensity(crop[ph3 : ph3 + 1], level.channel(ph3))[0]
            row["ph3_positive_area"] = float((logs > cut).mean())
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
