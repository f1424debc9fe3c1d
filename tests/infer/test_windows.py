"""Window geometry: pure functions, checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from cellmi.errors import UserError
from cellmi.infer.windows import axis_starts, check_geometry, foreground_fraction, map_groups, window_grid


def test_axis_starts_step_by_stride_and_end_flush_with_the_edge():
    assert axis_starts(128, 64, 32).tolist() == [0, 32, 64]
    assert axis_starts(100, 64, 32).tolist() == [0, 32, 36]
    assert axis_starts(64, 64, 16).tolist() == [0]
    assert axis_starts(60, 64, 16).tolist() == []


@pytest.mark.parametrize(
    ("shape", "window", "stride"), [((96, 96), 32, 16), ((100, 90), 32, 8), ((64, 80), 64, 32)]
)
def test_windows_cover_every_pixel_and_stay_inside(shape, window, stride):
    corners = window_grid(shape, window, stride)
    cover = np.zeros(shape, int)
    for y, x in corners:
        assert 0 <= y <= shape[0] - window and 0 <= x <= shape[1] - window
        cover[y : y + window, x : x + window] += 1
    assert cover.min() >= 1
    assert len({tuple(c) for c in corners.tolist()}) == len(corners)
    assert corners.tolist() == sorted(corners.tolist())


def test_foreground_fraction_equals_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((70, 90)) < 0.3
    corners = window_grid(mask.shape, 32, 8)
    got = foreground_fraction(mask, corners, 32)
    want = [mask[y : y + 32, x : x + 32].mean() for y, x in corners]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.dtype == np.float32


def test_map_groups_put_every_window_once_in_an_aligned_map():
    corners = window_grid((100, 90), 32, 8)  # flush edge windows at y=68 and x=58 are off the 8-grid
    groups = map_groups(corners, 32, 8)
    assert sorted(np.concatenate([g.rows for g in groups]).tolist()) == list(range(len(corners)))
    assert len(groups) == 4  # the grid, the bottom strip, the right strip, the corner
    for group in groups:
        y0, x0, _y1, _x1 = group.box
        for row, (r, c) in zip(group.rows, group.cells, strict=True):
            assert (y0 + 8 * r, x0 + 8 * c) == tuple(corners[row])
    assert groups[0].box == (0, 0, 96, 88)


def test_check_geometry_refuses_off_grid_windows_and_strides():
    check_geometry(64, 32, 4, (128, 128))
    with pytest.raises(UserError, match=r"CELLMI_INFER__WINDOW.*not a multiple of the encoder stride 8"):
        check_geometry(60, 32, 8, (128, 128))
    with pytest.raises(UserError, match=r"CELLMI_INFER__STRIDE.*20 is not a positive multiple"):
        check_geometry(64, 20, 8, (128, 128))
    with pytest.raises(UserError, match="larger than the fields"):
        check_geometry(256, 64, 8, (128, 200))
