"""Channel display colours: palette by name, ingest.colors, the store's omero metadata, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from pydantic import ValidationError

from cellmi.cli import describe_validation, load_settings
from cellmi.colours import BLUE, CYAN, FALLBACK, GREEN, MAGENTA, RED, channel_colours, colour_word
from cellmi.data import ingest as ingest_mod
from cellmi.errors import UserError
from cellmi.settings import Settings
from cellmi.store import exists, open_store


def test_common_names_take_the_documented_palette():
    names = ["DNA", "pH3", "actin", "Hoechst 33342", "DAPI", "F-actin", "GFP", "mCherry", "Mito", "ER", "RNA"]
    assert channel_colours(names) == [BLUE, GREEN, RED, BLUE, BLUE, RED, GREEN, MAGENTA, MAGENTA, CYAN, "FFFF00"]
    assert channel_colours(["GFP", "DNA"]) == [GREEN, BLUE]  # a GFP + DNA plate, in its own order
    assert channel_colours(["dna_ch1"]) == [BLUE]  # matched on a word of the name, any case


def test_unknown_names_take_unused_fallback_colours():
    # 'DNA' holds blue, so the unknown channels get every other fallback colour before any repeats
    colours = channel_colours(["DNA", *[f"ch{i}" for i in range(7)]])
    assert colours[0] == BLUE and len(set(colours)) == 8 and set(colours) == set(FALLBACK)
    assert channel_colours(["w1"]) == [FALLBACK[0]]
    assert len(channel_colours([f"c{i}" for i in range(10)])) == 10  # past the fallback list: it cycles


def test_colors_setting_overrides_by_name_case_insensitively():
    assert channel_colours(["GFP", "DNA"], ["gfp=#ff8000"]) == ["FF8000", BLUE]
    with pytest.raises(UserError, match=r"CELLMI_INGEST__COLORS: 'rfp' names no channel \(channels: GFP, DNA\)"):
        channel_colours(["GFP", "DNA"], ["RFP=FF0000"])
    assert colour_word("FF8000") == "orange" and colour_word("123456") == "#123456"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("GFP=green", "'GFP=green' is not name=RRGGBB"),
        ("GFP=00FF00,gfp=FF0000", "channel 'gfp' is given twice"),
    ],
)
def test_bad_colors_name_the_setting(monkeypatch, value, expected):
    monkeypatch.setenv("CELLMI_INGEST__COLORS", value)
    with pytest.raises(ValidationError) as err:
        load_settings([])
    line = describe_validation(err.value)
    assert line.startswith("CELLMI_INGEST__COLORS (--ingest.colors): ") and expected in line


def test_flag_and_variable_fill_the_setting(monkeypatch):
    assert load_settings(["--ingest.colors", "GFP=00ff00,DNA=#0000ff"]).ingest.colors == ["GFP=00FF00", "DNA=0000FF"]
    monkeypatch.setenv("CELLMI_INGEST__COLORS", "DNA=FFFFFF")
    assert load_settings([]).ingest.colors == ["DNA=FFFFFF"]


def write_plate(folder, channels=("GFP", "DNA"), samples=2, size=64) -> None:
    """Generic-preset TIFFs ``{sample}_{field}_{channel}.tif``: bright discs on a dim background."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for s in range(samples):
        for f in (1, 2):
            discs = np.zeros((size, size), bool)
            for cy, cx in rng.integers(12, size - 12, (3, 2)):
                discs |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
            for name in channels:
                pixels = rng.poisson(100, (size, size)) + discs * rng.uniform(1500, 3000)
                tifffile.imwrite(folder / f"S{s}_{f}_{name}.tif", pixels.astype(np.uint16))


def ingest_settings(tmp_path, **ingest) -> Settings:
    return Settings(
        source=str(tmp_path / "raw"),
        workdir=str(tmp_path / "work"),
        ingest={"preset": "generic", "channels": ["GFP", "DNA"], "n_test": 1, "workers": 1, **ingest},
    )


def test_ingest_writes_each_channels_colour_into_the_store(tmp_path):
    write_plate(tmp_path / "raw")
    ingest_mod.ingest(ingest_settings(tmp_path, colors=["DNA=00FFFF"]))
    store = open_store(str(tmp_path / "work" / "store.zarr"))
    assert store.channel_colours() == [GREEN, CYAN]  # GFP from the palette, DNA as set
    for sample, field in store.meta.images():
        omero = store.root[f"images/{sample}_{field}"].attrs["ome"]["omero"]["channels"]
        assert [(c["label"], c["color"]) for c in omero] == [("GFP", GREEN), ("DNA", CYAN)]


def test_a_colour_for_a_missing_channel_is_refused_before_anything_is_written(tmp_path):
    write_plate(tmp_path / "raw")
    with pytest.raises(UserError, match="'actin' names no channel"):
        ingest_mod.ingest(ingest_settings(tmp_path, colors=["actin=FF0000"]))
    assert not exists(str(tmp_path / "work" / "store.zarr"))
