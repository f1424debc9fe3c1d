"""Per-field results of a run in progress, one part per field, so that retries and re-runs are safe.

``{workdir}/representations.parts/`` (local or S3)::

    manifest.json                 {"key": digest of everything that decides the vectors}
    {sample}_{field}.{token}.npz  one attempt's arrays (a killed or retried attempt leaves its own)
    {sample}_{field}.done         written last: names the one attempt file that counts, its sha256

A field is done when its ``.done`` marker exists; only the attempt that the marker names is read,
so a worker killed mid-write, a retry or a late duplicate never adds or loses rows. The folder
lives beside ``representations.zarr`` (not inside it) so that replacing an incomplete output
does not throw the finished fields away; it is removed once the final store is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import uuid
from dataclasses import dataclass, field

import numpy as np

from cellmi.errors import UserError
from cellmi.store import exists, filesystem, image_name, join, read_bytes, remove, write_bytes_atomic
from cellmi.watchdog import waiting

__all__ = ["FieldResult", "done_names", "prepare_parts", "read_parts", "write_part"]

PARTS_NAME = "representations.parts"
MANIFEST = "manifest.json"


@dataclass
class FieldResult:
    """The kept windows of one field: corners (n,) y and x, (n,) fg fraction and background flag,
    and feature matrices (n, D) by feature-set name."""

    sample: str
    field: str
    y: np.ndarray
    x: np.ndarray
    fg_fraction: np.ndarray
    background: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return image_name(self.sample, self.field)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays = {f"feature_{k}": v for k, v in self.features.items()}
        np.savez(
            buffer,
            sample=np.array(self.sample),
            field=np.array(self.field),
            y=self.y,
            x=self.x,
            fg_fraction=self.fg_fraction,
            background=self.background,
            **arrays,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FieldResult:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            features = {k.removeprefix("feature_"): npz[k] for k in npz.files if k.startswith("feature_")}
            return cls(
                str(npz["sample"]),
                str(npz["field"]),
                npz["y"],
                npz["x"],
                npz["fg_fraction"],
                npz["background"],
                features,
            )


def prepare_parts(url: str, key: str, fresh: bool = False) -> None:
    """Start or resume a parts folder; parts made with other settings (another key) are removed."""
    manifest = join(url, MANIFEST)
    if exists(manifest) and not fresh and json.loads(read_bytes(manifest)).get("key") == key:
        return
    remove(url)
    write_bytes_atomic(manifest, json.dumps({"key": key}).encode())


def done_names(url: str) -> set[str]:
    """Names ``{sample}_{field}`` of the fields whose done marker exists."""
    fs, path = filesystem(url)
    with waiting(url):
        if not fs.exists(path):
            return set()
        return {os.path.basename(p)[: -len(".done")] for p in fs.glob(f"{path}/*.done")}


def write_part(url: str, result: FieldResult, run_id: str) -> None:
    """Write one attempt's arrays, then the done marker that names them."""
    data = result.to_bytes()
    attempt = f"{result.name}.{uuid.uuid4().hex[:12]}.npz"
    write_bytes_atomic(join(url, attempt), data)
    marker = {
        "file": attempt,
        "rows": len(result.y),
        "sha256": hashlib.sha256(data).hexdigest(),
        "run": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    write_bytes_atomic(join(url, f"{result.name}.done"), json.dumps(marker).encode())


def _cat(url: str, names: list[str]) -> dict[str, bytes]:
    """Many small files at once (s3fs fetches them concurrently)."""
    fs, path = filesystem(url)
    paths = [f"{path}/{n}" for n in names]
    with waiting(url):
        got = fs.cat(paths) if paths else {}
    return {os.path.basename(p): got[p] for p in paths}


def read_markers(url: str, names: list[str]) -> dict[str, dict]:
    """The done markers of these fields, by field name."""
    raw = _cat(url, [f"{n}.done" for n in names])
    return {n: json.loads(raw[f"{n}.done"]) for n in names}


def read_parts(url: str, names: list[str]) -> dict[str, FieldResult]:
    """The results of these done fields; a part that does not match its marker is an error."""
    markers = read_markers(url, names)
    data = _cat(url, [m["file"] for m in markers.values()])
    out = {}
    for name, marker in markers.items():
        blob = data[marker["file"]]
        if hashlib.sha256(blob).hexdigest() != marker["sha256"]:
            raise UserError(
                f"{join(url, marker['file'])}: part does not match its done marker; "
                "delete the marker to recompute the field"
            )
        out[name] = FieldResult.from_bytes(blob)
    return out
