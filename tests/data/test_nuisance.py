"""Plate-, well- and field-level nuisances of the synthetic screen: levels, draws, and their pixels."""

import dataclasses
import hashlib
from typing import get_args

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellmi.data.nuisance import (
    LEVELS,
    Nuisances,
    Ranges,
    channel_vignette,
    debris,
    draw_nuisances,
    focus_tilt,
    plate_position,
    texture,
)
from cellmi.data.synth import synth_field, synth_screen
from cellmi.settings import Settings, SynthSettings
from tests.clirun import assert_one_line_error, cellmi

# What the generator made before the nuisances existed (commit 4437060): the base level must keep it.
BASE_DIGESTS = {"field 3/1 seed 7 96 px": "ee3e4cf7658c961e", "screen 14x2 seed 0 64 px": "317b315b6fb57111"}
DRAWS = range(300)


def _digest(items) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.pixels.tobytes())
        h.update(it.foreground.tobytes())
        h.update(repr(it.defocus).encode())
    return h.hexdigest()[:16]


def _spread(level: str, pick) -> float:
    """Standard deviation over many draws of one drawn nuisance value."""
    return float(np.std([pick(draw_nuisances(seed, seed % 14, seed % 4, level)) for seed in DRAWS]))


def test_base_level_keeps_the_original_draw_bit_for_bit():
    assert SynthSettings().variation == "base" and Settings().synth.variation == "base"
    found = {
        "field 3/1 seed 7 96 px": _digest([synth_field(3, 1, seed=7, size=96)]),
        "screen 14x2 seed 0 64 px": _digest(synth_screen(samples=14, fields=2, size=64, seed=0)),
    }
    assert found == BASE_DIGESTS
    assert draw_nuisances(5, 3, 1, "base") == Nuisances() and not Nuisances().extra


def test_levels_match_the_setting_and_unknown_levels_are_refused():
    assert set(get_args(SynthSettings.model_fields["variation"].annotation)) == set(LEVELS)
    proc = cellmi("config", env={"CELLMI_SYNTH__VARIATION": "wild"})
    assert_one_line_error(proc, "CELLMI_SYNTH__VARIATION", "heldout")
    with pytest.raises(ValueError, match="variation level 'wild'"):
        synth_field(0, 0, size=64, variation="wild")
    with pytest.raises(ValueError, match="variation level"):
        next(synth_screen(samples=2, fields=1, size=64, variation="Heldout"))


def test_every_level_is_reproducible_and_independent_of_workers():
    items = list(synth_screen(samples=3, fields=2, size=64, seed=4, variation="heldout"))
    again = synth_field(2, 1, seed=4, size=64, variation="heldout")
    assert _digest([items[5]]) == _digest([again])  # made alone, same bits
    pooled = list(synth_screen(samples=3, fields=2, size=64, seed=4, workers=2, variation="heldout"))
    assert _digest(items) == _digest(pooled)
    dev = synth_field(2, 1, seed=4, size=64, variation="dev")
    assert not np.array_equal(dev.pixels, again.pixels)


def test_heldout_ranges_are_at_least_as_wide_as_dev_and_wider_in_some():
    base, dev, held = (dataclasses.asdict(LEVELS[k]) for k in ("base", "dev", "heldout"))
    for name in base:
        lo, mid, hi = (np.atleast_1d(x[name]) for x in (base, dev, held))
        assert np.all(lo <= mid) and np.all(mid <= hi), name
    assert sum(np.any(np.atleast_1d(held[k]) > np.atleast_1d(dev[k])) for k in base) >= 10
    assert set(base) == {f.name for f in dataclasses.fields(Ranges)}


def test_drawn_nuisances_spread_more_on_heldout_draws():
    picks = {
        "density": lambda nz: nz.density,
        "cell size": lambda nz: nz.size,
        "DNA stain": lambda nz: nz.stain[0],
        "actin vignetting": lambda nz: nz.vignette[2],
        "blur": lambda nz: nz.blur,
        "specks": lambda nz: nz.specks,
        "background": lambda nz: nz.texture,
    }
    for name, pick in picks.items():
        assert _spread("base", pick) == 0.0, name
        assert _spread("heldout", pick) > 1.2 * _spread("dev", pick) > 0.0, name


def test_stain_drifts_across_the_plate():
    """Within a draw, a well's stain follows its plate position (a gradient), not well noise alone."""
    fits = []
    for seed in range(20):
        pos = np.array([plate_position(seed, s) for s in range(14)])
        dna = np.log([draw_nuisances(seed, s, 0, "heldout").stain[0] for s in range(14)])
        design = np.c_[np.ones(14), pos]
        residual = dna - design @ np.linalg.lstsq(design, dna, rcond=None)[0]
        fits.append(1.0 - residual.var() / dna.var())
        assert np.exp(np.ptp(dna)) > 1.1  # the plate's two sides differ by > 10 %
    assert np.median(fits) > 0.8
    assert len({plate_position(seed, 0) for seed in range(20)}) > 5  # layouts differ between draws


