import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from cellmi.data import ingest as ingest_mod
from cellmi.data.masks import iou
from cellmi.data.readers import write_dib
from cellmi.errors import IncompleteStoreError, UserError
from cellmi.settings import Settings
from cellmi.store import StoreMeta, StoreWriter, filesystem, open_store

CHANNELS = ("DNA", "pH3", "actin")


def blob_field(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(3, size, size) uint16 with bright discs on a dim noisy background, and the true discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), bool)
    for _ in range(4):
        cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(5, 9)
        truth |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    pixels = rng.poisson(100, (3, size, size)).astype(np.float64)
    pixels[:, truth] += rng.uniform(1500, 3000, 3)[:, None]
    return pixels.astype(np.uint16), truth


def make_raw(folder, samples=3, fields=2, size=64, skip=(), extra=()):
    os.makedirs(folder, exist_ok=True)
    truths = {}
    for s in range(samples):
        for f in range(1, fields + 1):
            pixels, truth = blob_field(s * 10 + f, size)
            truths[(f"{s + 1:04d}", str(f))] = (pixels, truth)
            for c, name in enumerate(CHANNELS):
                fname = f"{s + 1:04d}{f}-{name}.DIB"
                if fname in skip:
                    continue
                with open(os.path.join(folder, fname), "wb") as handle:
                    handle.write(write_dib(pixels[c]))
    for fname, data in extra:
        with open(os.path.join(folder, fname), "wb") as handle:
            handle.write(data)
    return truths


def settings_for(src, work, **ingest):
    return Settings(source=str(src), workdir=str(work), ingest={"n_test": 1, "workers": 2, **ingest},
                    model={"crop": 32})


def test_bbbc018_folder_becomes_a_complete_store(tmp_path):
    truths = make_raw(tmp_path / "raw")
    meta = ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work"))
    store = open_store(str(tmp_path / "work" / "store.zarr"))
    assert store.meta.complete and meta.complete
    assert store.meta.samples == ["0001", "0002", "0003"]
    assert store.meta.fields["0002"] == ["1", "2"]
    assert sorted(store.meta.split.values()) == ["test", "train", "train"]
    assert store.meta.channels == list(CHANNELS)
    assert len(store.meta.stats["mean"]) == 3
    assert store.meta.provenance["source"] == str(tmp_path / "raw")
    for (sample, field), (pixels, truth) in truths.items():
        np.testing.assert_array_equal(store.read_image(sample, field), pixels)
        np.testing.assert_array_equal(store.read_channel(sample, field, 1), pixels[1])
        assert iou(store.read_mask(sample, field), truth) >= 0.8


@pytest.mark.parametrize("mode", ["field", "store"])
def test_statistics_standardise_the_training_foreground(tmp_path, mode):
    make_raw(tmp_path / "raw")
    ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work", intensity=mode))
    store = open_store(str(tmp_path / "work" / "store.zarr"))
    assert store.meta.intensity == mode
    values = []
    for sample, field in store.meta.images("train"):
        mask = store.read_mask(sample, field)
        values.append(store.normalise(store.read_image(sample, field), mask)[:, mask])
    values = np.concatenate(values, axis=1)
    np.testing.assert_allclose(values.mean(axis=1), 0, atol=1e-3)
    np.testing.assert_allclose(values.std(axis=1), 1, atol=1e-3)


def test_split_is_deterministic_and_explicit_list_wins(tmp_path):
    make_raw(tmp_path / "raw", samples=5, fields=1)
    a = ingest_mod.choose_split([f"{i:04d}" for i in range(1, 6)], settings_for("x", "y").ingest)
    b = ingest_mod.choose_split([f"{i:04d}" for i in range(5, 0, -1)], settings_for("x", "y").ingest)
    assert a == b and list(a.values()).count("test") == 1
    explicit = ingest_mod.choose_split(["0001", "0002", "0003"],
                                       settings_for("x", "y", test_samples="0001,0003").ingest)
    assert explicit == {"0001": "test", "0002": "train", "0003": "test"}
    with pytest.raises(UserError, match="unknown sample"):
        ingest_mod.choose_split(["0001", "0002"], settings_for("x", "y", test_samples="0009").ingest)


