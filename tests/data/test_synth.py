"""The synthetic HT29-like screen: format, determinism, realism checks, phenotypes that differ."""

import itertools

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellmi.data.synth import (
    CHANNELS,
    PHENOTYPES,
    SynthField,
    preview_rgb,
    sample_id,
    synth_field,
    synth_screen,
)

SUBTLE = {("control_colonies", "confluent_colonies"), ("spread_flat", "spread_flat_dim_actin")}
FEATURES = (
    "foreground",
    "nuclei_per_area",
    "nucleus_area",
    "ph3_positive",
    "fragments",
    "elongation",
    "outline",
    "actin_texture",
    "actin_dna",
)


def _same(a: SynthField, b: SynthField) -> bool:
    return (
        (a.sample, a.field, a.phenotype, a.defocus) == (b.sample, b.field, b.phenotype, b.defocus)
        and np.array_equal(a.pixels, b.pixels)
        and np.array_equal(a.foreground, b.foreground)
    )


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, 128)
    mids = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(hist)
    above = below[-1] - below
    sums = np.cumsum(hist * mids)
    gap = sums / np.maximum(below, 1) - (sums[-1] - sums) / np.maximum(above, 1)
    return float(mids[np.argmax(below * above * gap**2)])


def _features(item: SynthField) -> np.ndarray:
    """Simple per-field statistics a CellProfiler user would compute, from the pixels and true cell area."""
    px = item.pixels.astype(np.float32)
    dna, ph3, actin = np.maximum(px - np.percentile(px, 2, axis=(1, 2), keepdims=True), 1.0)
    fg = item.foreground
    nuclei = ndi.binary_opening(np.log(dna) > _otsu(np.log(dna[fg]))) & fg
    labels, count = ndi.label(nuclei)
    index = np.arange(1, count + 1)
    area = ndi.sum_labels(nuclei, labels, index)
    index, area = index[area >= 6], area[area >= 6]
    pos_ph3 = ndi.mean(ph3, labels, index) / ndi.mean(dna, labels, index) > 0.5
    yy, xx = np.indices(nuclei.shape)
    my, mx = ndi.mean(yy, labels, index), ndi.mean(xx, labels, index)
    vyy, vxx = ndi.mean(yy * yy, labels, index) - my**2, ndi.mean(xx * xx, labels, index) - mx**2
    vxy = ndi.mean(yy * xx, labels, index) - my * mx
    half, root = (vyy + vxx) / 2, np.sqrt(np.maximum(((vyy - vxx) / 2) ** 2 + vxy**2, 0))
    elongation = np.sqrt((half + root) / np.maximum(half - root, 1e-3))
    perimeter = ndi.sum_labels(nuclei & ~ndi.binary_erosion(nuclei), labels, index)
    fine = actin - ndi.gaussian_filter(actin, 1.5)
    return np.array(
        [
            fg.mean(),
            len(area) / fg.sum() * 1e3,
            np.median(area),
            np.mean(pos_ph3),
            np.mean(area < 0.25 * np.median(area)),
            np.median(elongation),
            np.median(perimeter**2 / area),
            np.std(fine[fg]) / actin[fg].mean(),
            actin[fg & ~nuclei].mean() / dna[nuclei].mean(),
        ]
    )


@pytest.fixture(scope="module")
def fields() -> dict[str, list[SynthField]]:
    """Phenotype name -> 3 fields of 256 px."""
    return {ph.name: [synth_field(i, f, size=256) for f in range(3)] for i, ph in enumerate(PHENOTYPES)}


@pytest.fixture(scope="module")
def features(fields) -> dict[str, np.ndarray]:
    """Phenotype name -> (fields, features)."""
    return {name: np.array([_features(item) for item in items]) for name, items in fields.items()}


def test_names_ids_and_channels():
    assert CHANNELS == ("DNA", "pH3", "actin")
    names = [ph.name for ph in PHENOTYPES]
    assert len(names) == 14 and len(set(names)) == 14
    assert len(set(PHENOTYPES)) == 14  # parameters differ too, not only names
    ids = [sample_id(i) for i in range(14)]
    assert len(set(ids)) == 14 and all(len(s) == 4 and s.isdigit() for s in ids)
    assert ids == sorted(ids)
    with pytest.raises(ValueError):
        sample_id(14)


def test_field_format_and_determinism():
    item = synth_field(3, 1, seed=7, size=96)
    assert item.pixels.shape == (3, 96, 96) and item.pixels.dtype == np.uint16
    assert item.foreground.shape == (96, 96) and item.foreground.dtype == bool
    assert (item.sample, item.field, item.phenotype) == (sample_id(3), "2", PHENOTYPES[3].name)
    assert _same(item, synth_field(3, 1, seed=7, size=96))
    for other in (synth_field(3, 1, seed=8, size=96), synth_field(3, 2, seed=7, size=96)):
        assert not np.array_equal(item.pixels, other.pixels)


