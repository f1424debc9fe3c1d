"""Words for what sets each morphology group apart, from traits measured on the pixels of its windows.

Each trait of a group is compared with the windows of all other groups as an effect size: the
difference of the means in units of the trait's standard deviation over all measured windows.
The strongest effects of at least ``LEAST_EFFECT`` become phrases such as "brighter pH3
(+1.4 SD)"; the trait names come from ``gallery.window_traits``, so the channel names are the
store's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LEAST_EFFECT = 0.5  # SDs; smaller differences are not worth a word
MOST_PHRASES = 3
# trait column prefix -> (phrase when higher, phrase when lower); {} is the channel name
PHRASES = {
    "intensity_": ("brighter {}", "dimmer {}"),
    "bright_area_": ("more {}-bright area", "less {}-bright area"),
    "object_size_": ("larger {} objects", "smaller {} objects"),
}
FOREGROUND = ("denser (more foreground)", "sparser (less foreground)")


def trait_effects(windows: pd.DataFrame) -> pd.DataFrame:
    """Effect size of every trait per group: rows clusters, columns traits.

    ``windows`` has one row per measured window: a ``cluster`` column and numeric trait columns.
    An effect is (group mean - mean of the other groups' windows) / SD over all windows; a
    trait with no spread, or a group alone, gives NaN.
    """
    traits = windows.drop(columns="cluster")
    spread = traits.std(ddof=0).replace(0.0, np.nan)
    rows = {}
    for k, inside in windows.groupby("cluster", sort=True):
        others = traits.loc[windows["cluster"] != k]
        rows[int(k)] = (traits.loc[inside.index].mean() - others.mean()) / spread
    return pd.DataFrame.from_dict(rows, orient="index")


def phrase(trait: str, effect: float) -> str:
    """``intensity_pH3``, +1.42 -> ``brighter pH3 (+1.4 SD)``."""
    if trait == "fg_fraction":
        words = FOREGROUND[0 if effect > 0 else 1]
    else:
        prefix = next(p for p in PHRASES if trait.startswith(p))
        words = PHRASES[prefix][0 if effect > 0 else 1].format(trait[len(prefix) :])
    return f"{words} ({effect:+.1f} SD)"


def describe(effects: pd.DataFrame, least: float = LEAST_EFFECT, most: int = MOST_PHRASES) -> dict[int, list[str]]:
    """Per group (row of ``trait_effects``): phrases for its strongest effects, strongest first."""
    known = [c for c in effects.columns if c == "fg_fraction" or any(c.startswith(p) for p in PHRASES)]
    out = {}
    for k, row in effects[known].iterrows():
        strong = row[row.abs() >= least].dropna()
        top = strong.reindex(strong.abs().sort_values(ascending=False, kind="stable").index)[:most]
        out[int(k)] = [phrase(str(t), float(e)) for t, e in top.items()]
    return out
