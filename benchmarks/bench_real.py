"""Real images: illumination correction on the Transfluor plate, masks against CellProfiler on the
NF1 Cell Painting fields, and (with --run) a full-length `cellmi run` on the Transfluor plate.

    python benchmarks/bench_real.py                   # illumination + masks (about a minute)
    python benchmarks/bench_real.py --run             # ... and the full-length run (default settings)

Reads the full sets in ../shared/real-data when present (else the copies in tests/data/real).
Writes benchmarks/out/real.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from cellmi.data.illumination import FlatFields, corner_ratio
from cellmi.data.masks import foreground_mask, iou, iou_where_referenced

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "real-data"
REAL = SHARED if SHARED.exists() else ROOT / "tests" / "data" / "real"


def uniformity(mean_field: np.ndarray) -> float:
    """Brightest over darkest of the 4 x 4 block means of a (Y, X) mean field."""
    h, w = (s // 4 * 4 for s in mean_field.shape)
    blocks = mean_field[:h, :w].reshape(4, h // 4, 4, w // 4).mean(axis=(1, 3))
    return float(blocks.max() / blocks.min())


def transfluor() -> dict:
    """Mean field of the plate before and after dividing out the flat-field estimated from it, and
    the same with the flat-field of the other half of the wells (held-out check)."""
    files = sorted((REAL / "transfluor-gfp").glob("*.TIF"))
    fields = [tifffile.imread(f).astype(np.float32) for f in files]
    wells = [re.search(r"_([A-Z]\d+)f", f.name)[1] for f in files]
    flats = FlatFields()
    for f in fields:
        flats.add("", f[None])
    check = flats.check("")
    flat = flats.estimate("")[0]
    before, after = np.mean(fields, 0), np.mean([f / flat for f in fields], 0)
    order = sorted(set(wells))
    half = [order.index(w) % 2 == 0 for w in wells]
    held = FlatFields()
    for f, h in zip(fields, half, strict=True):
        if h:
            held.add("", f[None])
    other = [f for f, h in zip(fields, half, strict=True) if not h]
    flat_half = held.estimate("")[0]
    return {
        "fields": len(fields),
        "pattern": round(check.amplitude, 3),
        "halves_differ": round(check.disagreement, 3),
        "centre_to_corner_before": round(corner_ratio(before), 3),
        "centre_to_corner_after": round(corner_ratio(after), 3),
        "blocks_max_over_min_before": round(uniformity(before), 3),
        "blocks_max_over_min_after": round(uniformity(after), 3),
        "held_out_wells_blocks_before": round(uniformity(np.mean(other, 0)), 3),
        "held_out_wells_blocks_after": round(uniformity(np.mean([f / flat_half for f in other], 0)), 3),
    }


def nf1_masks() -> list[dict]:
    """cellmi's foreground against CellProfiler's whole-cell mask, per field."""
    rows = []
    for ref_file in sorted((REAL / "nf1-cellpainting" / "masks").glob("*_MaskCells.tiff")):
        well = ref_file.name.split("_")[0]
        channels = sorted((REAL / "nf1-cellpainting" / "images").glob(f"{well}_01_*.tif"))
        pixels = np.stack([tifffile.imread(c) for c in channels])
        nuclei_file = next((REAL / "nf1-cellpainting" / "masks").glob(f"{well}_01_1_*_MaskNuclei.tiff"))
        reference, nuclei = tifffile.imread(ref_file) > 0, tifffile.imread(nuclei_file) > 0
        mask = foreground_mask(pixels)
        rows.append({"field": well, "iou_where_referenced": round(iou_where_referenced(mask, reference, nuclei), 3),
                     "iou_plain": round(iou(mask, reference), 3),
                     "nuclei_inside_mask": round(float((mask & nuclei).sum() / nuclei.sum()), 3),
                     "foreground_share": round(float(mask.mean()), 3),
                     "reference_share": round(float(reference.mean()), 3)})
    return rows


def full_run() -> dict:
    """`cellmi run` with default settings on the Transfluor plate (one GFP channel, no labels)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cellmi", "run", "--source", str(REAL / "transfluor-gfp"),
                               "--ingest.preset", "cellomics", "--ingest.channels", "GFP", "--workdir", tmp],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        record = json.loads((Path(tmp) / "run.json").read_text())
        metrics = json.loads((Path(tmp) / "analysis" / "metrics.json").read_text())
    return {"seconds": round(seconds, 1), "stages": {k: v["seconds"] for k, v in record["stages"].items()},
            "n_clusters": metrics.get("n_clusters"), "headline": proc.stdout.strip().splitlines()}


def table(report: dict) -> str:
    t = report["transfluor"]
    lines = [f"Transfluor plate ({t['fields']} fields): flat-field pattern {t['pattern']}, halves differ by "
             f"{t['halves_differ']}", "",
             "| mean field | centre / corner | brightest / darkest 4x4 block |", "|---|---|---|",
             f"| before | {t['centre_to_corner_before']} | {t['blocks_max_over_min_before']} |",
             f"| after | {t['centre_to_corner_after']} | {t['blocks_max_over_min_after']} |",
             f"| held-out wells, before / after (flat from the other wells) | | "
             f"{t['held_out_wells_blocks_before']} / {t['held_out_wells_blocks_after']} |", "",
             "| NF1 field | IoU where CellProfiler segmented | plain IoU | nuclei inside the mask | cellmi fg | "
             "CellProfiler fg |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['field']} | {r['iou_where_referenced']} | {r['iou_plain']} | {r['nuclei_inside_mask']} | "
              f"{r['foreground_share']} | {r['reference_share']} |" for r in report["nf1"]]
    if "run" in report:
        r = report["run"]
        lines += ["", f"Full `cellmi run` on the Transfluor plate: {r['seconds']} s "
                      f"({', '.join(f'{k} {v:.0f} s' for k, v in r['stages'].items())})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="also the full-length cellmi run on the Transfluor plate")
    args = parser.parse_args()
    report = {"source": str(REAL), "transfluor": transfluor(), "nf1": nf1_masks()}
    if args.run:
        report["run"] = full_run()
    OUT.mkdir(exist_ok=True)
    (OUT / "real.json").write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
