"""Illumination correction: flat-fields estimated from a plate's fields, supplied, or none."""

import io

import numpy as np
import pytest
import tifffile

from cellmi.data import ingest as ingest_mod
from cellmi.data.illumination import MIN_FIELDS, FlatFields, corner_ratio, normalise_flat
from cellmi.errors import UserError
from cellmi.settings import Settings
from cellmi.store import open_store

SIZE = 96


def vignette(size=SIZE, fall=0.45):
    """A radial fall-off: 1 in the centre, 1 - fall in the corners."""
    yy, xx = np.mgrid[:size, :size] / (size - 1) - 0.5
    return 1 - fall * (yy**2 + xx**2) / 0.5


def cells(seed, size=SIZE, n=6):
    """(Y, X) float: a background of 200 with bright discs in random places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.full((size, size), 200.0)
    for _ in range(n):
        (cy, cx), r = rng.integers(0, size, 2), int(rng.integers(4, 8))
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] += 1500
    return out + rng.normal(0, 5, out.shape)


def test_the_estimate_recovers_the_fall_off_and_not_the_cells():
    flats = FlatFields()
    for seed in range(30):
        flats.add("p", (cells(seed) * vignette())[None].astype(np.uint16))
    flat = flats.estimate("p")[0]
    truth = normalise_flat(vignette()[None])[0]
    assert flat.shape == (SIZE, SIZE) and flat.min() >= 1.0
    assert np.abs(flat / truth - 1).max() < 0.1
    assert corner_ratio(flat) == pytest.approx(corner_ratio(truth), rel=0.03)


def test_only_a_pattern_the_halves_agree_on_counts_as_reliable():
    flat_screen, vignetted, few = FlatFields(), FlatFields(), FlatFields()
    for seed in range(30):
        flat_screen.add("", cells(seed)[None].astype(np.uint16))
        vignetted.add("", (cells(seed) * vignette())[None].astype(np.uint16))
    for seed in range(MIN_FIELDS - 1):
        few.add("", (cells(seed) * vignette())[None].astype(np.uint16))
    estimate = flat_screen.estimate("")[0]
    assert estimate.max() / estimate.min() < 1.02
    check = flat_screen.check("")
    assert check.fields == 30 and check.amplitude < 0.02 and not check.reliable
    check = vignetted.check("")
    assert check.amplitude > 0.4 and check.disagreement < 0.05 and check.reliable
    assert not few.check("").reliable


def write_tiffs(raw, fields=32, wells=("A01", "A02", "A03", "A04"), fall=0.45):
    raw.mkdir(parents=True, exist_ok=True)
    planes = {}
    for i in range(fields):
        well, f = wells[i % len(wells)], i // len(wells)
        plane = (cells(i) * vignette(fall=fall)).astype(np.uint16)
        buf = io.BytesIO()
        tifffile.imwrite(buf, plane)
        name = f"P1_{well}f{f:02d}d0.tif"
        (raw / name).write_bytes(buf.getvalue())
        planes[(well, f"{f:02d}")] = plane
    return planes


def ingest(raw, work, **ingest):
    return ingest_mod.ingest(Settings(source=str(raw), workdir=str(work), model={"crop": 32},
                                      ingest={"preset": "cellomics", "n_test": 1, "workers": 2, **ingest}))


def test_ingest_divides_the_estimate_out_and_records_it(tmp_path):
    planes = write_tiffs(tmp_path / "raw")
    meta = ingest(tmp_path / "raw", tmp_path / "w")
    assert meta.illumination["method"] == "auto"
    info = meta.illumination["plates"]["P1"]
    assert info["fields"] == 32 and info["corrected"] and info["pattern"] > 2 * info["halves_differ"]
    store = open_store(str(tmp_path / "w" / "store.zarr"))
    flat = store.root["illumination/0"][...]
    assert store.root["illumination"].attrs["plates"] == ["P1"] and flat.shape == (1, SIZE, SIZE)
    raw_mean = np.mean([p for p in planes.values()], axis=0)
    stored = [store.read_image(w, f)[0] for w, f in planes]
    np.testing.assert_array_equal(stored[0], np.rint(planes[("A01", "00")] / flat[0]).astype(np.uint16))
    before, after = corner_ratio(raw_mean), corner_ratio(np.mean(stored, axis=0))
    assert before > 1.5 and abs(after - 1) < 0.5 * abs(before - 1)


def test_auto_leaves_a_plate_of_few_fields_alone_and_estimate_insists(tmp_path):
    planes = write_tiffs(tmp_path / "raw", fields=MIN_FIELDS - 2)
    meta = ingest(tmp_path / "raw", tmp_path / "w")
    assert meta.illumination["plates"]["P1"]["corrected"] is False
    store = open_store(str(tmp_path / "w" / "store.zarr"))
    np.testing.assert_array_equal(store.read_image("A01", "00")[0], planes[("A01", "00")])
    meta = ingest(tmp_path / "raw", tmp_path / "w2", illumination="estimate")
    assert meta.illumination["plates"]["P1"]["corrected"] is True


def test_supplied_flat_fields(tmp_path):
    planes = write_tiffs(tmp_path / "raw", fields=4)
    flats = tmp_path / "flats"
    flats.mkdir()
    np.save(flats / "ch0.npy", vignette())
    meta = ingest(tmp_path / "raw", tmp_path / "w", illumination=str(flats))
    assert meta.illumination["method"] == "supplied"
    store = open_store(str(tmp_path / "w" / "store.zarr"))
    expected = np.rint(planes[("A02", "00")] / normalise_flat(vignette()[None])[0]).astype(np.uint16)
    np.testing.assert_array_equal(store.read_image("A02", "00")[0], expected)


@pytest.mark.parametrize(
    ("flat", "message"),
    [(None, "no flat-field for channel ch0"), (np.ones((10, 10)), "flat-field is 10x10, the fields are 96x96"),
     (np.zeros((SIZE, SIZE)), "finite values above 0")],
)
def test_bad_supplied_flat_fields(tmp_path, flat, message):
    write_tiffs(tmp_path / "raw", fields=4)
    (tmp_path / "flats").mkdir()
    if flat is not None:
        buf = io.BytesIO()
        tifffile.imwrite(buf, flat.astype(np.float32))
        (tmp_path / "flats" / "P1_ch0.tif").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match=message):
        ingest(tmp_path / "raw", tmp_path / "w", illumination=str(tmp_path / "flats"))
    assert not (tmp_path / "w").exists()


def test_none_stores_the_pixels_as_read(tmp_path):
    planes = write_tiffs(tmp_path / "raw")
    meta = ingest(tmp_path / "raw", tmp_path / "w", illumination="none")
    assert meta.illumination == {"method": "none"}
    store = open_store(str(tmp_path / "w" / "store.zarr"))
    np.testing.assert_array_equal(store.read_image("A03", "01")[0], planes[("A03", "01")])
    assert "illumination" not in store.root
