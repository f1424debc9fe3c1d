"""Shared local map == each window encoded alone; hand-crafted features against direct numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellmi.infer.embed import activation_bytes, embed_batch, embed_naive, embed_shared, embed_views, view_of
from cellmi.infer.handcrafted import feature_names, window_features
from cellmi.infer.windows import window_grid
from cellmi.model.encoder import Readout
from tests.infer.standin import tiny_encoder

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("shape", "window", "stride", "crop"),
    [((96, 96), 32, 16, 48), ((100, 90), 48, 8, 48), ((64, 64), 64, 4, 48), ((150, 140), 128, 16, 128)],
)
def test_shared_map_equals_naive_within_1e5(shape, window, stride, crop):
    """Also with the stride-2 stem of 128 px crops (encoder stride 8) and flush edge windows off the grid."""
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, *shape)).astype(np.float32)
    encoder = tiny_encoder(crop=crop)
    corners = window_grid(shape, window, stride)
    shared = embed_shared(encoder, pixels, corners, window, batch=7)
    naive = embed_naive(encoder, pixels, corners, window, batch=5)
    assert shared.shape == (len(corners), 6) and shared.dtype == np.float32
    assert np.abs(shared).max() > 0.1  # not a trivial all-zero output
    assert np.abs(shared - naive).max() <= 1e-5


@pytest.mark.parametrize(("channels", "shape", "crop"), [(1, (113, 153), 48), (8, (150, 226), 128), (3, (96, 96), 48)])
def test_a_batch_of_fields_equals_each_window_alone(channels, shape, crop):
    """Non-square fields (904x1224 scaled down), 1 to 8 channels, each field with its own kept windows
    and foreground pooling: one forward pass for the batch gives every window's own vector."""
    rng = np.random.default_rng(channels)
    window, fields = crop, 3
    pixels = rng.normal(size=(fields, channels, *shape)).astype(np.float32)
    masks = rng.random((fields, *shape)) < 0.4
    grid = window_grid(shape, window, 16)
    kept = [grid[rng.random(len(grid)) < share] for share in (1.0, 0.6, 0.0)]  # the last keeps none
    encoder = tiny_encoder(crop=crop, in_channels=channels, pool="foreground")
    got = embed_batch(encoder, torch.from_numpy(pixels), kept, window, torch.from_numpy(masks))
    assert [g.shape for g in got] == [(len(k), 6) for k in kept] and len(kept[0]) > 4
    for i in range(fields):
        want = embed_naive(encoder, pixels[i], kept[i], window, batch=7, mask=masks[i])
        np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5, err_msg=str(i))
    assert np.abs(got[0]).max() > 0.1


