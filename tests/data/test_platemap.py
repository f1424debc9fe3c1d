"""Plate maps joined by plate and well: samples by treatment, labels, and every mismatch listed."""

import io

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmi.data import ingest as ingest_mod
from cellmi.errors import UserError
from cellmi.settings import Settings
from cellmi.store import open_store
from tests.data.test_ingest import blob_field

PLATES = ("PLATE-1", "PLATE-2")
WELLS = ("A01", "A02", "B01", "B02")
TREATMENT = {"A01": "DMSO", "A02": "DMSO", "B01": "taxol", "B02": "taxol"}


def write_plates(raw, plates=PLATES, wells=WELLS, fields=2, size=64):
    """Cellomics-named TIFFs: {plate}_{well}f{field}d{channel}.tif, 2 channels (d0, d1)."""
    raw.mkdir(parents=True, exist_ok=True)
    for p, plate in enumerate(plates):
        for w, well in enumerate(wells):
            for f in range(fields):
                pixels, _ = blob_field(100 * p + 10 * w + f, size)
                for c in range(2):
                    buf = io.BytesIO()
                    tifffile.imwrite(buf, pixels[c])
                    (raw / f"{plate}_{well}f{f:02d}d{c}.tif").write_bytes(buf.getvalue())
    return raw


def platemap_frame(plates=PLATES, wells=WELLS):
    rows = [{"Metadata_Plate": p, "Metadata_Well": w.replace("0", "", 1), "treatment": TREATMENT[w],
             "Metadata_moa": "control" if TREATMENT[w] == "DMSO" else "tubulin"} for p in plates for w in wells]
    return pd.DataFrame(rows)


def ingest(raw, work, **ingest):
    settings = Settings(source=str(raw), workdir=str(work), model={"crop": 32},
                        ingest={"preset": "cellomics", "channels": "DNA,tubulin", "n_test": 1, "workers": 2, **ingest})
    return ingest_mod.ingest(settings)


def test_every_plate_map_column_reaches_the_store(tmp_path):
    raw = write_plates(tmp_path / "raw")
    platemap_frame().to_csv(tmp_path / "map.csv", index=False)
    meta = ingest(raw, tmp_path / "w", platemap=str(tmp_path / "map.csv"))
    assert meta.samples == [f"{p}-{w}" for p in PLATES for w in WELLS]  # two plates: plate-well
    assert meta.fields["PLATE-2-B01"] == ["00", "01"]
    assert meta.channels == ["DNA", "tubulin"]
    row = open_store(str(tmp_path / "w" / "store.zarr")).meta.metadata["PLATE-2-B01_01"]
    assert row == {"Metadata_Plate": "PLATE-2", "Metadata_Well": "B01", "Metadata_treatment": "taxol",
                   "Metadata_moa": "tubulin"}


def test_sample_by_treatment_pairs_replicate_wells_and_label_by_gives_labels(tmp_path):
    raw = write_plates(tmp_path / "raw")
    platemap_frame().to_parquet(tmp_path / "map.parquet", index=False)
    meta = ingest(raw, tmp_path / "w", platemap=str(tmp_path / "map.parquet"), sample_by="treatment",
                  label_by="moa", test_samples="taxol")
    assert meta.samples == ["DMSO", "taxol"]
    assert len(meta.fields["taxol"]) == 2 * 2 * 2  # 2 plates x 2 wells x 2 fields
    assert "PLATE-1-B02-01" in meta.fields["taxol"]
    assert meta.phenotypes == {"DMSO": "control", "taxol": "tubulin"}
    assert meta.split == {"DMSO": "train", "taxol": "test"}


def test_one_plate_keeps_sample_equal_to_the_well(tmp_path):
    raw = write_plates(tmp_path / "raw", plates=("P1",))
    meta = ingest(raw, tmp_path / "w")
    assert meta.samples == list(WELLS)
    assert meta.metadata["A02_01"] == {"Metadata_Plate": "P1", "Metadata_Well": "A02"}


