"""Figures as PNG bytes (matplotlib's Agg canvas directly: no pyplot, no global state)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass
class Panel:
    """One column of the UMAP figure: 2-D points (M, 2) with a sample and a cluster id each."""

    title: str
    xy: np.ndarray
    samples: np.ndarray
    clusters: np.ndarray
    cluster_title: str = "cluster"


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def cluster_palette(n: int) -> list:
    """``n`` RGBA colours (tab10, or tab20 above 10): the clusters' colours in figures, report and napari maps."""
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _scatter(ax, xy: np.ndarray, groups: np.ndarray, title: str, legend: bool) -> None:
    names = sorted(pd.unique(groups), key=str)
    colours = cluster_palette(len(names))
    for colour, name in zip(colours, names, strict=True):
        pts = xy[groups == name]
        ax.scatter(pts[:, 0], pts[:, 1], s=4, color=colour, label=str(name), alpha=0.7, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend and len(names) <= 20:
        ax.legend(fontsize=6, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def umap_figure(panels: list[Panel]) -> bytes:
    """Rows: coloured by sample, coloured by cluster; one column per panel (e.g. test, train)."""
    fig = Figure(figsize=(4.6 * len(panels), 7.6))
    axes = fig.subplots(2, len(panels), squeeze=False)
    for col, panel in enumerate(panels):
        _scatter(axes[0, col], panel.xy, panel.samples, f"{panel.title}: by sample", legend=True)
        _scatter(
            axes[1, col], panel.xy, panel.clusters, f"{panel.title}: by {panel.cluster_title}", legend=True
        )
    fig.tight_layout()
    return to_png(fig)


def confusion_figure(tables: list[tuple[str, pd.DataFrame]]) -> bytes:
    """Heat maps of cluster-by-sample count tables (rows clusters, columns samples), annotated."""
    widths = [max(5.5, 1.5 + 0.12 * table.shape[1]) for _, table in tables]  # room for every sample's tick
    fig = Figure(figsize=(sum(widths), max(4.8, 1.5 + 0.12 * max(t.shape[0] for _, t in tables))))
    axes = fig.subplots(1, len(tables), squeeze=False, width_ratios=widths)[0]
    for ax, (title, table) in zip(axes, tables, strict=True):
        values = table.to_numpy()
        share = values / np.maximum(values.sum(axis=0, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(values.shape[1]), [str(c) for c in table.columns], rotation=90, fontsize=7)
        ax.set_yticks(range(values.shape[0]), [str(r) for r in table.index], fontsize=7)
        ax.set_xlabel("sample", fontsize=8)
        ax.set_ylabel("cluster", fontsize=8)
        ax.set_title(title, fontsize=9)
        if values.size <= 400:
            for (i, j), v in np.ndenumerate(values):
                if v:
                    ax.text(
                        j,
                        i,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if share[i, j] > 0.6 else "black",
                    )
    fig.tight_layout()
    return to_png(fig)


def gallery_figure(rows: dict[int, list[np.ndarray]]) -> bytes:
    """One row per cluster of (H, W, 3) uint8 composites."""
    width = max([len(v) for v in rows.values()] + [1])
    fig = Figure(figsize=(1.3 * width + 0.8, 1.3 * max(len(rows), 1)))
    axes = fig.subplots(max(len(rows), 1), width, squeeze=False)
    for r, (cluster, images) in enumerate(sorted(rows.items())):
        for c in range(width):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
        axes[r, 0].text(
            -0.1,
            0.5,
            f"cluster {cluster}",
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.subplots_adjust(wspace=0.04, hspace=0.06)
    return to_png(fig, dpi=90)


def bic_figure(scores: dict[int, float], chosen: int) -> bytes:
    """BIC against the number of components, with the chosen one marked."""
    fig = Figure(figsize=(4.5, 3.0))
    ax = fig.subplots()
    ks = sorted(scores)
    ax.plot(ks, [scores[k] for k in ks], marker="o", ms=3)
    ax.axvline(chosen, color="grey", ls="--", lw=1)
    ax.set_xlabel("components")
    ax.set_ylabel("BIC")
    fig.tight_layout()
    return to_png(fig)
