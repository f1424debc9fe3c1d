"""benchmarks/bench_nuisance.py: the same synthetic cells under one nuisance at a time, and the distances
that say how far it moved a field."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cellmi.data.nuisance import draw_nuisances
from cellmi.data.synth import sample_id, synth_field

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_nuisance.py"
_spec = importlib.util.spec_from_file_location("bench_nuisance", SCRIPT)
bn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bn)

SYNTH = {"seed": 3, "size": 64, "variation": "dev"}


def test_given_nuisances_replace_the_drawn_ones_and_keep_the_cells():
    drawn = draw_nuisances(3, 2, 1, "dev")
    plain = synth_field(2, 1, seed=3, size=64, variation="dev")
    same = synth_field(2, 1, seed=3, size=64, variation="dev", nuisances=drawn)
    assert np.array_equal(plain.pixels, same.pixels)
    for change in (dict(texture=0.3), dict(stain=(1.2, 0.8, 1.0)), dict(blur=2.5)):
        other = synth_field(2, 1, seed=3, size=64, variation="dev", nuisances=dataclasses.replace(drawn, **change))
        assert not np.array_equal(plain.pixels, other.pixels), change
        assert np.array_equal(plain.foreground, other.foreground), change  # the same cells


def test_each_variant_changes_one_nuisance_to_the_levels_strongest():
    nz = draw_nuisances(3, 2, 1, "dev")
    found = bn.variants(nz, "heldout", angle=1.0)
    assert found["none (made again)"] == nz
    for name, changed in found.items():
        differ = [f.name for f in dataclasses.fields(nz) if getattr(nz, f.name) != getattr(changed, f.name)]
        assert len(differ) <= 2 and (differ or name.startswith("none")), (name, differ)  # debris: specks, fibres
    assert found["background texture"].texture == 0.16 and found["focus gradient"].tilt == 3.0
    assert found["vignette"].vignette == (0.30, 0.05, 0.175)
    np.testing.assert_allclose(np.array(found["stain (channels +-)"].stain) / nz.stain, [1.08, 0.92, 1.08])


class _Store:
    url = "memory://store"

    def __init__(self, pixels: dict) -> None:
        self.pixels = pixels

    def read_image(self, sample: str, field: str) -> np.ndarray:
        return self.pixels[sample, field]


def test_fields_are_made_again_under_each_nuisance_and_a_store_of_other_data_is_refused():
    keys = [(sample_id(2), "2"), (sample_id(5), "1")]
    store = _Store({k: bn.remade(SYNTH, *k, None) for k in keys})
    plan = bn.made_under(store, SYNTH, keys, "heldout")
    assert set(plan) == set(bn.variants(draw_nuisances(3, 2, 1, "dev"), "heldout", 0.0))
    for key in keys:
        assert np.array_equal(plan["none (made again)"][key], store.read_image(*key))
        assert not np.array_equal(plan["background texture"][key], store.read_image(*key))
    store.pixels[keys[1]] = store.pixels[keys[1]] + 1
    with pytest.raises(SystemExit, match=f"field {keys[1][0]}/1 is not the generator's"):
        bn.made_under(store, SYNTH, keys, "heldout")


def test_gap_and_nearest_field_by_hand():
    profiles = np.array([[0, 0], [0.1, 0], [5, 5], [5.2, 5]], float)
    samples, rows = np.array(["a", "a", "b", "b"]), np.array([0, 2])
    np.testing.assert_allclose(bn.gaps(profiles, rows, samples), [np.hypot(5, 5), np.hypot(4.9, 5)])
    assert bn.nearest_is_own(profiles, profiles[rows], rows, samples).tolist() == [True, True]
    moved = np.array([[4.9, 5], [0, 0.2]])  # each moved onto the other sample
    assert bn.nearest_is_own(profiles, moved, rows, samples).tolist() == [False, False]


def test_only_development_runs_are_read(tmp_path):
    for name, level in (("dev-d1-s0-t0", "dev"), ("heldout-d6-s0-t0", "heldout")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "settings.json").write_text(json.dumps({"synth": {"variation": level}}))
    with pytest.raises(SystemExit, match="heldout-d6-s0-t0: a held-out run"):
        bn.main(["--runs", str(tmp_path / "dev-d1-s0-t0"), str(tmp_path / "heldout-d6-s0-t0")])
    with pytest.raises(SystemExit, match=r"no settings\.json"):
        bn.main(["--runs", str(tmp_path / "elsewhere")])
