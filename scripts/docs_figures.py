"""Draw the two documentation figures from the synthetic screen (no training, a few seconds).

    python scripts/docs_figures.py          # writes docs/img/pipeline.png and docs/img/pairs.png

The fields are the embedded synthetic screen's (seed 0), shown as cellmi's previews do: actin
red, pH3 green, DNA blue. The PNGs are reduced to a 96-colour palette to keep them small.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle
from PIL import Image

from cellmi.data.synth import PHENOTYPES, preview_rgb, synth_field

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"
CROP = 256
GREEN, RED, GREY, ANCHOR = "#1b9e4b", "#d62728", "#555555", "#f0a000"


def field_rgb(sample: int, field: int) -> np.ndarray:
    """(512, 512, 3) uint8 preview of one synthetic field."""
    return preview_rgb(synth_field(sample, field).pixels)


def label(sample: int) -> str:
    return PHENOTYPES[sample].name.replace("_", " ")


def save_small(fig: plt.Figure, path: Path, dpi: int) -> None:
    """Save a figure as a palette PNG (a fraction of the size of an RGB one)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
    image = Image.open(buffer).convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    print(f"{path}: {image.size[0]}x{image.size[1]} px, {path.stat().st_size // 1024} KiB")


def arrow(fig: plt.Figure, start: tuple[float, float], end: tuple[float, float]) -> None:
    fig.patches.append(FancyArrowPatch(start, end, transform=fig.transFigure, arrowstyle="-|>",
                                       mutation_scale=18, color=GREY, lw=1.5))


def pipeline() -> None:
    """Fields of four morphologies -> windows -> encoder -> vectors -> groups of fields."""
    samples = (0, 2, 6, 9)  # control colonies, mitotic arrest, multinucleate giant, compact colonies
    fig = plt.figure(figsize=(10.0, 3.3))
    for i, sample in enumerate(samples):
        ax = fig.add_axes((0.01 + (i % 2) * 0.125, 0.44 - (i // 2) * 0.42, 0.12, 0.34))
        ax.imshow(field_rgb(sample, 0))
        ax.set_title(label(sample), fontsize=8)
        ax.set_axis_off()
        if i == 0:
            for y, x in ((0, 0), (0, 128), (128, 64)):
                ax.add_patch(Rectangle((x, y), CROP, CROP, fill=False, ec="white", lw=1.0, ls="--"))
    fig.text(0.135, 0.985, "fields of view, 3 channels;\nwindows of 256 px (dashed)", ha="center", va="top", fontsize=9)
    arrow(fig, (0.265, 0.5), (0.315, 0.5))

    ax = fig.add_axes((0.32, 0.10, 0.22, 0.80))
    ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.set_axis_off()
    boxes = (("window\n(C x 256 x 256)", 0.88), ("unpadded conv trunk", 0.64),
             ("local map: 9 x 9 x 128", 0.40), ("foreground-weighted mean,\nhead: 64-d vector", 0.14))
    for text, y in boxes:
        ax.text(0.5, y, text, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": "#eef3fb", "ec": "#4a6fa5"})
    for (_, y0), (_, y1) in itertools.pairwise(boxes):
        ax.annotate("", (0.5, y1 + 0.08), (0.5, y0 - 0.08), arrowprops={"arrowstyle": "-|>", "color": GREY})
    ax.set_title("Deep InfoMax encoder", fontsize=9)
    arrow(fig, (0.545, 0.5), (0.595, 0.5))

    ax = fig.add_axes((0.60, 0.12, 0.17, 0.72))
    rng = np.random.default_rng(0)
    colours = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")
    for centre, colour in zip(((0, 0), (3, 1), (1, 3.2), (3.6, 3.6)), colours, strict=True):
        points = rng.normal(centre, 0.55, size=(60, 2))
        ax.scatter(points[:, 0], points[:, 1], s=6, color=colour)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("window vectors: UMAP +\nGaussian mixture (sketch)", fontsize=9)
    arrow(fig, (0.775, 0.5), (0.825, 0.5))

    fig.text(0.905, 0.92, "groups of fields (illustration)", ha="center", fontsize=9)
    for row, (sample, colour) in enumerate(zip(samples, colours, strict=True)):
        bottom = 0.69 - row * 0.215
        fig.text(0.83, bottom + 0.085, f"{row + 1}", color=colour, fontsize=11, weight="bold", va="center")
        for col in range(3):
            ax = fig.add_axes((0.845 + col * 0.05, bottom, 0.048, 0.17))
            ax.imshow(field_rgb(sample, col + 1)[::4, ::4])
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
    save_small(fig, OUT / "pipeline.png", dpi=90)


def pairs() -> None:
    """A crop's positives (other fields of its sample) and negatives (fields of other samples)."""
    samples, fields = (0, 2, 9), 3
    fig, axes = plt.subplots(len(samples), fields, figsize=(5.6, 5.4))
    for r, sample in enumerate(samples):
        for f in range(fields):
            ax = axes[r, f]
            ax.imshow(field_rgb(sample, f)[128 : 128 + CROP, 128 : 128 + CROP])
            ax.set_xticks([]), ax.set_yticks([])
            anchor = r == 0 and f == 0
            colour = ANCHOR if anchor else GREEN if r == 0 else RED
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(5 if anchor else 3)
            ax.set_title("anchor crop" if anchor else "positive" if r == 0 else "negative",
                         fontsize=8, color=colour)
            if f == 0:
                ax.set_ylabel(f"{label(sample)}\n(sample {r + 1})", fontsize=8)
    fig.suptitle("Pairs by sample: the anchor's global vector is scored against local\n"
                 "positions of every crop (positive: same sample, any field)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_small(fig, OUT / "pairs.png", dpi=90)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    pipeline()
    pairs()