def test_ome_zarr_py_reads_images_and_labels(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    make_raw(tmp_path / "raw", samples=2, fields=1)
    ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work"))
    store = open_store(str(tmp_path / "work" / "store.zarr"))
    location = parse_url(str(tmp_path / "work" / "store.zarr" / "images" / "0001_1"))
    nodes = list(Reader(location)())
    image = nodes[0]
    data = np.asarray(image.data[0])
    np.testing.assert_array_equal(data, store.read_image("0001", "1"))
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "y", "x"]
    assert image.metadata["channel_names"] == list(CHANNELS)
    labels = [n for n in nodes if "labels" in str(n.zarr)]
    assert labels, "ome-zarr-py found no label image"


def test_existing_store_is_refused_unless_overwrite(tmp_path):
    make_raw(tmp_path / "raw", samples=2, fields=1)
    ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work"))
    with pytest.raises(UserError, match="store already exists"):
        ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work"))
    ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work", overwrite=True))
    assert open_store(str(tmp_path / "work" / "store.zarr")).meta.complete


def _tiff(array):
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


BAD_INPUTS = {
    "truncated": (dict(extra=[("00011-DNA.DIB", write_dib(np.ones((64, 64), np.uint16))[:-100])]),
                  {}, "truncated DIB"),
    "missing channel": (dict(skip={"00021-pH3.DIB"}), {}, r"sample 0002 field 1: missing channel\(s\) \['pH3'\]"),
    "channel sizes": (dict(extra=[("00011-DNA.DIB", write_dib(np.ones((32, 64), np.uint16)))]),
                      {}, "channel sizes differ"),
    "field sizes": (dict(extra=[(f"00041-{c}.DIB", write_dib(np.ones((32, 32), np.uint16))) for c in CHANNELS]),
                    {}, "field sizes differ from 64x64: 0004/1 is 32x32"),
    "unknown channel": (dict(extra=[("00011-GFP.DIB", write_dib(np.ones((64, 64), np.uint16)))]),
                        {}, "channel 'GFP' is not in CELLMI_INGEST__CHANNELS"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_listed_and_nothing_is_written(tmp_path, case):
    raw_kwargs, ingest_kwargs, message = BAD_INPUTS[case]
    make_raw(tmp_path / "raw", **raw_kwargs)
    with pytest.raises(UserError, match=message) as err:
        ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work", **ingest_kwargs))
    assert "nothing written" in str(err.value)
    assert not (tmp_path / "work" / "store.zarr").exists()


def test_generic_preset_duplicates_and_nan_are_reported_together(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = np.full((32, 32), 500, np.uint16)
    for s in ("A", "B"):
        for c in CHANNELS:
            (raw / f"{s}_1_{c}.tif").write_bytes(_tiff(good))
    (raw / "A_1_DNA.png").write_bytes(_tiff(good))  # same (sample, field, channel) twice
    nan = np.ones((32, 32), np.float32)
    nan[0, 0] = np.nan
    (raw / "B_1_actin.tif").write_bytes(_tiff(nan))
    (raw / "notes.txt").write_text("ignored with a warning")
    with pytest.raises(UserError) as err:
        ingest_mod.ingest(settings_for(raw, tmp_path / "work", preset="generic"))
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "duplicate files for sample A field 1 channel DNA" in text
    assert "B_1_actin.tif: 1 NaN/Inf pixels" in text
    assert not (tmp_path / "work").exists()


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="source folder is empty"):
        ingest_mod.ingest(settings_for(tmp_path / "empty", tmp_path / "work"))
    with pytest.raises(UserError, match="does not exist"):
        ingest_mod.ingest(settings_for(tmp_path / "nope", tmp_path / "work"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.md").write_text("x")
    with pytest.raises(UserError, match="no file matches the bbbc018 pattern"):
        ingest_mod.ingest(settings_for(tmp_path / "other", tmp_path / "work"))


def test_custom_pattern(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in ("plate1-A01", "plate1-B02"):
        for f in ("s1", "s2"):
            pixels, _ = blob_field(len(s + f), 32)
            for c, name in enumerate(CHANNELS):
                (raw / f"{s}--{f}--w{name}.dib").write_bytes(write_dib(pixels[c]))
    pattern = r"(?P<sample>.+)--(?P<field>s\d)--w(?P<channel>\w+)\.dib"
    meta = ingest_mod.ingest(settings_for(raw, tmp_path / "work", pattern=pattern))
    assert meta.fields == {"plate1-A01": ["s1", "s2"], "plate1-B02": ["s1", "s2"]}


def test_failure_while_writing_leaves_no_store(tmp_path, monkeypatch):
    make_raw(tmp_path / "raw", samples=3, fields=2)
    calls = {"n": 0}
    real = ingest_mod.foreground_mask

    def flaky(pixels, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real(pixels, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "foreground_mask", flaky)
    with pytest.raises(OSError, match="disk full"):
        ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work"))
    assert not (tmp_path / "work" / "store.zarr").exists()


def test_incomplete_store_is_an_error(tmp_path):
    meta = StoreMeta(channels=["DNA"], fields={"a": ["1"]}, split={"a": "train"}, shape=(8, 8))
    writer = StoreWriter(str(tmp_path / "s.zarr"), meta)
    writer.write_image("a", "1", np.zeros((1, 8, 8), np.uint16), np.zeros((8, 8), bool))
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_store(str(tmp_path / "s.zarr"))
    writer.finish()
    assert open_store(str(tmp_path / "s.zarr")).meta.complete


def test_cli_reports_one_line_and_exit_2(tmp_path):
    make_raw(tmp_path / "raw", skip={"00011-DNA.DIB"})
    proc = subprocess.run([sys.executable, "-m", "cellmi", "ingest", "--source", str(tmp_path / "raw"),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "missing channel" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work" / "store.zarr").exists()


def test_s3_to_s3_equals_local(tmp_path, s3_env):
    make_raw(tmp_path / "raw", samples=3, fields=1)
    fs, _ = filesystem(s3_env)
    fs.put(str(tmp_path / "raw") + "/", f"{s3_env[5:]}/raw/", recursive=True)
    ingest_mod.ingest(settings_for(f"{s3_env}/raw", f"{s3_env}/work"))
    ingest_mod.ingest(settings_for(tmp_path / "raw", tmp_path / "work"))
    remote = open_store(f"{s3_env}/work/store.zarr")
    local = open_store(str(tmp_path / "work" / "store.zarr"))
    assert remote.meta.fields == local.meta.fields and remote.meta.split == local.meta.split
    np.testing.assert_allclose(remote.meta.stats["mean"], local.meta.stats["mean"])
    for sample, field in local.meta.images():
        np.testing.assert_array_equal(remote.read_image(sample, field), local.read_image(sample, field))
        np.testing.assert_array_equal(remote.read_mask(sample, field), local.read_mask(sample, field))


def _png(array):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_eight_channels_non_square_and_8_bit_png(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    names = [f"c{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    planes = {}
    for s in ("A", "B"):
        for c in names:
            planes[(s, c)] = rng.integers(0, 255, (48, 80), dtype=np.uint8)
            (raw / f"{s}_1_{c}.png").write_bytes(_png(planes[(s, c)]))
    meta = ingest_mod.ingest(settings_for(raw, tmp_path / "w", preset="generic", channels=",".join(reversed(names))))
    store = open_store(str(tmp_path / "w" / "store.zarr"))
    assert meta.shape == (48, 80) and meta.channels == list(reversed(names))
    image = store.read_image("B", "1")
    assert image.shape == (8, 48, 80) and image.dtype == np.uint16
    np.testing.assert_array_equal(image[0], planes[("B", "c7")])
    assert store.read_mask("B", "1").shape == (48, 80)


def test_float_images_scale_by_one_factor_for_the_screen(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(1)
    planes = {s: rng.uniform(0, top, (3, 32, 32)).astype(np.float32) for s, top in (("A", 0.5), ("B", 0.25))}
    for s, pixels in planes.items():
        for c, name in enumerate(CHANNELS):
            (raw / f"{s}_1_{name}.tif").write_bytes(_tiff(pixels[c]))
    meta = ingest_mod.ingest(settings_for(raw, tmp_path / "w", preset="generic"))
    scale = 65535 / max(float(p.max()) for p in planes.values())
    assert meta.float_scale == pytest.approx(scale)
    store = open_store(str(tmp_path / "w" / "store.zarr"))
    for s, pixels in planes.items():  # one factor: B stays half as bright as A
        np.testing.assert_array_equal(store.read_image(s, "1"), np.rint(pixels * np.float32(scale)).astype(np.uint16))


def test_a_field_smaller_than_the_window_is_one_line(tmp_path):
    make_raw(tmp_path / "raw", samples=2, fields=1, size=64)
    settings = Settings(source=str(tmp_path / "raw"), workdir=str(tmp_path / "w"), model={"crop": 96},
                        ingest={"n_test": 1})
    with pytest.raises(UserError, match=r"sample 0001 field 1: 64x64 is smaller than the 96x96 window "
                                        r"\(set CELLMI_MODEL__CROP to at most 64"):
        ingest_mod.ingest(settings)
    assert not (tmp_path / "w").exists()