def test_bf16_batch_stays_within_a_percent_of_float32():
    """The GPU path runs the conv trunk in bf16 (autocast; here on the CPU). Measured on these tiny
    encoders: at most 0.8 % of a vector's length (0.3 % for the default architecture)."""
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.normal(size=(4, 3, 113, 153)).astype(np.float32))
    grid = window_grid((113, 153), 48, 16)
    encoder = tiny_encoder(crop=48)
    exact = np.concatenate(embed_batch(encoder, pixels, [grid] * 4, 48))
    half = np.concatenate(embed_batch(encoder, pixels, [grid] * 4, 48, precision=torch.bfloat16))
    error = np.linalg.norm(half - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert 0 < error.max() < 0.02, error.max()  # bf16 did run (not equal), and stays close


def test_foreground_pooling_shared_equals_naive_and_ignores_background():
    """With pool="foreground" the mask weights the pooling the same way in both paths, and changing
    background pixels far from the cells barely moves a window's vector (the plain mean moves)."""
    rng = np.random.default_rng(1)
    shape, window = (160, 160), 64
    pixels = rng.normal(size=(3, *shape)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[48:128, 32:128] = True
    corners = window_grid(shape, window, 16)
    edge = np.flatnonzero((corners == [0, 48]).all(axis=1))  # rows 0..63: background above, cells below
    moved = pixels.copy()
    moved[:, :12, :] += 3.0  # background rows far from the cells
    change = {}
    for pool in ("foreground", "mean"):
        encoder = tiny_encoder(crop=48, pool=pool)
        shared = embed_shared(encoder, pixels, corners, window, mask=mask)
        assert np.abs(shared - embed_naive(encoder, pixels, corners, window, mask=mask)).max() <= 1e-5
        change[pool] = np.abs(embed_shared(encoder, moved, corners, window, mask=mask) - shared)[edge].max()
    assert change["mean"] > 1e-2
    assert change["foreground"] < 0.05 * change["mean"], change


@pytest.mark.parametrize(("readout", "width"), [("pooled", 8), ("both", 14)])
def test_every_readout_keeps_shared_equal_to_naive_and_batched(readout, width):
    rng = np.random.default_rng(2)
    pixels = rng.normal(size=(3, 96, 96)).astype(np.float32)
    mask = rng.random((96, 96)) > 0.4
    encoder = Readout(tiny_encoder(crop=48, pool="foreground"), readout).eval()
    corners = window_grid((96, 96), 48, 8)
    shared = embed_shared(encoder, pixels, corners, 48, mask=mask)
    assert shared.shape == (len(corners), width)
    assert np.abs(shared - embed_naive(encoder, pixels, corners, 48, mask=mask)).max() <= 1e-5
    batched = embed_batch(encoder, torch.from_numpy(pixels)[None], [corners], 48, torch.from_numpy(mask)[None].float())
    assert np.abs(shared - batched[0]).max() <= 1e-5


def test_shared_map_would_differ_off_the_encoder_grid():
    """The comparison can fail: a window shifted off the stride grid gives other vectors."""
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 64, 64)).astype(np.float32)
    encoder = tiny_encoder()
    grid = np.array([[0, 0], [4, 8]])
    shifted = np.array([[0, 0], [2, 8]])
    a = embed_shared(encoder, pixels, grid, 32)
    b = embed_naive(encoder, pixels, shifted, 32)
    assert np.abs(a[0] - b[0]).max() <= 1e-5 and np.abs(a[1] - b[1]).max() > 1e-3


def test_no_windows_give_an_empty_matrix_of_the_right_width():
    pixels = np.zeros((3, 64, 64), np.float32)
    for embed in (embed_shared, embed_naive):
        assert embed(tiny_encoder(), pixels, np.zeros((0, 2), np.int64), 32).shape == (0, 6)


def test_activation_bytes_grow_with_the_input():
    small, shape = activation_bytes(tiny_encoder(), 3, 32)
    big, _ = activation_bytes(tiny_encoder(), 3, 64)
    assert shape == (8, tiny_encoder().local_size(32), tiny_encoder().local_size(32))
    assert 3.5 < big / small < 4.5