def test_screen_order_and_independence_of_other_fields():
    items = list(synth_screen(samples=3, fields=2, size=64, seed=1))
    assert [(it.sample, it.field) for it in items] == [
        (sample_id(s), f) for s in range(3) for f in ("1", "2")
    ]
    assert [it.phenotype for it in items[::2]] == [ph.name for ph in PHENOTYPES[:3]]
    assert _same(items[3], synth_field(1, 1, seed=1, size=64))  # made alone, same bits
    assert not np.array_equal(items[0].pixels, items[1].pixels)  # fields are independent draws


def test_workers_give_identical_fields():
    serial = list(synth_screen(samples=3, fields=2, size=64, seed=2, workers=1))
    pooled = list(synth_screen(samples=3, fields=2, size=64, seed=2, workers=2))
    assert len(pooled) == len(serial) == 6
    assert all(_same(a, b) for a, b in zip(serial, pooled, strict=True))


@pytest.mark.parametrize("index", range(14))
def test_cells_cover_10_to_60_percent_and_are_brighter(index):
    item = synth_field(index, 0, size=256)
    assert 0.10 <= item.foreground.mean() <= 0.60, PHENOTYPES[index].name
    actin = item.pixels[2].astype(float)
    assert actin[item.foreground].mean() > 1.3 * actin[~item.foreground].mean()


def test_phenotypes_separate_except_the_subtle_pairs(features):
    unseparated = []
    for a, b in itertools.combinations(features, 2):
        fa, fb = features[a], features[b]
        apart = (fa.max(0) < fb.min(0)) | (fb.max(0) < fa.min(0))  # field ranges do not overlap
        if not apart.any():
            unseparated.append((a, b))
    assert set(unseparated) <= SUBTLE, unseparated


def test_features_point_the_way_the_phenotypes_say(features):
    mean = {name: f.mean(0) for name, f in features.items()}
    col = {name: i for i, name in enumerate(FEATURES)}
    ph3 = {name: m[col["ph3_positive"]] for name, m in mean.items()}
    assert max(ph3, key=ph3.get) == "mitotic_arrest" and ph3["mitotic_arrest"] > 3 * ph3["control_colonies"]
    area = col["nucleus_area"]
    assert mean["enlarged_nuclei_g2"][area] > 1.5 * mean["control_colonies"][area]
    assert mean["scattered_small"][area] < 0.8 * mean["control_colonies"][area]
    assert mean["elongated_spindle"][col["elongation"]] > 1.25 * mean["control_colonies"][col["elongation"]]
    assert mean["lobed_nuclei"][col["outline"]] > 1.1 * mean["control_colonies"][col["outline"]]
    assert (
        mean["multinucleate_giant"][col["nuclei_per_area"]]
        < 0.6 * mean["control_colonies"][col["nuclei_per_area"]]
    )
    # the subtle pairs still differ in the one thing they are meant to
    assert mean["confluent_colonies"][col["foreground"]] > 1.3 * mean["control_colonies"][col["foreground"]]
    ratio = col["actin_dna"]
    assert mean["spread_flat_dim_actin"][ratio] < 0.8 * mean["spread_flat"][ratio]


def test_gain_varies_between_fields_of_a_sample(fields):
    spread = []
    for items in fields.values():
        tops = [
            np.percentile(it.pixels[0][it.foreground], 95) - np.percentile(it.pixels[0], 1)
            for it in items
            if not it.defocus
        ]
        spread += list(np.array(tops) / np.mean(tops))
    # without the +-30 % gain the nuclei's brightness varies by ~7 % between fields of a sample
    assert np.std(spread) > 0.12


def test_vignetting_and_defocus_nuisances():
    items = [synth_field(s, f, size=128) for s in range(14) for f in range(4)]
    # vignetting: background is darker in the corners than in the middle, over many fields
    drop = []
    for it in items:
        background = np.where(it.foreground, np.nan, it.pixels[0].astype(float))
        corners = [
            background[ys, xs]
            for ys in (slice(0, 32), slice(-32, None))
            for xs in (slice(0, 32), slice(-32, None))
        ]
        drop.append(np.nanmedian(background[40:88, 40:88]) - np.nanmedian(np.stack(corners)))
    assert np.nanmean(drop) > 5
    # defocus: on a minority of fields, and those fields are blurrier
    blurred = np.array([it.defocus > 0 for it in items])
    assert 0.03 <= blurred.mean() <= 0.35
    sharp = np.array(
        [np.std(ndi.gaussian_laplace(it.pixels[0].astype(float), 1.0)) / np.std(it.pixels[0]) for it in items]
    )
    assert sharp[blurred].mean() < 0.6 * sharp[~blurred].mean()


