"""benchmarks/bench_profiles.py: profile variants re-scored on a finished run's saved vectors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cellmi.representations import write_representations

from .conftest import make_reps

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
    write_representations(str(tmp_path / "quality-t" / "heldout-d6-s0-t0" / "representations.zarr"),
                          make_reps(str(tmp_path / "no-store.zarr")))
    with pytest.raises(SystemExit, match="held-out run"):
        bp.main(["--tags", "t", "--out", str(tmp_path)])

