"""Composites in the store's channel colours for any channel count, and traits measured on a hand-made window."""

from __future__ import annotations

import numpy as np
import pytest

from cellmi.analyze.gallery import composite, thumbnail, window_traits
from cellmi.colours import channel_colours, rgb


@pytest.mark.parametrize("n", [1, 2, 8])
def test_each_channel_is_painted_in_its_own_colour(n):
    colours = channel_colours([f"ch{i}" for i in range(n)])
    low, high = np.zeros(n, np.float32), np.full(n, np.log1p(1000.0), np.float32)
    for c in range(n):
        crop = np.zeros((n, 4, 4), np.uint16)
        crop[c] = 1000  # this channel at the top of its display range, the others dark
        out = composite(crop, colours, low, high)
        assert out.shape == (4, 4, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[0, 0], np.round(np.array(rgb(colours[c])) * 255))


def test_channels_add_up_and_saturate():
    colours = ["FF0000", "00FF00", "FF0000"]
    low, high = np.zeros(3, np.float32), np.full(3, np.log1p(1000.0), np.float32)
    crop = np.full((3, 2, 2), 1000, np.uint16)
    np.testing.assert_array_equal(composite(crop, colours, low, high)[0, 0], [255, 255, 0])


def test_traits_of_a_hand_made_window():
    scaled = np.full((2, 10, 10), -1.0, np.float32)
    scaled[0, 2:5, 2:5] = 3.0  # a 3x3 object of channel A, above the bright cut of 2 SD
    scaled[1, :, 5:] = 0.5  # channel B: half the window above its mean, not bright
    mask = np.ones((10, 10), bool)
    mask[:, 8:] = False  # the two right-most columns are background
    row = window_traits([scaled], [mask], ["A", "B"]).iloc[0]
    assert row["fg_fraction"] == pytest.approx(0.8)
    assert row["intensity_A"] == pytest.approx((9 * 3.0 - 71) / 80)
    assert row["bright_area_A"] == pytest.approx(0.09) and row["object_size_A"] == 9
    assert row["bright_area_B"] == 0 and row["object_size_B"] == 30  # columns 5-7 of the foreground
    assert thumbnail(np.zeros((256, 512, 3), np.uint8), 128).shape == (128, 256, 3)
