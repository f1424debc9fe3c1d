"""Cluster maps: painting overlapping windows, and the OME-Zarr read back with ome-zarr-py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader

from cellmi.analyze.maps import paint, shown_fields, write_maps
from cellmi.colours import GREEN, MAGENTA
from cellmi.store import join, open_store, zarr_store

from .conftest import SIZE, make_store


def test_each_pixel_takes_the_covering_window_with_the_nearest_centre():
    # windows of 4 at (0, 0) -> cluster 0 and (2, 2) -> cluster 1; they overlap on rows and columns 2-3
    expected = np.array(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 2, 2],
            [1, 1, 1, 2, 2, 2],  # (3, 3) is nearer the second centre (3.5, 3.5); (2, 3) and (3, 2) tie
            [0, 0, 2, 2, 2, 2],
            [0, 0, 2, 2, 2, 2],
        ]
    )
    corners = np.array([[0, 0], [2, 2]])
    np.testing.assert_array_equal(paint((6, 6), corners, 4, np.array([0, 1])), expected)
    # a tie goes to the first window in table order
    swapped = expected.copy()
    swapped[2, 3] = swapped[3, 2] = 2
    np.testing.assert_array_equal(paint((6, 6), corners[::-1], 4, np.array([1, 0])), swapped)


def test_stride_half_a_window_splits_the_overlap_down_the_middle():
    # windows of 4 at x = 0, 2, 4 (stride 2); pixels 8-9 lie under no kept window
    painted = paint((1, 10), np.array([[0, 0], [0, 2], [0, 4]]), 4, np.array([6, 3, 0]))
    np.testing.assert_array_equal(painted[0], [7, 7, 7, 4, 4, 1, 1, 1, 0, 0])
    assert painted.dtype == np.uint16


def test_maps_read_back_with_ome_zarr(tmp_path):
    store_url = str(tmp_path / "store.zarr")
    make_store(store_url, samples=["S00"], channels=("GFP", "DNA"), colours=[GREEN, MAGENTA])
    store = open_store(store_url)
    window, stride = 64, 32  # overlapping windows; one field keeps only some of them
    grid = [(y, x) for y in range(0, SIZE - window + 1, stride) for x in range(0, SIZE - window + 1, stride)]
    windows = pd.DataFrame(
        [
            {"sample": "S00", "field": field, "y": y, "x": x, "cluster": (i + int(field)) % 3}
            for field in ("1", "2")
            for i, (y, x) in enumerate(grid)
            if field == "1" or i % 2 == 0
        ]
    )
    url = join(str(tmp_path), "maps.zarr")
    assert write_maps(url, store, windows, window, 3) == ["S00_1", "S00_2"]
    for field, rows in windows.groupby("field"):
        nodes = list(Reader(parse_url(join(url, f"S00_{field}")))())
        image, labels = nodes[0], {n.metadata["name"]: n for n in nodes if n.load(Label)}
        np.testing.assert_array_equal(np.asarray(image.data[0]), store.read_image("S00", field))
        assert image.metadata["channel_names"] == ["GFP", "DNA"]
        assert image.metadata["colormap"] == [[[0, 0, 0], [0, 1, 0]], [[0, 0, 0], [1, 0, 1]]]
        assert set(labels) == {"clusters", "foreground"}
        painted = paint((SIZE, SIZE), rows[["y", "x"]].to_numpy(), window, rows["cluster"].to_numpy())
        np.testing.assert_array_equal(np.asarray(labels["clusters"].data[0]), painted)
        np.testing.assert_array_equal(np.asarray(labels["foreground"].data[0]), store.read_mask("S00", field))
        assert labels["clusters"].metadata["properties"] == {k + 1: {"cluster": k} for k in range(3)}
        assert set(labels["clusters"].metadata["color"]) == {1, 2, 3}


def test_a_capped_map_set_shows_every_sample_first():
    fields = pd.DataFrame(
        [{"sample": s, "field": f} for s in ("A", "B", "C") for f in ("1", "2", "3") for _ in range(2)]
    )
    shown = shown_fields(fields, 4)
    assert list(zip(shown["sample"], shown["field"], strict=True)) == [("A", "1"), ("A", "2"), ("B", "1"), ("C", "1")]
    assert len(shown_fields(fields, 0)) == len(shown_fields(fields, 9)) == 9


def test_write_maps_writes_at_most_the_cap(tmp_path):
    store_url = str(tmp_path / "store.zarr")
    make_store(store_url, samples=["S00", "S01"], channels=("GFP", "DNA"), colours=[GREEN, MAGENTA])
    windows = pd.DataFrame(
        [{"sample": s, "field": f, "y": 0, "x": 0, "cluster": 1} for s in ("S00", "S01") for f in ("1", "2")]
    )
    url = join(str(tmp_path), "maps.zarr")
    assert write_maps(url, open_store(store_url), windows, 64, 2, max_fields=3) == ["S00_1", "S00_2", "S01_1"]
    assert zarr.open_group(zarr_store(url), mode="r").attrs["cellmi"]["maps"] == ["S00_1", "S00_2", "S01_1"]
