"""Plate maps: what each well holds, joined onto the images by plate and well.

The CellProfiler/pycytominer convention: a table (CSV, tab-separated ``.tsv``/``.txt``, or
Parquet; local or ``s3://``) with ``Metadata_Well`` (``A01`` or ``A1``), usually
``Metadata_Plate``, then any columns (treatment, compound, dose, ...). A map without
``Metadata_Plate`` describes every plate of the screen. Columns not named ``Metadata_*`` are
given the prefix, so every column travels into the output tables as ``Metadata_<name>``.
"""

from __future__ import annotations

import io

import pandas as pd

from cellmi.data.layout import well_id
from cellmi.errors import UserError
from cellmi.store import read_bytes

__all__ = ["PLATE", "RESERVED", "WELL", "PlateMap", "read_platemap"]

PLATE, WELL = "Metadata_Plate", "Metadata_Well"
# Columns cellmi writes itself; a plate map may not bring its own.
RESERVED = {f"metadata_{c}" for c in ("sample", "field", "split", "y", "x", "fg_fraction", "background",
                                      "phenotype", "label")}


class PlateMap:
    """A validated plate map: ``rows[(plate, well)]`` -> {column: value}; plate "" means every plate."""

    def __init__(self, url: str, frame: pd.DataFrame) -> None:
        self.url = url
        self.columns = [c for c in frame.columns if c not in (PLATE, WELL)]
        self.per_plate = PLATE in frame.columns
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        self.problems: list[str] = []
        counts = frame.groupby([PLATE, WELL], sort=True).size() if self.per_plate else frame.groupby(WELL).size()
        for key, n in counts.items():
            if n > 1:
                plate, well = key if self.per_plate else ("", key)
                where = f"plate {plate} well {well}" if plate else f"well {well}"
                self.problems.append(f"{url}: {where} appears in {n} rows")
        for record in frame.to_dict("records"):
            plate = record.pop(PLATE, "")
            well = record.pop(WELL)
            self.rows.setdefault((plate, well), record)

    def row(self, plate: str, well: str) -> dict[str, str] | None:
        """The plate map's columns for one well, or None when the map has no row for it."""
        return self.rows.get((plate if self.per_plate else "", well))

    def unused(self, seen: set[tuple[str, str]]) -> list[str]:
        """One problem per plate-map well that no image came from; ``seen`` holds (plate, well)."""
        wells = {w for _, w in seen} if not self.per_plate else set()
        out = []
        for plate, well in self.rows:
            if (self.per_plate and (plate, well) not in seen) or (not self.per_plate and well not in wells):
                where = f"plate {plate} well {well}" if plate else f"well {well}"
                out.append(f"{self.url}: {where} has no images")
        return out


def _table(url: str, data: bytes) -> pd.DataFrame:
    lower = url.lower()
    try:
        if lower.endswith(".parquet"):
            return pd.read_parquet(io.BytesIO(data)).astype(str)
        sep = "\t" if lower.endswith((".tsv", ".txt")) else ","
        return pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas and pyarrow raise many types for damaged files
        raise UserError(f"{url}: unreadable plate map ({type(err).__name__}: {err})") from None


def read_platemap(url: str) -> PlateMap:
    """Read and check a plate map; a missing file, no ``Metadata_Well`` or a reserved column is an error."""
    if not url.lower().endswith((".csv", ".tsv", ".txt", ".parquet")):
        raise UserError(f"CELLMI_INGEST__PLATEMAP: {url} is not a .csv, .tsv, .txt or .parquet file")
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise UserError(f"CELLMI_INGEST__PLATEMAP: {url} does not exist") from None
    frame = _table(url, data)
    frame.columns = [str(c).strip() for c in frame.columns]
    if WELL not in frame.columns:
        raise UserError(f"{url}: the plate map needs a {WELL} column (found {list(frame.columns)})")
    frame = frame.rename(columns={c: c if c.startswith("Metadata_") else f"Metadata_{c}" for c in frame.columns})
    clash = sorted(c for c in frame.columns if c.lower() in RESERVED)
    if clash:
        raise UserError(f"{url}: column(s) {clash} clash with cellmi's own columns; rename them")
    if frame.columns.duplicated().any():
        raise UserError(f"{url}: repeated column names {sorted(set(frame.columns[frame.columns.duplicated()]))}")
    frame[WELL] = frame[WELL].map(well_id)
    if PLATE in frame.columns:
        frame[PLATE] = frame[PLATE].str.strip()
    return PlateMap(url, frame)
