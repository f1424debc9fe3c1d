"""Real and real-shaped screens through ``cellmi run`` end to end, as a user runs them."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from tests.clirun import cellmi

pytestmark = pytest.mark.timeout(400)

REAL = Path(__file__).resolve().parent.parent / "data" / "real"
SHORT = ("--quick", "--train.batch_samples", "2", "--train.steps", "20")


def read_tables(workdir: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Representations, field clusters and the report's text without its embedded figures."""
    reps = pd.read_parquet(workdir / "representations.parquet")
    images = pd.read_parquet(workdir / "analysis" / "clusters_images.parquet")
    html = (workdir / "analysis" / "report.html").read_text()
    return reps, images, re.sub(r"data:[^\"')\s]+", "", html)  # base64 may spell any word


def test_transfluor_plate_with_a_plate_map(tmp_path):
    """The Cellomics export (4 wells x 3 fields, one GFP channel d2) with a plate map of two treatments."""
    plate = "AS_09047_050428030001"
    treatment = {"O01": "control", "O02": "control", "O03": "agonist", "O04": "agonist"}
    pd.DataFrame({"Metadata_Plate": plate, "Metadata_Well": list(treatment), "treatment": list(treatment.values()),
                  "Metadata_dose_uM": ["0", "0", "1", "10"]}).to_csv(tmp_path / "map.csv", index=False)
    workdir = tmp_path / "run"
    proc = cellmi("run", *SHORT, "--source", str(REAL / "transfluor-gfp"), "--ingest.preset", "cellomics",
                  "--ingest.channels", "GFP", "--ingest.platemap", str(tmp_path / "map.csv"),
                  "--ingest.label_by", "treatment", "--ingest.n_test", "1", "--cluster.split", "all",
                  "--workdir", str(workdir), timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reps, images, report = read_tables(workdir)
    for table in (reps, images):
        assert {"Metadata_Plate", "Metadata_Well", "Metadata_treatment", "Metadata_dose_uM"} <= set(table.columns)
        assert set(table["Metadata_Plate"]) == {plate}
        wells = table["Metadata_Well"].to_numpy()
        assert (table["Metadata_treatment"].to_numpy() == [treatment[w] for w in wells]).all()
        assert (table["Metadata_phenotype"] == table["Metadata_treatment"]).all()  # label_by
    assert sorted(set(images["Metadata_sample"])) == ["O01", "O02", "O03", "O04"]
    assert len(images) == 12
    assert "GFP" in report and "Metadata_treatment" in report and "agonist" in report


def write_generic(raw: Path, samples: int = 6, fields: int = 2, shape=(160, 224)) -> None:
    """A two-channel screen of non-square 16-bit fields: nuclei (DNA) and a GFP marker whose level
    differs by sample."""
    raw.mkdir(parents=True)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for s in range(samples):
        for f in range(fields):
            rng = np.random.default_rng(10 * s + f)
            dna = rng.poisson(80, shape).astype(np.float64)
            gfp = rng.poisson(60, shape).astype(np.float64)
            for _ in range(14):
                cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(6, 11)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
                dna[disc] += 1500
                gfp[(yy - cy) ** 2 + (xx - cx) ** 2 <= (2 * r) ** 2] += 300 * (1 + s)
            for name, plane in (("DNA", dna), ("GFP", gfp)):
                buf = io.BytesIO()
                tifffile.imwrite(buf, np.clip(plane, 0, 65535).astype(np.uint16))
                (raw / f"S{s}_f{f}_{name}.tif").write_bytes(buf.getvalue())


def test_two_channels_non_square_fields_end_to_end(tmp_path):
    raw = tmp_path / "raw"
    write_generic(raw)
    workdir = tmp_path / "run"
    proc = cellmi("run", *SHORT, "--source", str(raw), "--ingest.preset", "generic", "--ingest.channels", "DNA,GFP",
                  "--workdir", str(workdir), timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reps, images, report = read_tables(workdir)
    assert len(images) == 2 * 2  # the held-out samples' fields
    ys, xs = reps["Metadata_y"].to_numpy(), reps["Metadata_x"].to_numpy()
    assert ys.max() + 64 <= 160 and xs.max() + 64 <= 224 and xs.max() > ys.max()  # windows span the wide axis
    assert "GFP" in report and "pH3" not in report and "actin" not in report