def test_preview_is_a_stretched_composite():
    rng = np.random.default_rng(0)
    pixels = rng.poisson(120, (3, 64, 64)).astype(np.uint16)
    pixels[0, 10:30, 10:30] += 2000  # DNA -> blue
    pixels[1, 40:50, 40:50] += 3000  # pH3 -> green
    rgb = preview_rgb(pixels)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert rgb[15:25, 15:25, 2].min() > 200 and rgb[15:25, 15:25, 1].max() < 80
    assert rgb[42:48, 42:48, 1].min() > 200
    assert rgb[..., 0].max() < 100  # actin holds only noise: it stays dark, not stretched to white
    field = synth_field(0, 0, size=128)
    assert (
        preview_rgb(field.pixels)[field.foreground, 0].mean()
        > 2 * preview_rgb(field.pixels)[~field.foreground, 0].mean()
    )


def test_gmm_masks_recover_the_known_foreground_of_every_phenotype():
    """Ingest's mask against the generator's truth, one field per phenotype (defocused ones too),
    and the two fields of the default screen where an uncapped mixture split nuclei from cytoplasm
    (IoU 0.23 and 0.01)."""
    from cellmi.data.masks import foreground_mask, iou

    fields = [synth_field(index, 0, seed=3) for index in range(len(PHENOTYPES))]
    fields += [synth_field(1, 2, seed=0), synth_field(10, 2, seed=0)]
    scores = [iou(foreground_mask(field.pixels), field.foreground) for field in fields]
    assert np.mean(scores) >= 0.85, scores
    assert min(scores) >= 0.75, scores


# ---------------------------------------------------------------- nuisances that must not imitate a phenotype


def _worst_draw(score) -> int:
    """The draw (of 500) at the held-out level with the highest ``score(draw)``."""
    return max(range(500), key=score)


def _well(seed: int, index: int):
    from cellmi.data.nuisance import draw_nuisances

    return draw_nuisances(seed, index, 0, "heldout")


def test_density_nuisances_never_turn_control_into_confluent():
    """The pair differs only in cells per field (1.8x); per-well density and cell size change the
    covered area by at most 1.38x between two wells, so even in the held-out draw where they push
    control and confluent closest together, confluent still covers 1.3x more of the field."""
    names = [ph.name for ph in PHENOTYPES]
    control, confluent = names.index("control_colonies"), names.index("confluent_colonies")

    def closeness(seed: int) -> float:
        a, b = _well(seed, control), _well(seed, confluent)
        return (a.density * a.size**2) / (b.density * b.size**2)

    worst = _worst_draw(closeness)
    assert closeness(worst) < 1.38
    cover = {
        index: np.mean([synth_field(index, f, seed=worst, variation="heldout").foreground.mean() for f in range(4)])
        for index in (control, confluent)
    }
    assert cover[confluent] > 1.3 * cover[control], cover


def test_stain_nuisances_never_undo_the_dim_actin():
    """spread_flat_dim_actin has half the actin of spread_flat; in the held-out draw whose stain
    drift and well stain favour it most, its actin/DNA ratio stays below 0.8x spread_flat's."""
    names = [ph.name for ph in PHENOTYPES]
    bright, dim = names.index("spread_flat"), names.index("spread_flat_dim_actin")

    def closeness(seed: int) -> float:
        a, b = _well(seed, dim), _well(seed, bright)
        return (a.stain[2] / a.stain[0]) / (b.stain[2] / b.stain[0])

    worst = _worst_draw(closeness)
    assert closeness(worst) < 1.38
    ratio = FEATURES.index("actin_dna")
    found = {
        index: np.mean([_features(synth_field(index, f, seed=worst, size=256, variation="heldout"))[ratio]
                        for f in range(4)])
        for index in (bright, dim)
    }
    assert found[dim] < 0.8 * found[bright], found


def test_gmm_masks_still_find_the_cells_of_heldout_draws():
    """Debris, uneven background, vignetting and blur make the mask's job harder, not impossible."""
    from cellmi.data.masks import foreground_mask, iou

    fields = [synth_field(index, 0, seed=6, size=256, variation="heldout") for index in range(len(PHENOTYPES))]
    scores = [iou(foreground_mask(field.pixels), field.foreground) for field in fields]
    assert np.mean(scores) >= 0.8, scores
    assert min(scores) >= 0.6, scores