def test_wells_share_their_nuisances_and_fields_differ():
    a, b = draw_nuisances(7, 3, 0, "dev"), draw_nuisances(7, 3, 1, "dev")
    assert (a.density, a.size, a.stain, a.touching) == (b.density, b.size, b.stain, b.touching)
    assert a.vignette == draw_nuisances(7, 9, 2, "dev").vignette  # one microscope per plate
    assert (a.blur, a.texture) != (b.blur, b.texture)


def test_debris_is_bright_in_every_channel():
    """Specks and fibres are broad-band autofluorescence, unlike apoptotic fragments (DNA only)."""
    rng = np.random.default_rng(0)
    for kind in ({"specks": 1}, {"fibres": 1}):
        for _ in range(10):
            canvas = np.zeros((3, 200, 200), np.float32)
            debris(canvas, Nuisances(**kind), rng)
            top = canvas.reshape(3, -1).max(axis=1)
            if top.max() == 0:  # placed off this small canvas
                continue
            assert top.min() >= 0.3 * top.max(), (kind, top)

def test_a_fibre_is_a_long_thin_line():
    inside = 0
    for seed in range(10):
        canvas = np.zeros((3, 400, 400), np.float32)
        debris(canvas, Nuisances(fibres=1), np.random.default_rng(seed))
        lit = canvas[0] > 0.2 * canvas[0].max()
        if lit[[0, -1]].any() or lit[:, [0, -1]].any():
            continue  # runs off the canvas
        inside += 1
        _, count = ndi.label(lit)
        ys, xs = np.nonzero(lit)
        length = max(np.ptp(ys), np.ptp(xs))
        assert count == 1 and length >= 40 and lit.sum() / length < 8, (seed, count, length, lit.sum())
    assert inside >= 3


def test_specks_saturate_the_camera_in_every_channel():
    hits = 0
    for seed in range(6):
        for sample in range(14):
            if draw_nuisances(seed, sample, 0, "heldout").specks == 0:
                continue
            item = synth_field(sample, 0, seed=seed, size=256, variation="heldout")
            full = item.pixels == 65535
            if full[0].any():
                hits += 1
                where = full[0] & ~ndi.binary_dilation(item.foreground, iterations=3)
                for channel in item.pixels[1:]:
                    assert np.all(channel[where] > 20 * np.median(channel)), "a speck lit DNA alone"
            if hits >= 3:
                return
    pytest.fail(f"only {hits} saturated fields among heldout fields with specks")


def test_channel_vignetting_falls_towards_the_corners():
    light = channel_vignette(65, (0.0, 0.1, 0.3))
    assert light.shape == (3, 65, 65)
    assert np.allclose(light[:, 32, 32], 1.0)
    assert np.allclose(light[:, 0, 0], [1.0, 0.9, 0.7], atol=1e-3)
    assert light[2, 0, 32] > light[2, 0, 0]  # an edge's middle is brighter than its corner


def test_background_texture_is_uneven_at_the_asked_strength():
    flat = texture(np.random.default_rng(0), 256, 0.0)
    assert np.all(flat == 1.0)
    for amount in (0.08, 0.16):
        t = texture(np.random.default_rng(1), 256, amount)
        assert t.shape == (256, 256) and t.min() > 0
        assert 0.5 * amount < t.std() < 1.5 * amount
        assert np.corrcoef(t[:, :-8].ravel(), t[:, 8:].ravel())[0, 1] > 0.5  # smooth, structured


def test_focus_tilt_blurs_one_side_only():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 64, 64)).astype(np.float32)
    tilted = focus_tilt(image, 3.0, 0.0)  # sharp at the left edge, blurred at the right
    assert np.allclose(tilted[0, :, 0], image[0, :, 0], atol=0.05)
    assert tilted[0, :, -8:].std() < 0.5 * image[0, :, -8:].std()


def test_more_fields_are_defocused_on_heldout_draws():
    share = {}
    for level in ("dev", "heldout"):
        items = [synth_field(s, f, seed=seed, size=64, variation=level)
                 for seed in (1, 2) for s in range(14) for f in range(4)]
        share[level] = np.mean([it.defocus > 0 for it in items])
    assert 0.08 <= share["dev"] <= 0.22 and 0.18 <= share["heldout"] <= 0.35
    assert share["heldout"] > share["dev"]


def test_the_setting_reaches_the_store(tmp_path, monkeypatch):
    """CELLMI_SYNTH__VARIATION, as a user sets it, decides the pixels `cellmi ingest` stores."""
    from cellmi.data.ingest import ingest
    from cellmi.store import open_store

    monkeypatch.setenv("CELLMI_SYNTH__VARIATION", "heldout")
    settings = Settings(workdir=str(tmp_path), synth={"samples": 2, "fields": 1, "size": 64, "seed": 3},
                        ingest={"n_test": 1, "workers": 1})
    ingest(settings)
    store = open_store(str(tmp_path / "store.zarr"))
    assert "variation=heldout" in store.meta.provenance["source"]
    for index in range(2):
        expected = synth_field(index, 0, seed=3, size=64, variation="heldout").pixels
        np.testing.assert_array_equal(store.read_image(store.meta.samples[index], "1"), expected)