def test_handcrafted_features_match_numpy_on_one_window():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 4000, (3, 48, 48)).astype(np.uint16)
    norm = (np.log1p(raw.astype(np.float32)) - 5) / 2
    mask = rng.random((48, 48)) < 0.4
    corners = np.array([[0, 0], [16, 8]])
    feats = window_features(raw, norm, mask, corners, 32)
    names = feature_names(["DNA", "pH3", "actin"])
    assert feats.shape == (2, len(names)) and len(set(names)) == len(names)
    row = dict(zip(names, feats[1], strict=True))
    win = (slice(16, 48), slice(8, 40))
    actin_raw = raw[2][win].astype(np.float64)
    assert row["actin_raw_mean"] == pytest.approx(actin_raw.mean(), rel=1e-5)
    assert row["actin_raw_p95"] == np.percentile(actin_raw, 95, method="lower")
    assert row["pH3_raw_p05"] == np.percentile(raw[1][win], 5, method="lower")
    assert row["DNA_norm_p50"] == pytest.approx(np.percentile(norm[0][win], 50, method="lower"), rel=1e-6)
    assert row["actin_norm_p95"] == pytest.approx(np.percentile(norm[2][win], 95, method="lower"), rel=1e-6)
    assert row["pH3_norm_std"] == pytest.approx(norm[1][win].std(), rel=1e-4)
    assert row["DNA_fg_norm_mean"] == pytest.approx(norm[0][win][mask[win]].mean(), rel=1e-4)
    assert row["fg_fraction"] == pytest.approx(mask[win].mean())
    gy, gx = np.diff(norm[0][win], axis=0), np.diff(norm[0][win], axis=1)
    assert row["DNA_grad_energy"] == pytest.approx((gy**2).mean() + (gx**2).mean(), rel=1e-4)
    assert feats[0, names.index("DNA_raw_mean")] != feats[1, names.index("DNA_raw_mean")]


def test_percentiles_need_normalised_pixels_that_follow_the_raw_ones():
    """The normalised order statistics are looked up from the raw ones: refused when that cannot hold."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 50, (1, 40, 40)).astype(np.uint16)  # many ties
    norm = np.log1p(raw.astype(np.float32))
    corners = np.array([[0, 0], [8, 8]])
    feats = window_features(raw, norm, raw[0] > 10, corners, 32)
    names = feature_names(["DNA"])
    assert feats[1, names.index("DNA_norm_p05")] == np.percentile(norm[0, 8:40, 8:40], 5, method="lower")
    with pytest.raises(ValueError, match="not a function of the raw ones"):
        window_features(raw, norm + rng.normal(size=norm.shape).astype(np.float32), raw[0] > 10, corners, 32)


@pytest.mark.parametrize("view", range(8))
def test_each_view_sees_the_same_windows_turned(view):
    rng = np.random.default_rng(view)
    pixels, mask = rng.normal(size=(2, 96, 128)).astype(np.float32), rng.random((96, 128)) > 0.5
    corners, window = window_grid((96, 128), 32, 16), 32
    turned, turned_mask, moved = view_of(pixels, mask, corners, window, view)
    for (y, x), (ty, tx) in zip(corners, moved, strict=True):
        seen = turned[:, ty : ty + window, tx : tx + window]
        crop = pixels[:, y : y + window, x : x + window]
        k = view % 4
        expected = np.rot90(crop, k, axes=(1, 2))
        expected = expected[..., ::-1] if view >= 4 else expected
        np.testing.assert_array_equal(seen, expected)
        assert turned_mask[ty : ty + window, tx : tx + window].sum() == mask[y : y + window, x : x + window].sum()


@pytest.mark.parametrize("views", [4, 8])
def test_averaged_views_make_vectors_blind_to_a_quarter_turn(views):
    """A field turned by 90 degrees gives each window the same averaged vector; one view does not."""
    rng = np.random.default_rng(5)
    pixels = rng.normal(size=(3, 96, 96)).astype(np.float32)
    mask = rng.random((96, 96)) > 0.3
    encoder = tiny_encoder(crop=48, pool="foreground")
    corners, window = window_grid((96, 96), 32, 16), 32
    turned, turned_mask, moved = view_of(pixels, mask, corners, window, 1)
    for n, expect_equal in ((views, True), (1, False)):
        base = embed_views(embed_shared, encoder, pixels, corners, window, 64, mask, n)
        other = embed_views(embed_shared, encoder, turned, moved, window, 64, turned_mask, n)
        assert np.allclose(base, other, atol=1e-5) == expect_equal


def test_unknown_view_count_is_refused():
    with pytest.raises(ValueError, match="views 3"):
        embed_views(embed_shared, tiny_encoder(), np.zeros((3, 64, 64), np.float32), np.zeros((0, 2), int), 32, 8,
                    None, 3)