def test_mismatches_are_one_line_each_and_nothing_is_written(tmp_path):
    raw = write_plates(tmp_path / "raw")
    frame = platemap_frame()
    frame = frame[~((frame["Metadata_Plate"] == "PLATE-1") & (frame["Metadata_Well"] == "A2"))]  # no row
    extra = pd.DataFrame([{"Metadata_Plate": "PLATE-2", "Metadata_Well": "C05", "treatment": "x", "Metadata_moa": "y"}])
    frame = pd.concat([frame, frame.iloc[[0]], extra])  # a duplicate row; a well without images
    frame.to_csv(tmp_path / "map.csv", index=False)
    with pytest.raises(UserError) as err:
        ingest(raw, tmp_path / "w", platemap=str(tmp_path / "map.csv"))
    text = str(err.value)
    assert "3 problem(s), nothing written" in text
    assert "plate PLATE-1 well A02: no row in the plate map" in text
    assert "plate PLATE-1 well A01 appears in 2 rows" in text
    assert "plate PLATE-2 well C05 has no images" in text
    assert not (tmp_path / "w").exists()


def test_fields_of_one_sample_that_disagree_on_the_label(tmp_path):
    raw = write_plates(tmp_path / "raw")
    frame = platemap_frame()
    frame.loc[0, "Metadata_moa"] = "other"
    frame.to_csv(tmp_path / "map.csv", index=False)
    with pytest.raises(UserError, match="sample DMSO: fields disagree on Metadata_moa"):
        ingest(raw, tmp_path / "w", platemap=str(tmp_path / "map.csv"), sample_by="treatment", label_by="moa")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(sample_by="compound"), r"CELLMI_INGEST__SAMPLE_BY: no column \['compound'\]"),
        (dict(label_by="dose"), "CELLMI_INGEST__LABEL_BY: no column 'dose'"),
        (dict(platemap="nothere.csv"), "CELLMI_INGEST__PLATEMAP: .*nothere.csv does not exist"),
        (dict(platemap="map.xlsx"), "is not a .csv, .tsv, .txt or .parquet file"),
    ],
)
def test_bad_plate_map_settings(tmp_path, change, message):
    raw = write_plates(tmp_path / "raw", plates=("P1",), wells=("A01", "A02"))
    platemap_frame(plates=("P1",), wells=("A01", "A02")).to_csv(tmp_path / "map.csv", index=False)
    settings = {"platemap": str(tmp_path / "map.csv"), **change}
    if "platemap" in change:
        settings["platemap"] = str(tmp_path / change["platemap"])
    with pytest.raises(UserError, match=message):
        ingest(raw, tmp_path / "w", **settings)
    assert not (tmp_path / "w").exists()


def test_plate_map_without_a_well_column_or_with_a_reserved_one(tmp_path):
    raw = write_plates(tmp_path / "raw", plates=("P1",), wells=("A01",))
    pd.DataFrame({"well": ["A01"], "x": ["1"]}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(UserError, match="needs a Metadata_Well column"):
        ingest(raw, tmp_path / "w", platemap=str(tmp_path / "a.csv"))
    pd.DataFrame({"Metadata_Well": ["A01"], "sample": ["1"]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(UserError, match=r"column\(s\) \['Metadata_sample'\] clash"):
        ingest(raw, tmp_path / "w", platemap=str(tmp_path / "b.csv"))


def test_a_plate_map_without_plates_applies_to_every_plate(tmp_path):
    raw = write_plates(tmp_path / "raw")
    platemap_frame(plates=("any",)).drop(columns="Metadata_Plate").to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    meta = ingest(raw, tmp_path / "w", platemap=str(tmp_path / "m.tsv"), sample_by="treatment")
    assert meta.samples == ["DMSO", "taxol"]
    assert meta.metadata["DMSO_PLATE-2-A02-00"]["Metadata_treatment"] == "DMSO"


def test_plate_map_on_s3(tmp_path, s3_env):
    from cellmi.store import write_bytes_atomic

    raw = write_plates(tmp_path / "raw", plates=("P1",))
    buf = io.BytesIO()
    platemap_frame(plates=("P1",)).to_csv(buf, index=False)
    write_bytes_atomic(f"{s3_env}/maps/p1.csv", buf.getvalue())
    meta = ingest(raw, tmp_path / "w", platemap=f"{s3_env}/maps/p1.csv", sample_by="treatment")
    assert sorted(meta.fields) == ["DMSO", "taxol"]
    assert np.all([row["Metadata_Plate"] == "P1" for row in meta.metadata.values()])
