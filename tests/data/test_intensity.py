"""Field intensity normalisation: a field's gain cancels, channel ratios and the store mode stay."""

import numpy as np
import pytest

from cellmi.data.intensity import Levels, field_levels, log_intensity
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


def _normalised(pixels, mask, mode="field"):
    return log_intensity(pixels, field_levels(pixels, mask, mode))


def test_a_whole_field_gain_cancels(field):
    pixels, mask = field
    base = _normalised(pixels, mask)[:, mask]
    for gain in (0.7, 1.3):
        moved = _normalised(_imaged(pixels, [gain] * 3), mask)[:, mask]
        raw_shift = np.median(np.log1p(_imaged(pixels, [gain] * 3)[:, mask]) - np.log1p(pixels[:, mask]), axis=1)
        shift = np.median(moved - base, axis=1)
        # the raw log intensities move with the gain; the normalised ones stay (rounding aside)
        assert np.all(np.abs(raw_shift) > 0.1)
        assert np.all(np.abs(shift) < 0.05), shift


def test_a_dimmer_channel_stays_dimmer_than_the_others(field):
    pixels, mask = field
    base = _normalised(pixels, mask)
    dim = _normalised(_imaged(pixels, [1.0, 1.0, 0.5]), mask)
    bright = pixels[2] > np.percentile(pixels[2][mask], 75)
    actin_drop = np.median(base[2][bright & mask] - dim[2][bright & mask])
    dna_drop = np.median(base[0][mask] - dim[0][mask])
    assert actin_drop - dna_drop > 0.3  # log(2) = 0.69, shared out over the channels by the field offset


def test_background_level_comes_off_each_channel(field):
    pixels, mask = field
    levels = field_levels(pixels, mask, "field")
    assert levels.background == pytest.approx(np.median(pixels[:, ~mask], axis=1), abs=1)
    logs = log_intensity(pixels, Levels(levels.background, 0.0))
    assert np.median(logs[:, ~mask], axis=1) == pytest.approx([np.log1p(0)] * 3, abs=np.log(4))


def test_all_foreground_field_falls_back_to_a_low_percentile(field):
    pixels, _ = field
    full = np.ones(pixels.shape[1:], bool)
    levels = field_levels(pixels, full, "field")
    assert levels.background == pytest.approx(np.percentile(pixels, 1, axis=(1, 2)), abs=1)
    assert np.isfinite(levels.offset)


def test_store_mode_is_log1p_of_raw_counts(field):
    pixels, mask = field
    np.testing.assert_allclose(_normalised(pixels, mask, "store"), np.log1p(pixels.astype(np.float32)))


def test_unknown_mode_is_refused(field):
    pixels, mask = field
    with pytest.raises(ValueError, match="intensity mode"):
        field_levels(pixels, mask, "plate")
