"""benchmarks/bench_profiles.py: profile variants re-scored on a finished run's saved vectors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellmi.representations import write_representations
from cellmi.store import open_store
from cellmi.train.checkpoint import load_encoder
from tests.infer.standin import tiny_encoder, write_checkpoint

from .conftest import SIZE, make_reps, make_store

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_profiles.py"
_spec = importlib.util.spec_from_file_location("bench_profiles", SCRIPT)
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)


def test_every_variant_is_scored_on_every_run_and_held_out_runs_are_refused(tmp_path):
    for name, seed in (("dev-d1-s0-t0", 0), ("dev-d1-s1-t0", 1)):
        write_representations(str(tmp_path / "quality-t" / name / "representations.zarr"),
                              make_reps(str(tmp_path / "no-store.zarr"), seed=seed))
    bp.main(["--tags", "t", "--out", str(tmp_path), "--ridges", "0.5", "2", "--density", "1", "--fg-powers", "0",
             "--tag", "x"])
    report = json.loads((tmp_path / "profiles-x.json").read_text())
    assert report["variants"] == ["weighted", "even, ridge 0.5", "even, ridge 2", "even, density 1",
                                  "even, foreground^0"]
    assert sorted(report["runs"]) == ["quality-t/dev-d1-s0-t0", "quality-t/dev-d1-s1-t0"]
    for run in report["runs"].values():
        # the fixture's samples are well apart: every recipe groups them exactly
        assert all(v["all-sample image ARI"] == pytest.approx(1.0) for v in run.values())
    assert "| even, density 1 |" in (tmp_path / "profiles-x.md").read_text()
    bp.main(["--tags", "t", "--out", str(tmp_path), "--ridges", "0.5", "--density", "1", "--misplaced", "--tag", "m"])
    assert json.loads((tmp_path / "profiles-m.json").read_text())["misplaced"] == []  # samples well apart
    runs = [tmp_path / "quality-t" / name for name in ("dev-d1-s0-t0", "dev-d1-s1-t0")]
    found = pd.concat([bp.misplaced(bp.load(run)) for run in runs])
    held = int((found["split"] == "test").sum())
    assert found["own"].all() and 0 < held < len(found)
    assert f"| held-out samples | 0 | {held} | 0.0% |" in (tmp_path / "profiles-m.md").read_text()
    write_representations(str(tmp_path / "quality-t" / "heldout-d6-s0-t0" / "representations.zarr"),
                          make_reps(str(tmp_path / "no-store.zarr")))
    with pytest.raises(SystemExit, match="held-out run"):
        bp.main(["--tags", "t", "--out", str(tmp_path)])


def test_misplaced_fields_are_counted_by_split_focus_and_pair():
    found = pd.DataFrame({"phenotype": ["a", "a", "b", "c"], "nearest": ["b", "a", "b", "a"],
                          "split": ["test", "test", "train", "train"], "blurred": [True, False, False, False],
                          "own": [False, True, True, False]})
    got = bp.misplaced_table(found)
    for line in ("| held-out samples | 1 | 2 | 50.0% |", "| training samples | 1 | 2 | 50.0% |",
                 "| flagged blurred | 1 | 1 | 100.0% |", "| in focus | 1 | 3 | 33.3% |",
                 "| a | b | 1 |", "| c | a | 1 |"):
        assert line in got, line
    assert "| a | a |" not in got


def test_open_space_is_the_share_of_a_field_farther_than_the_radius_from_its_foreground():
    class Masks:
        def read_mask(self, sample, field):
            mask = np.zeros((5, 5), bool)
            mask[2, 2] = True
            return mask

    got = bp.open_space(Masks(), [("S01", "1")], [1, 3])
    assert got[1] == {("S01", "1"): pytest.approx(20 / 25)}  # the pixel and its four neighbours are within 1 px
    assert got[3][("S01", "1")] == pytest.approx(0.0)  # corners: 2.83 px


def test_a_scale_as_large_as_the_field_profiles_each_field_by_its_whole_field_vector(tmp_path):
    run = tmp_path / "quality-t" / "dev-d1-s0-t0"
    make_store(str(run / "store.zarr"))
    write_representations(str(run / "representations.zarr"), make_reps(str(run / "store.zarr")))
    write_checkpoint(str(run / "checkpoints"), seed=3)
    bp.main(["--tags", "t", "--out", str(tmp_path), "--ridges", "0.5", "--density", "1", "--fg-powers", "0",
             "--scales", str(SIZE), "--open", "4", "--tag", "s"])
    report = json.loads((tmp_path / "profiles-s.json").read_text())
    assert report["variants"][-3:] == ["even, cover 1 + open space 4 px 1", f"scale {SIZE}", f"even + scale {SIZE}"]
    for name in ("even, cover 1 + open space 4 px 1", f"scale {SIZE}"):
        scored = report["runs"]["quality-t/dev-d1-s0-t0"][name]
        assert 0.0 <= scored["all-sample field NN accuracy"] <= 1.0

    # one window covers the field: its profile is the encoder's global vector of the whole field
    fields = pd.DataFrame({"sample": ["S01", "S04"], "field": ["2", "3"]})
    store, encoder = open_store(str(run / "store.zarr")), tiny_encoder(3)
    profiles = bp.scale_profiles(load_encoder(str(run / "checkpoints"))[0], store, fields, SIZE)
    for row, (sample, field) in enumerate(zip(fields["sample"], fields["field"], strict=True)):
        raw, mask = store.read_image(sample, field), store.read_mask(sample, field)
        pixels = torch.from_numpy(store.normalise(raw, mask))[None]
        with torch.no_grad():
            whole = encoder(pixels, torch.from_numpy(mask.astype(np.float32))[None])[1][0].numpy()
        np.testing.assert_allclose(profiles[row], whole, rtol=1e-4, atol=1e-5)
