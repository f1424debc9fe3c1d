"""Per-field results of a run in progress, written a task at a time, so that retries and re-runs are safe.

``{workdir}/representations.parts/`` (local or S3)::

    manifest.json                 {"key": digest of everything that decides the vectors}
    {sample}_{field}.{token}.npz  one attempt's arrays, for the fields of one task (named after its
                                  first field; a killed or retried attempt leaves its own)
    {sample}_{field}.done         one per field, written after the attempt file: names the attempt
                                  file that counts, the field's place in it and the file's sha256

A field is done when its ``.done`` marker exists; only the attempt that the marker names is read,
so a worker killed mid-write, a retry or a late duplicate never adds or loses rows. A task writes
one file for all its fields and their markers together (one round of concurrent PUTs on S3), not
two files a field. The folder lives beside ``representations.zarr`` (not inside it) so that
replacing an incomplete output does not throw the finished fields away; it is removed once the
final store is complete.
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
from cellmi.store import exists, filesystem, image_name, is_s3, join, read_bytes, remove, write_bytes_atomic
from cellmi.watchdog import waiting

__all__ = ["FieldResult", "done_names", "pack", "prepare_parts", "read_parts", "unpack", "write_parts"]

PARTS_NAME = "representations.parts"
MANIFEST = "manifest.json"


@dataclass
class FieldResult:
    """The kept windows of one field: corners (n,) y and x, (n,) fg fraction and background flag,
    feature matrices (n, D) by feature-set name, the field's focus score and the share of its pixels
    in the foreground mask (NaN: not measured)."""

    sample: str
    field: str
    y: np.ndarray
    x: np.ndarray
    fg_fraction: np.ndarray
    background: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    focus: float = float("nan")
    cover: float = float("nan")

    @property
    def name(self) -> str:
        return image_name(self.sample, self.field)


def pack(results: list[FieldResult]) -> bytes:
    """Several fields in one npz: their rows concatenated, ``offsets`` (n + 1,) marking each field's."""
    buffer = io.BytesIO()
    names = sorted(results[0].features) if results else []
    np.savez(
        buffer,
        sample=np.array([r.sample for r in results]),
        field=np.array([r.field for r in results]),
        focus=np.array([r.focus for r in results], np.float64),
        cover=np.array([r.cover for r in results], np.float64),
        offsets=np.cumsum([0] + [len(r.y) for r in results]),
        y=np.concatenate([r.y for r in results]),
        x=np.concatenate([r.x for r in results]),
        fg_fraction=np.concatenate([r.fg_fraction for r in results]),
        background=np.concatenate([r.background for r in results]),
        **{f"feature_{k}": np.concatenate([r.features[k] for r in results]) for k in names},
    )
    return buffer.getvalue()


def unpack(data: bytes) -> list[FieldResult]:
    """The fields of an npz written by :func:`pack` (or one field of the earlier one-field layout)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "offsets" not in arrays:  # one field a file, no offsets
        arrays = {**arrays, "offsets": np.array([0, len(arrays["y"])]), "focus": np.array([np.nan])}
        arrays.update(sample=arrays["sample"].reshape(1), field=arrays["field"].reshape(1))
    names = [k for k in arrays if k.startswith("feature_")]
    out = []
    for i, (start, stop) in enumerate(zip(arrays["offsets"][:-1], arrays["offsets"][1:], strict=True)):
        rows = slice(int(start), int(stop))
        out.append(
            FieldResult(
                str(arrays["sample"][i]),
                str(arrays["field"][i]),
                arrays["y"][rows],
                arrays["x"][rows],
                arrays["fg_fraction"][rows],
                arrays["background"][rows],
                {k.removeprefix("feature_"): arrays[k][rows] for k in names},
                float(arrays["focus"][i]),
                float(arrays["cover"][i]) if "cover" in arrays else float("nan"),
            )
        )
    return out


def prepare_parts(url: str, key: str, fresh: bool = False) -> None:
    """Start or resume a parts folder; parts made with other settings (another key) are removed."""
    manifest = join(url, MANIFEST)
    if exists(manifest) and not fresh and json.loads(read_bytes(manifest)).get("key") == key:
        return
    remove(url)
    write_bytes_atomic(manifest, json.dumps({"key": key}).encode())


def done_names(url: str, names: list[str] | None = None) -> set[str]:
    """Names ``{sample}_{field}`` of the fields whose done marker exists (of ``names`` only, when given:
    one batched read instead of a listing of the whole folder)."""
    fs, path = filesystem(url)
    with waiting(url):
        if names is not None:
            found = fs.cat([f"{path}/{n}.done" for n in names], on_error="omit") if names else {}
            return {os.path.basename(p)[: -len(".done")] for p in found}
        if not fs.exists(path):
            return set()
        return {os.path.basename(p)[: -len(".done")] for p in fs.glob(f"{path}/*.done")}


def write_parts(url: str, results: list[FieldResult], run_id: str) -> None:
    """Write one task's fields: one attempt file holding them all, then every field's done marker."""
    if not results:
        return
    data = pack(results)
    attempt = f"{results[0].name}.{uuid.uuid4().hex[:12]}.npz"
    write_bytes_atomic(join(url, attempt), data)
    digest = hashlib.sha256(data).hexdigest()
    host, pid = socket.gethostname(), os.getpid()
    markers = {
        join(url, f"{r.name}.done"): json.dumps(
            {"file": attempt, "index": i, "rows": len(r.y), "sha256": digest, "run": run_id, "host": host, "pid": pid}
        ).encode()
        for i, r in enumerate(results)
    }
    write_files(markers)


def write_files(files: dict[str, bytes]) -> None:
    """Small whole files, each atomically: one after another locally, as concurrent PUTs on S3."""
    first = next(iter(files), None)
    if first is None:
        return
    if not is_s3(first):
        for target, data in files.items():
            write_bytes_atomic(target, data)
        return
    fs, _ = filesystem(first)
    with waiting(first):
        fs.pipe({filesystem(target)[1]: data for target, data in files.items()})


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
    files = sorted({m["file"] for m in markers.values()})
    data = _cat(url, files)
    unpacked = {}
    for name in files:
        blob = data[name]
        digest = hashlib.sha256(blob).hexdigest()
        if any(m["file"] == name and m["sha256"] != digest for m in markers.values()):
            raise UserError(
                f"{join(url, name)}: part does not match its done marker; delete the marker to recompute the field"
            )
        unpacked[name] = unpack(blob)
    return {n: unpacked[m["file"]][m.get("index", 0)] for n, m in markers.items()}
