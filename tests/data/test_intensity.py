"""Field intensity normalisation: a field's gain cancels, channel ratios stay, noise is not blown up."""

import numpy as np
import pytest

from cellmi.data.intensity import Levels, field_levels, log_intensity, store_pedestal
from cellmi.data.synth import synth_field

OFFSET = 100.0


@pytest.fixture(scope="module")
def field():
    f = synth_field(0, 0, seed=3, size=256)
    return f.pixels, f.foreground


def _imaged(pixels: np.ndarray, gains) -> np.ndarray:
    """The same scene under other per-channel gains: the signal above the camera offset scales."""
    signal = pixels.astype(np.float64) - OFFSET
    out = signal * np.asarray(gains, np.float64)[:, None, None] + OFFSET
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def pedestal(field):
    pixels, mask = field
    return store_pedestal([field_levels(pixels, mask, "field")])


def _normalised(pixels, mask, pedestal=None, mode="field"):
    return log_intensity(pixels, field_levels(pixels, mask, mode, pedestal))


def test_a_whole_field_gain_cancels(field, pedestal):
    pixels, mask = field
    base = _normalised(pixels, mask, pedestal)[:, mask]
    for gain in (0.7, 1.3):
        moved = _normalised(_imaged(pixels, [gain] * 3), mask, pedestal)[:, mask]
        raw_shift = np.median(np.log1p(_imaged(pixels, [gain] * 3)[:, mask]) - np.log1p(pixels[:, mask]), axis=1)
        shift = np.median(moved - base, axis=1)
        # the raw log intensities move with the gain; the normalised ones stay (rounding aside)
        assert np.all(np.abs(raw_shift) > 0.1)
        assert np.all(np.abs(shift) < 0.05), shift


def test_a_dimmer_channel_stays_dimmer_than_the_others(field, pedestal):
    pixels, mask = field
    base = _normalised(pixels, mask, pedestal)
    dim = _normalised(_imaged(pixels, [1.0, 1.0, 0.5]), mask, pedestal)
    bright = pixels[2] > np.percentile(pixels[2][mask], 75)
    actin_drop = np.median(base[2][bright & mask] - dim[2][bright & mask])
    dna_drop = np.median(base[0][mask] - dim[0][mask])
    assert actin_drop - dna_drop > 0.3  # log(2) = 0.69, shared out over the channels by the field offset


def test_background_sits_on_the_pedestal_and_its_noise_stays_small(field, pedestal):
    """Background pixels map to about log(pedestal); camera noise there spreads far less than it
    would under log1p of the background-subtracted counts."""
    pixels, mask = field
    levels = field_levels(pixels, mask, "field", pedestal)
    assert levels.background == pytest.approx(np.median(pixels[:, ~mask], axis=1), abs=1)
    logs = log_intensity(pixels, levels)[:, ~mask]
    np.testing.assert_allclose(np.median(logs, axis=1), np.log(pedestal), atol=0.05)
    bare = log_intensity(pixels, Levels(levels.background, levels.offset, np.full(3, 1e-3, np.float32)))[:, ~mask]
    assert np.all(logs.std(axis=1) < 0.25 * bare.std(axis=1))


def test_pedestal_is_the_background_at_the_store_scale():
    a = Levels(np.array([100.0, 200.0], np.float32), np.log(10.0))
    b = Levels(np.array([300.0, 0.0], np.float32), np.log(30.0))
    c = Levels(np.array([50.0, 50.0], np.float32), np.log(10.0))
    np.testing.assert_allclose(store_pedestal([a, b, c]), [10.0, 5.0], rtol=1e-6)


def test_all_foreground_field_falls_back_to_a_low_percentile(field):
    pixels, _ = field
    full = np.ones(pixels.shape[1:], bool)
    levels = field_levels(pixels, full, "field")
    assert levels.background == pytest.approx(np.percentile(pixels, 1, axis=(1, 2)), abs=1)
    assert np.isfinite(levels.offset) and levels.pedestal is None


def test_store_mode_is_log1p_of_raw_counts(field):
    pixels, mask = field
    np.testing.assert_allclose(_normalised(pixels, mask, mode="store"), np.log1p(pixels.astype(np.float32)))


def test_unknown_mode_is_refused(field):
    pixels, mask = field
    with pytest.raises(ValueError, match="intensity mode"):
        field_levels(pixels, mask, "plate")
