"""Focus QC: blurred fields score low whatever their gain, and are flagged against the median."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellmi.analyze.focus import field_focus, focus_score, sharp_fields
from cellmi.analyze.job import fields_focus, load_input, with_cover
from cellmi.data.masks import foreground_mask
from cellmi.data.synth import synth_field
from cellmi.representations import to_frame, write_parquet
from cellmi.settings import ClusterSettings
from cellmi.store import join, open_store

from .conftest import make_reps, make_store


def _log_dna(pixels: np.ndarray) -> np.ndarray:
    return np.log1p(pixels[0].astype(np.float32))


def test_defocus_lowers_the_score_and_gain_does_not_change_it():
    field = synth_field(0, 0, seed=1, size=256)
    assert field.defocus == 0
    mask = foreground_mask(field.pixels)
    sharp = focus_score(_log_dna(field.pixels), mask)
    brighter = focus_score(_log_dna(np.clip(field.pixels * 1.3, 0, 65535)), mask)
    blurred = focus_score(np.log1p(ndi.gaussian_filter(field.pixels[0].astype(np.float32), 2.5)), mask)
    assert abs(brighter - sharp) < 0.05 * sharp, (sharp, brighter)
    assert blurred < 0.5 * sharp, (sharp, blurred)
    assert np.isnan(focus_score(_log_dna(field.pixels), np.zeros_like(mask)))


def test_the_generators_defocused_fields_are_the_ones_flagged():
    fields = [synth_field(s, f, seed=0, size=256) for s in range(4) for f in range(4)]
    scores = np.array([focus_score(_log_dna(x.pixels), foreground_mask(x.pixels)) for x in fields])
    truth = np.array([x.defocus > 0 for x in fields])
    assert truth.any() and (~truth).any()  # the seed gives both kinds
    np.testing.assert_array_equal(~sharp_fields(scores, 0.67, least=4), truth)


def test_sharp_fields_off_too_few_and_missing_scores():
    scores = np.array([1.0, 1.0, 0.2, np.nan])
    np.testing.assert_array_equal(sharp_fields(scores, 0.67, least=2), [True, True, False, True])
    assert sharp_fields(scores, 0.0, least=2).all()
    assert sharp_fields(scores, 0.67, least=4).all()  # only 3 sharp: fit on all


def test_the_cluster_job_takes_the_focus_inference_measured(tmp_path):
    """Scores in the representations are used as they are (no image read: the store may be gone);
    representations without a score for every field fall back to reading the store."""
    store_url = join(str(tmp_path), "store.zarr")
    make_store(store_url)
    reps = make_reps(store_url)
    pairs = reps.table[["sample", "field"]].drop_duplicates().itertuples(index=False, name=None)
    from_store = field_focus(open_store(store_url), list(pairs))
    measured = {s: {f: 0.5 + i / 100 for i, (s2, f) in enumerate(from_store) if s2 == s} for s, _ in from_store}
    reps.attrs.update(focus=measured, store=join(str(tmp_path), "gone.zarr"))
    got = fields_focus(reps, ClusterSettings())
    assert got == {(s, f): v for s, fields in measured.items() for f, v in fields.items()}
    reps.attrs["store"] = store_url
    del measured["S00"]["1"]
    assert fields_focus(reps, ClusterSettings()) == from_store


def test_the_cluster_job_takes_the_cover_inference_measured_else_the_stores_masks(tmp_path, caplog):
    store_url = join(str(tmp_path), "store.zarr")
    make_store(store_url)
    reps = make_reps(store_url)
    store = open_store(store_url)
    pairs = reps.table[["sample", "field"]].drop_duplicates().itertuples(index=False, name=None)
    masks = {(s, f): float(store.read_mask(s, f).mean()) for s, f in pairs}
    assert len(set(masks.values())) > 1

    def per_window(r):
        return dict(zip(zip(r.table["sample"], r.table["field"], strict=True), r.table["cover"], strict=True))

    assert "cover" not in with_cover(reps, from_store=False).table  # no measure, not asked to read
    assert per_window(with_cover(reps, from_store=True)) == pytest.approx(masks)
    measured = {}
    for (s, f), v in masks.items():
        measured.setdefault(s, {})[f] = v / 2
    reps.attrs.update(cover=measured, store=join(str(tmp_path), "gone.zarr"))  # the store is not read
    assert per_window(with_cover(reps, from_store=True)) == pytest.approx({k: v / 2 for k, v in masks.items()})
    table = str(tmp_path / "windows.parquet")  # a Parquet table carries the cover with every window
    write_parquet(table, to_frame(reps))
    assert per_window(with_cover(load_input(table), from_store=True)) == pytest.approx(
        {k: v / 2 for k, v in masks.items()})
    del measured["S00"]["1"]
    with caplog.at_level("WARNING"):
        assert "cover" not in with_cover(reps, from_store=True).table
    assert "image store unavailable" in caplog.text
