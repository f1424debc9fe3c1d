"""Words for what sets a group apart, from effect sizes computed on a hand-made trait table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellmi.analyze.describe import describe, trait_effects


def windows() -> pd.DataFrame:
    """Three groups of ten windows. Group 0: bright GFP; group 1: small DNA objects; group 2: in between."""
    ones, zeros = np.ones(10), np.zeros(10)
    return pd.DataFrame(
        {
            "cluster": np.repeat([0, 1, 2], 10),
            "intensity_GFP": np.r_[ones * 3, zeros, ones * 0.6],
            "object_size_DNA": np.r_[ones * 40, ones * 10, ones * 40],
            "fg_fraction": np.full(30, 0.5),  # no spread: never a word
        }
    )


def test_effects_are_differences_in_sds_against_the_other_groups():
    effects = trait_effects(windows())
    # GFP: mean 1.2, SD sqrt(1.68); group 0 is 3 against 0.3 for the others' windows
    assert effects.loc[0, "intensity_GFP"] == pytest.approx(2.7 / np.sqrt(1.68))
    assert effects.loc[1, "intensity_GFP"] == pytest.approx(-1.8 / np.sqrt(1.68))
    # DNA objects: mean 30, SD sqrt(200); group 1 is 10 against 40, group 0 is 40 against 25
    assert effects.loc[1, "object_size_DNA"] == pytest.approx(-30 / np.sqrt(200))
    assert effects.loc[0, "object_size_DNA"] == pytest.approx(15 / np.sqrt(200))
    assert effects["fg_fraction"].isna().all()


def test_words_name_the_channel_and_the_direction_strongest_first():
    words = describe(trait_effects(windows()))
    assert words[0] == ["brighter GFP (+2.1 SD)", "larger DNA objects (+1.1 SD)"]
    assert words[1] == ["smaller DNA objects (-2.1 SD)", "dimmer GFP (-1.4 SD)"]
    assert words[2] == ["larger DNA objects (+1.1 SD)", "dimmer GFP (-0.7 SD)"]
    assert describe(trait_effects(windows()), least=2.5) == {0: [], 1: [], 2: []}
    assert describe(trait_effects(windows()), most=1)[1] == ["smaller DNA objects (-2.1 SD)"]
