"""The representations store that inference writes and clustering reads.

``{workdir}/representations.zarr`` (local or S3)::

    attributes["cellmi"]   {"complete", "window", "stride", "feature_sets", "handcrafted_names",
                            "checkpoint", "checkpoint_sha256", "store", "settings", "cellmi_version",
                            "phenotypes", "field_metadata",
                            "focus": {sample: {field: focus score or null}},
                            "cover": {sample: {field: share of the field in its foreground mask}}}
    sample, field, split   (n,) str       one row per window, sorted by (sample, field, y, x)
    y, x                   (n,) int32     top-left corner of the window in the field
    fg_fraction            (n,) float32   foreground share of the window
    background             (n,) bool      True only for windows kept by ``keep_background``
    dim                    (n, G) float32 DIM global vectors
    random                 (n, G) float32 the same encoder with untrained weights (baseline)
    handcrafted            (n, K) float32 per-window intensity/texture features (baseline)

``{workdir}/representations.parquet`` holds the same rows for pandas/pycytominer users:
``Metadata_sample, Metadata_field, Metadata_y, Metadata_x, Metadata_fg_fraction,
Metadata_split, Metadata_background[, Metadata_phenotype][, Metadata_field_cover]`` (the last the
window's field's cover, as in the attributes), the fields' own ``Metadata_*`` columns (plate,
well, plate map) and DIM features ``f000 ...``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import zarr

from cellmi.errors import IncompleteStoreError, UserError
from cellmi.store import exists, image_name, join, read_bytes, write_bytes_atomic, zarr_store
from cellmi.watchdog import waiting

REPR_ZARR = "representations.zarr"
REPR_PARQUET = "representations.parquet"
META_COLUMNS = ("sample", "field", "split", "y", "x", "fg_fraction", "background")
_DTYPES = {"sample": str, "field": str, "split": str, "y": np.int32, "x": np.int32,
           "fg_fraction": np.float32, "background": bool}


@dataclass
class Representations:
    """Window metadata (one row per window) and feature matrices with the same row order."""

    table: pd.DataFrame
    features: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    def subset(self, rows: np.ndarray) -> Representations:
        """Rows selected by a boolean mask or index array."""
        table = self.table.iloc[rows].reset_index(drop=True) if rows.dtype != bool else \
            self.table[rows].reset_index(drop=True)
        return Representations(table, {k: v[rows] for k, v in self.features.items()}, dict(self.attrs))


def sort_order(table: pd.DataFrame) -> np.ndarray:
    """Row order by (sample, field, y, x)."""
    return np.lexsort((table["x"].to_numpy(), table["y"].to_numpy(),
                       table["field"].astype(str).to_numpy(), table["sample"].astype(str).to_numpy()))


def write_representations(url: str, reps: Representations) -> None:
    """Write a complete representations store (rows sorted first) and mark it complete last."""
    with waiting(url):
        _write(url, reps)


def _write(url: str, reps: Representations) -> None:
    order = sort_order(reps.table)
    table = reps.table.iloc[order].reset_index(drop=True)
    root = zarr.open_group(zarr_store(url), mode="a", zarr_format=3)
    attrs = dict(reps.attrs, complete=False, feature_sets=sorted(reps.features))
    root.attrs["cellmi"] = attrs
    n = len(table)
    for name in META_COLUMNS:
        values = table[name].to_numpy()
        values = np.asarray(values.tolist(), dtype=str) if _DTYPES[name] is str else values.astype(_DTYPES[name])
        root.create_array(name, shape=(n,), dtype=_DTYPES[name], chunks=(max(n, 1),), overwrite=True)[...] = values
    for name, matrix in reps.features.items():
        matrix = np.asarray(matrix, np.float32)[order]
        arr = root.create_array(name, shape=matrix.shape, dtype="float32",
                                chunks=(max(min(n, 65536), 1), matrix.shape[1]), overwrite=True)
        arr[...] = matrix
    attrs["complete"] = True
    root.attrs["cellmi"] = attrs


def load_representations(url: str) -> Representations:
    """Read a complete representations store; an incomplete one is an error that says so."""
    if not exists(join(url, "zarr.json")):
        raise UserError(f"{url}: no representations here (run `cellmi infer` first)")
    with waiting(url):
        root = zarr.open_group(zarr_store(url, read_only=True), mode="r", zarr_format=3)
        attrs = dict(root.attrs.get("cellmi", {}))
        if not attrs.get("complete"):
            raise IncompleteStoreError(f"{url}: representations are incomplete (inference did not finish)")
        table = pd.DataFrame({name: _column(root[name][...], name) for name in META_COLUMNS})
        features = {name: root[name][...] for name in attrs["feature_sets"]}
    return Representations(table, features, attrs)


def _column(values: np.ndarray, name: str) -> np.ndarray:
    if _DTYPES[name] is str:
        return np.asarray(values.tolist(), dtype=object)
    return values.astype(_DTYPES[name])


def field_columns(table: pd.DataFrame, field_metadata: dict[str, dict[str, str]] | None) -> dict[str, np.ndarray]:
    """Each row's field metadata (plate, well, plate-map columns: ``Metadata_*``), as the store recorded
    it at ingest (``StoreMeta.metadata``, carried in the representations' attributes)."""
    if not field_metadata:
        return {}
    names = [image_name(str(s), str(f)) for s, f in zip(table["sample"], table["field"], strict=True)]
    columns = list(dict.fromkeys(c for row in field_metadata.values() for c in row))
    return {c: np.asarray([field_metadata.get(n, {}).get(c) for n in names], dtype=object) for c in columns}


def to_frame(reps: Representations, feature_set: str = "dim") -> pd.DataFrame:
    """Parquet-ready table: ``Metadata_*`` columns then features ``f000 ...``."""
    meta = {f"Metadata_{c}": reps.table[c].to_numpy() for c in META_COLUMNS}
    phenotypes = reps.attrs.get("phenotypes") or {}
    if phenotypes:
        meta["Metadata_phenotype"] = reps.table["sample"].map(phenotypes).to_numpy()
    cover = reps.attrs.get("cover") or {}
    if cover:
        keys = zip(reps.table["sample"].astype(str), reps.table["field"].astype(str), strict=True)
        meta["Metadata_field_cover"] = np.array([cover.get(s, {}).get(f) for s, f in keys], np.float64)
    meta.update(field_columns(reps.table, reps.attrs.get("field_metadata")))
    matrix = reps.features[feature_set]
    width = max(3, len(str(matrix.shape[1] - 1)))
    feats = {f"f{i:0{width}d}": matrix[:, i] for i in range(matrix.shape[1])}
    return pd.DataFrame({**meta, **feats})


def write_parquet(url: str, frame: pd.DataFrame) -> None:
    """One Parquet file written atomically (local temp + rename, or a single PUT on S3)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes_atomic(url, buffer.getvalue())


def read_parquet(url: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(read_bytes(url)))
