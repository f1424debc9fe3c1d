"""Fixtures: a tiny image store and representations with one Gaussian blob per sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellmi.representations import Representations, write_representations
from cellmi.store import StoreMeta, StoreWriter, join

SAMPLES = [f"S{i:02d}" for i in range(6)]
FIELDS = ["1", "2", "3", "4"]
SIZE, WINDOW = 128, 32
TEST = {"S00", "S02", "S04"}


def make_store(
    url: str,
    samples: list[str] = SAMPLES,
    channels: tuple[str, ...] = ("DNA", "pH3", "actin"),
    colours: list[str] | None = None,
) -> None:
    """Fields whose brightness depends on the sample; foreground = the brighter half of channel 0.

    ``colours`` are the store's display colours (default: the palette's, by channel name).
    """
    meta = StoreMeta(
        channels=list(channels),
        fields={s: list(FIELDS) for s in samples},
        split={s: "test" if s in TEST else "train" for s in samples},
        shape=(SIZE, SIZE),
        phenotypes={s: f"ph{i}" for i, s in enumerate(SAMPLES)},
        stats={"mean": [6.0 - c % 2 for c in range(len(channels))], "std": [1.0] * len(channels)},
    )
    writer = StoreWriter(url, meta, colours=colours)
    rng = np.random.default_rng(1)
    for sample in samples:
        i = SAMPLES.index(sample)
        for field in FIELDS:
            pixels = rng.gamma(2.0, 100.0 * (i + 1), size=(len(channels), SIZE, SIZE)).astype(np.uint16)
            writer.write_image(sample, field, pixels, pixels[0] > np.median(pixels[0]))
    writer.finish()


def make_reps(store_url: str, seed: int = 0, dim: int = 16) -> Representations:
    """16 windows per field; DIM vectors are well-separated blobs per sample, 'random' is noise,
    'handcrafted' weak blobs. One window per field is flagged background (and must be ignored)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(42).normal(size=(len(SAMPLES), dim)) * 4.0
    rows, dims, rand, hand = [], [], [], []
    for i, sample in enumerate(SAMPLES):
        for field in FIELDS:
            for j, (y, x) in enumerate(
                (y, x) for y in range(0, SIZE, WINDOW) for x in range(0, SIZE, WINDOW)
            ):
                rows.append(
                    {
                        "sample": sample,
                        "field": field,
                        "split": "test" if sample in TEST else "train",
                        "y": y,
                        "x": x,
                        "fg_fraction": 0.5,
                        "background": j == 0,
                    }
                )
                dims.append(centres[i] + rng.normal(size=dim) * 0.5)
                rand.append(rng.normal(size=dim))
                hand.append(np.r_[centres[i, :4] * 0.3, 0.0] + rng.normal(size=5))
    table = pd.DataFrame(rows)
    attrs = {
        "window": WINDOW,
        "stride": WINDOW,
        "store": store_url,
        "phenotypes": {s: f"ph{i}" for i, s in enumerate(SAMPLES)},
        "checkpoint": "synthetic-test",
    }
    features = {
        "dim": np.array(dims, np.float32),
        "random": np.array(rand, np.float32),
        "handcrafted": np.array(hand, np.float32),
    }
    return Representations(table, features, attrs)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> str:
    """A run folder with store.zarr and representations.zarr (local disk)."""
    root = str(tmp_path_factory.mktemp("cluster-run"))
    make_store(join(root, "store.zarr"))
    write_representations(join(root, "representations.zarr"), make_reps(join(root, "store.zarr")))
    return root


@pytest.fixture(scope="session")
def analysed(workdir) -> str:
    """The job run once with default settings (split test) on the fixture run folder; its output folder."""
    from cellmi.cli import main as cli_main

    assert cli_main(["cluster", "--workdir", workdir]) == 0
    return join(workdir, "analysis")
