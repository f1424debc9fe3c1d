"""Cluster maps for napari: each field's window clusters painted onto its pixel grid.

``cellmi cluster`` writes ``{workdir}/analysis/maps.zarr``, an OME-Zarr (NGFF 0.5) with one
image per clustered field::

    maps.zarr/{sample}_{field}/           NGFF image (c, y, x): the field's channels, store colours
      labels/clusters/                    (y, x) uint16: 0 where no window was kept, else cluster + 1
      labels/foreground/                  (y, x) uint8: the store's foreground mask

The maps live beside the other results, not in the image store: the store is the input of
every job (and may be shared, read-only, or on another bucket), and NGFF labels must sit under
the image they label, so the map holds its own copy of the field's pixels.

Windows overlap when the stride is below the window: each pixel takes the cluster of the kept
window that covers it and whose centre is nearest (the first such window in table order on a
tie); a pixel that no kept window covers is 0.

    napari --plugin napari-ome-zarr {workdir}/analysis/maps.zarr/{sample}_{field}

Each map copies its field's pixels (about 55 ms a field), so a large screen gets maps for at most
``cluster.maps_max_fields`` fields: every sample's first field, then every sample's second, and so
on, so that each sample is shown.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import zarr

from cellmi.analyze.figures import cluster_palette
from cellmi.log import log
from cellmi.store import (
    MASK_COLOURS,
    MASK_NAME,
    NGFF_VERSION,
    ImageStore,
    image_name,
    join,
    remove,
    write_ngff_image,
    write_ngff_labels,
    zarr_store,
)
from cellmi.watchdog import waiting

MAPS = "maps.zarr"
CLUSTERS = "clusters"


def paint(shape: tuple[int, int], corners: np.ndarray, window: int, clusters: np.ndarray) -> np.ndarray:
    """Label image (Y, X) uint16 of windows: ``cluster + 1`` of the nearest-centred covering window, else 0.

    ``corners`` are the (N, 2) top-left ``(y, x)`` of square windows of edge ``window``;
    ``clusters`` their (N,) cluster ids (0-based).
    """
    painted = np.zeros(shape, np.uint16)
    best = np.full(shape, np.iinfo(np.int64).max, np.int64)
    offsets = 2 * np.arange(window) - (window - 1)  # twice the distance from the centre: integers
    dist = offsets[:, None] ** 2 + offsets[None, :] ** 2
    for (y, x), k in zip(corners, clusters, strict=True):
        h, w = min(window, shape[0] - y), min(window, shape[1] - x)
        here = np.s_[y : y + h, x : x + w]
        closer = dist[:h, :w] < best[here]
        best[here] = np.where(closer, dist[:h, :w], best[here])
        painted[here] = np.where(closer, k + 1, painted[here])
    return painted


def label_colours(n_clusters: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """NGFF ``image-label`` colours and properties of ``n_clusters`` clusters (label value = cluster + 1)."""
    colours = [
        {"label-value": k + 1, "rgba": [round(255 * v) for v in colour]}
        for k, colour in enumerate(cluster_palette(n_clusters))
    ]
    properties = [{"label-value": k + 1, "cluster": k} for k in range(n_clusters)]
    return colours, properties


def shown_fields(fields: pd.DataFrame, most: int) -> pd.DataFrame:
    """At most ``most`` (0: all) of the distinct ``sample, field`` rows, taken a field of every sample
    in turn (each sample's fields in order), in sample, field order."""
    fields = fields.drop_duplicates().sort_values(["sample", "field"], ignore_index=True)
    if not most or len(fields) <= most:
        return fields
    turn = fields.groupby("sample", sort=False).cumcount()
    chosen = fields.assign(turn=turn).sort_values(["turn", "sample"], kind="stable").head(most)
    return chosen.drop(columns="turn").sort_values(["sample", "field"], ignore_index=True)


def write_maps(
    url: str,
    store: ImageStore,
    windows: pd.DataFrame,
    window: int,
    n_clusters: int,
    chunk: int = 256,
    max_fields: int = 0,
) -> list[str]:
    """Write ``maps.zarr`` at ``url`` (replacing one there) for the fields of ``windows``, at most
    ``max_fields`` of them (0: every one; see ``shown_fields``).

    ``windows`` has one row per kept window: ``sample, field, y, x, cluster``. Returns the image
    names written (``{sample}_{field}``).
    """
    remove(url)
    root = zarr.open_group(zarr_store(url), mode="w", zarr_format=3)
    colours, properties = label_colours(n_clusters)
    channel_colours = store.channel_colours()
    shown = shown_fields(windows[["sample", "field"]], max_fields)
    if len(shown) < windows.groupby(["sample", "field"]).ngroups:
        log.info("cluster: maps for %d fields, every sample's first fields (cluster.maps_max_fields)", len(shown))
    windows = windows.merge(shown, on=["sample", "field"])
    names = []
    for (sample, field), rows in windows.groupby(["sample", "field"], sort=True):
        pixels = store.read_image(str(sample), str(field))
        painted = paint(pixels.shape[1:], rows[["y", "x"]].to_numpy(np.int64), window, rows["cluster"].to_numpy())
        mask = store.read_mask(str(sample), str(field)).astype(np.uint8)
        name = image_name(str(sample), str(field))
        with waiting(join(url, name)):
            image = write_ngff_image(root, name, pixels, store.meta.channels, channel_colours, chunk)
            write_ngff_labels(
                image, {CLUSTERS: painted, MASK_NAME: mask}, {CLUSTERS: colours, MASK_NAME: MASK_COLOURS}, chunk,
                {CLUSTERS: properties},
            )
        names.append(name)
    root.attrs["cellmi"] = {"maps": names, "window": window, "n_clusters": n_clusters, "ngff": NGFF_VERSION}
    log.info("cluster: %d cluster maps at %s", len(names), url)
    return names
