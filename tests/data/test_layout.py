"""File naming: the Cellomics export preset, channel indices and names, wells."""

import re

import pytest

from cellmi.data.layout import PRESETS, channel_names, match_files, well_id
from cellmi.errors import UserError
from cellmi.settings import IngestSettings

CELLOMICS = re.compile(PRESETS["cellomics"])


@pytest.mark.parametrize(
    ("name", "plate", "well", "field", "channel"),
    [
        ("AS_09125_050116030001_D03f00d0.tif", "AS_09125_050116030001", "D03", "00", "0"),
        ("AS_09047_050428030001_O01f02d2.TIF", "AS_09047_050428030001", "O01", "02", "2"),
        ("MFGTMP_150625_A01f001d4.C01", "MFGTMP_150625", "A01", "001", "4"),
        ("plate7_P24f12o1.DIB", "plate7", "P24", "12", "1"),
        ("plate7_AF48f05d3.c01", "plate7", "AF48", "05", "3"),
        ("plate7_B02.dib", "plate7", "B02", "00", "0"),  # field and channel left out
    ],
)
def test_cellomics_names(name, plate, well, field, channel):
    (m,), unmatched = match_files([f"/raw/{name}"], CELLOMICS, set())
    assert unmatched == []
    assert (m.plate, m.well, m.field, m.channel) == (plate, well, field, channel)


@pytest.mark.parametrize("name", ["AS_0912_D03f00d0.png", "D03f00d0.tif", "AS_09125_D03f0d0.tif", "notes.txt"])
def test_cellomics_refuses_other_names(name):
    found, unmatched = match_files([f"/raw/{name}"], CELLOMICS, set())
    assert found == [] and unmatched == [name]


def _matches(*names):
    return match_files([f"/raw/{n}" for n in names], CELLOMICS, set())[0]


def test_channel_indices_are_named_in_index_order():
    matches = _matches("p_A01f00d2.tif", "p_A01f00d0.tif", "p_A01f00d1.tif")
    names, token = channel_names(matches, IngestSettings(preset="cellomics", channels="DNA,pH3,actin"))
    assert names == ["DNA", "pH3", "actin"]
    assert token == {"0": "DNA", "1": "pH3", "2": "actin"}


def test_channel_names_go_to_the_indices_found():
    matches = _matches("p_O01f00d2.tif", "p_O01f00d4.tif")
    names, token = channel_names(matches, IngestSettings(preset="cellomics", channels="GFP,DNA"))
    assert token == {"2": "GFP", "4": "DNA"}
    names, token = channel_names(matches, IngestSettings(preset="cellomics"))
    assert names == ["ch2", "ch4"] and token == {"2": "ch2", "4": "ch4"}
    with pytest.raises(UserError, match=r"names 3 channel\(s\).*2 channel index\(es\) \(d2, d4\)"):
        channel_names(matches, IngestSettings(preset="cellomics", channels="a,b,c"))


def test_named_channels_match_case_insensitively_with_the_bbbc018_default():
    pattern = re.compile(PRESETS["bbbc018"])
    matches = match_files(["/r/00011-dna.DIB", "/r/00011-PH3.DIB", "/r/00011-Actin.DIB"], pattern, set())[0]
    names, token = channel_names(matches, IngestSettings())
    assert names == ["DNA", "pH3", "actin"]
    assert token == {"dna": "DNA", "PH3": "pH3", "Actin": "actin"}


@pytest.mark.parametrize(("text", "well"), [("A1", "A01"), ("a01", "A01"), ("P024", "P24"), ("AF48", "AF48"),
                                            (" B7 ", "B07"), ("X", "X")])
def test_well_spellings_meet(text, well):
    assert well_id(text) == well
