"""Run folders and image stores on local disk or S3.

An image store is an OME-Zarr (NGFF 0.5, Zarr v3) hierarchy::

    store.zarr/                       root group, attributes["cellmi"] = store metadata
      images/{sample}_{field}/        NGFF image: array "0" with axes (c, y, x), omero channels
        labels/foreground/            NGFF label image: array "0" with axes (y, x), 1 = foreground
      illumination/{i}                the flat-field divided out of plate attributes["plates"][i], (c, y, x)

The store metadata lists channels, samples, fields, the train/test split, phenotypes (when
known), per-field metadata columns (plate, well, plate map), what the illumination correction
did, per-channel intensity statistics and provenance. ``complete`` turns true only after the
last image is written; opening a store that is not complete is an error.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from cellmi import __version__
from cellmi.colours import channel_colours
from cellmi.data.intensity import Levels, field_levels, log_intensity
from cellmi.errors import IncompleteStoreError, UserError, is_infrastructure
from cellmi.watchdog import waiting

NGFF_VERSION = "0.5"
MASK_NAME = "foreground"
STORE_NAME = "store.zarr"


# ---------------------------------------------------------------- URLs and file systems
def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URL."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class S3Limits:
    """Timeouts and tries of every S3 request (settings ``timeouts.s3_*``); plain values, so Dask
    tasks can carry them to workers."""

    connect_s: float = 10.0
    read_s: float = 20.0
    attempts: int = 5


_limits = S3Limits()


def set_s3_limits(limits: S3Limits) -> None:
    """Use these limits for every S3 file system and store opened from now on in this process."""
    global _limits
    _limits = limits


def s3_limits() -> S3Limits:
    return _limits


def s3_options() -> dict[str, Any]:
    """s3fs options: credentials come from the standard AWS chain, the endpoint from AWS_ENDPOINT_URL.

    botocore retries a timed-out or refused request (standard mode: exponential backoff with
    jitter, at most 20 s between tries) ``attempts`` times in all; each try waits ``connect_s`` for
    the connection and ``read_s`` for each piece of the answer.
    """
    options: dict[str, Any] = {"session": _session()}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    options["config_kwargs"] = {
        "retries": {"total_max_attempts": _limits.attempts, "mode": "standard"},  # max_attempts: retries only
        "connect_timeout": _limits.connect_s,
        "read_timeout": _limits.read_s,
        "connector_args": {"socket_factory": _socket},
    }
    return options


def _socket(addr_info: Any) -> socket.socket:
    """A TCP socket that gives up when data it sent stays unacknowledged, or unsent because the
    peer stopped reading, for about ``read_s``: aiohttp has no write timeout, so an upload larger
    than the socket buffers to an endpoint that stopped answering would otherwise never end.

    Linux aborts a connection whose peer keeps a zero window only about twice TCP_USER_TIMEOUT
    after it closed (measured: 41 s for 20 s, 11 s for 5 s), hence half of ``read_s``.
    """
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(_limits.read_s * 500))
    return sock


@functools.cache
def _session() -> Any:
    """The botocore session of every S3 client in this process, without ``Expect: 100-continue`` on
    uploads: aiohttp waits for the server's "100 Continue" with no timeout, so an upload to an
    endpoint that stopped answering would wait past every limit above."""
    from aiobotocore.session import AioSession
    from botocore.handlers import add_expect_header

    session = AioSession()
    session.unregister("before-call.s3", add_expect_header)
    return session


def _s3(asynchronous: bool = False) -> fsspec.AbstractFileSystem:
    # Zarr's async instances are shared (fsspec's cache, keyed by the options) as FsspecStore.from_url
    # shares them; each would otherwise leave an open HTTP session behind.
    fs = fsspec.filesystem("s3", skip_instance_cache=not asynchronous, asynchronous=asynchronous, **s3_options())
    # s3fs repeats a failed call 5 times on top of botocore's tries: 5 x the bound. botocore's
    # tries (with backoff) are the one retry policy.
    fs.retries = 1
    return fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of a URL and the path inside it."""
    if is_s3(url):
        return _s3(), url[len("s3://") :]
    return fsspec.filesystem("file"), os.path.abspath(url)


def zarr_store(url: str, read_only: bool = False) -> Any:
    """A Zarr v3 store object for a local path or an ``s3://`` URL."""
    if is_s3(url):
        return FsspecStore(_s3(asynchronous=True), path=url[len("s3://") :], read_only=read_only)
    if not read_only:
        os.makedirs(url, exist_ok=True)
    return LocalStore(url, read_only=read_only)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with waiting(url):
        return fs.exists(path)


def remove(url: str) -> None:
    """Delete a file or folder tree, local or on S3; missing is fine."""
    fs, path = filesystem(url)
    with waiting(url):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def read_bytes(url: str) -> bytes:
    """A whole file, local or S3 (timeouts and retries as in :func:`s3_options`)."""
    fs, path = filesystem(url)
    with waiting(url), fs.open(path, "rb") as handle:
        return handle.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole file so that readers never see half of it (temp + rename; one PUT on S3)."""
    fs, path = filesystem(url)
    if is_s3(url):
        with waiting(url):
            fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def image_name(sample: str, field: str) -> str:
    return f"{sample}_{field}"


# ---------------------------------------------------------------- metadata
@dataclass
class StoreMeta:
    """What a store holds. ``fields`` maps sample id to its field ids, in order."""

    channels: list[str]
    fields: dict[str, list[str]]
    split: dict[str, str]
    shape: tuple[int, int]
    phenotypes: dict[str, str] = field(default_factory=dict)
    stats: dict[str, list[float]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    intensity: str = "store"  # cellmi.data.intensity mode; stores written before it existed used "store"
    pedestal: list[float] = field(default_factory=list)  # per channel, "field" mode only
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # image name -> Metadata_* columns
    illumination: dict[str, Any] = field(default_factory=dict)  # what the flat-field correction did
    float_scale: float | None = None  # floating-point input was multiplied by this into the 16-bit range

    @property
    def samples(self) -> list[str]:
        return list(self.fields)

    def samples_in(self, split: str = "all") -> list[str]:
        """Sample ids of a split: ``train``, ``test`` or ``all``."""
        if split == "all":
            return self.samples
        return [s for s in self.samples if self.split[s] == split]

    def images(self, split: str = "all") -> list[tuple[str, str]]:
        """(sample, field) pairs of a split in store order."""
        return [(s, f) for s in self.samples_in(split) for f in self.fields[s]]

    def metadata_columns(self) -> list[str]:
        """The per-field ``Metadata_*`` columns (plate, well, plate-map columns), in first-seen order."""
        return list(dict.fromkeys(c for row in self.metadata.values() for c in row))

    def to_json(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "fields": self.fields,
            "split": self.split,
            "shape": list(self.shape),
            "phenotypes": self.phenotypes,
            "stats": self.stats,
            "intensity": self.intensity,
            "pedestal": self.pedestal,
            "metadata": self.metadata,
            "illumination": self.illumination,
            "float_scale": self.float_scale,
            "provenance": self.provenance,
            "complete": self.complete,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreMeta:
        return cls(
            channels=list(data["channels"]),
            fields={k: list(v) for k, v in data["fields"].items()},
            split=dict(data["split"]),
            shape=tuple(data["shape"]),  # type: ignore[arg-type]
            phenotypes=dict(data.get("phenotypes", {})),
            stats={k: list(v) for k, v in data.get("stats", {}).items()},
            provenance=dict(data.get("provenance", {})),
            complete=bool(data.get("complete", False)),
            intensity=str(data.get("intensity", "store")),
            pedestal=[float(v) for v in data.get("pedestal", [])],
            metadata={k: dict(v) for k, v in data.get("metadata", {}).items()},
            illumination=dict(data.get("illumination", {})),
            float_scale=data.get("float_scale"),
        )


def provenance(source: str, settings_hash: str) -> dict[str, Any]:
    return {
        "source": source,
        "cellmi_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings_hash": settings_hash,
    }


def _multiscales(axes: list[dict[str, str]], name: str) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "axes": axes,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(axes)}]}
            ],
        }
    ]


_SPACE = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
MASK_COLOURS = [{"label-value": 1, "rgba": [255, 255, 0, 255]}]


def _image_attrs(name: str, channels: list[str], colours: list[str], window_max: int) -> dict[str, Any]:
    axes = [{"name": "c", "type": "channel"}, *_SPACE]
    omero = {
        "channels": [
            {
                "label": ch,
                "color": colour,
                "active": True,
                "window": {"start": 0, "end": window_max, "min": 0, "max": 65535},
            }
            for ch, colour in zip(channels, colours, strict=True)
        ]
    }
    return {"ome": {"version": NGFF_VERSION, "multiscales": _multiscales(axes, name), "omero": omero}}


def _label_attrs(name: str, colors: list[dict[str, Any]], properties: list[dict[str, Any]] | None) -> dict[str, Any]:
    label: dict[str, Any] = {"version": NGFF_VERSION, "colors": colors, "source": {"image": "../../"}}
    if properties:
        label["properties"] = properties
    return {"ome": {"version": NGFF_VERSION, "multiscales": _multiscales(list(_SPACE), name), "image-label": label}}


def write_ngff_image(
    parent: zarr.Group, name: str, pixels: np.ndarray, channels: list[str], colours: list[str], chunk: int
) -> zarr.Group:
    """An NGFF image group ``name`` under ``parent``: ``pixels`` (C, Y, X), channel names and colours in omero."""
    _, h, w = pixels.shape
    group = parent.create_group(name)
    arr = group.create_array("0", shape=pixels.shape, dtype=pixels.dtype, chunks=(1, min(chunk, h), min(chunk, w)),
                             dimension_names=("c", "y", "x"))
    arr[...] = pixels
    top = int(np.percentile(pixels, 99.5)) if pixels.size else 1
    group.attrs.update(_image_attrs(name, channels, colours, max(top, 1)))
    return group


def write_ngff_labels(
    image: zarr.Group,
    labels: dict[str, np.ndarray],
    colors: dict[str, list[dict[str, Any]]],
    chunk: int,
    properties: dict[str, list[dict[str, Any]]] | None = None,
) -> None:
    """NGFF label images (Y, X) under ``image/labels``, each with its ``image-label`` colours and properties."""
    group = image.require_group("labels")
    group.attrs["ome"] = {"version": NGFF_VERSION, "labels": list(labels)}
    for name, values in labels.items():
        label = group.create_group(name)
        arr = label.create_array("0", shape=values.shape, dtype=values.dtype,
                                 chunks=tuple(min(chunk, n) for n in values.shape), dimension_names=("y", "x"))
        arr[...] = values
        label.attrs.update(_label_attrs(name, colors[name], (properties or {}).get(name)))


# ---------------------------------------------------------------- writing
class StoreWriter:
    """Writes a new store; ``finish`` marks it complete, ``abort`` removes it."""

    def __init__(
        self, url: str, meta: StoreMeta, overwrite: bool = False, chunk: int = 256, colours: list[str] | None = None
    ) -> None:
        if store_complete(url) and not overwrite:
            raise UserError(f"{url}: a store already exists here (set CELLMI_INGEST__OVERWRITE=true to replace it)")
        remove(url)  # a complete store being replaced, or what an interrupted ingest left
        self.url = url
        self.meta = meta
        self.chunk = chunk
        self.colours = colours or channel_colours(meta.channels)
        meta.complete = False
        with waiting(url):
            self.root = zarr.open_group(zarr_store(url), mode="w", zarr_format=3)
            self.root.attrs["cellmi"] = meta.to_json()
            self.images = self.root.create_group("images")

    def write_image(self, sample: str, field_id: str, pixels: np.ndarray, mask: np.ndarray) -> None:
        """Write one field: ``pixels`` (C, Y, X) uint16 and ``mask`` (Y, X) bool."""
        name = image_name(sample, field_id)
        with waiting(join(self.url, "images", name)):
            group = write_ngff_image(self.images, name, pixels, self.meta.channels, self.colours, self.chunk)
            write_ngff_labels(group, {MASK_NAME: mask.astype(np.uint8)}, {MASK_NAME: MASK_COLOURS}, self.chunk)

    def write_flat(self, plate: str, flat: np.ndarray) -> None:
        """The flat-field divided out of one plate's fields, (C, Y, X) float32, under ``illumination/``."""
        with waiting(join(self.url, "illumination")):
            group = self.root.require_group("illumination")
            arr = group.create_array(str(len(group.attrs.get("plates", []))), shape=flat.shape, dtype="float32",
                                     chunks=(1, *flat.shape[1:]), dimension_names=("c", "y", "x"))
            arr[...] = flat
            group.attrs["plates"] = [*group.attrs.get("plates", []), plate]

    def finish(self) -> StoreMeta:
        """Mark the store complete; readers accept it only from now on."""
        self.meta.complete = True
        with waiting(join(self.url, "zarr.json")):
            self.root.attrs["cellmi"] = self.meta.to_json()
        return self.meta

    def abort(self, cause: BaseException | None = None) -> None:
        """Remove what was written so no half-written store is left behind.

        When the storage stopped answering (``cause`` is an infrastructure fault) nothing is
        removed, since that would wait out the timeouts once more: the store stays marked
        incomplete, which every reader refuses and the next ingest replaces.
        """
        if cause is not None and is_infrastructure(cause):
            return
        remove(self.url)


# ---------------------------------------------------------------- reading
class ImageStore:
    """A complete image store opened for reading (local or S3)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if not exists(join(url, "zarr.json")):
            raise UserError(f"{url}: no image store here (run `cellmi ingest` first)")
        with waiting(url):
            self.root = zarr.open_group(zarr_store(url, read_only=True), mode="r", zarr_format=3)
            data = self.root.attrs.get("cellmi")
        if data is None:
            raise UserError(f"{url}: not a cellmi image store (no cellmi metadata)")
        self.meta = StoreMeta.from_json(data)
        if not self.meta.complete:
            raise IncompleteStoreError(f"{url}: store is incomplete (ingest did not finish); re-run ingest")

    def _read(self, key: str, index: Any = Ellipsis) -> np.ndarray:
        with waiting(join(self.url, key)):
            return self.root[key][index]

    def read_image(self, sample: str, field_id: str) -> np.ndarray:
        """Pixels of one field, (C, Y, X), as stored (uint16)."""
        return self._read(f"images/{image_name(sample, field_id)}/0")

    def read_channel(self, sample: str, field_id: str, index: int) -> np.ndarray:
        """One channel of one field, (Y, X), as stored; reads only that channel's chunks."""
        return self._read(f"images/{image_name(sample, field_id)}/0", index)

    def channel_colours(self) -> list[str]:
        """``RRGGBB`` display colour per channel from the first image's NGFF omero metadata.

        A store without them (or with a channel missing) falls back to the palette of :mod:`cellmi.colours`.
        """
        images = self.meta.images()
        try:
            found = self.root[f"images/{image_name(*images[0])}"].attrs["ome"]["omero"]["channels"]
            colours = [str(ch["color"]).lstrip("#").upper() for ch in found]
        except (IndexError, KeyError, TypeError):
            colours = []
        return colours if len(colours) == len(self.meta.channels) else channel_colours(self.meta.channels)

    def read_mask(self, sample: str, field_id: str) -> np.ndarray:
        """Foreground mask of one field, (Y, X) bool."""
        return self._read(f"images/{image_name(sample, field_id)}/labels/{MASK_NAME}/0").astype(bool)

    def field_shape(self, sample: str, field_id: str) -> tuple[int, int]:
        """(Y, X) of one field, from the array's metadata (no pixels read); fields may differ in shape."""
        key = f"images/{image_name(sample, field_id)}/0"
        with waiting(join(self.url, key)):
            _, height, width = self.root[key].shape
        return int(height), int(width)

    def normalise(self, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(C, Y, X) raw, (Y, X) foreground -> float32 ``(log_c - mean_c) / std_c``.

        ``log_c`` are the log intensities of the store's intensity mode
        (:mod:`cellmi.data.intensity`); mean and std are fixed for the whole store, so intensity
        differences between samples survive.
        """
        return self.standardise(log_intensity(pixels, self.levels(pixels, mask)))

    def levels(self, pixels: np.ndarray, mask: np.ndarray) -> Levels:
        """What the store's intensity mode takes off this field (raw (C, Y, X), foreground (Y, X))."""
        return field_levels(pixels, mask, self.meta.intensity, self.meta.pedestal or None)

    def standardise(self, logs: np.ndarray) -> np.ndarray:
        """(C, ...) log intensities -> float32 standardised with the store's statistics."""
        shape = (-1,) + (1,) * (logs.ndim - 1)
        mean = np.asarray(self.meta.stats["mean"], np.float32).reshape(shape)
        std = np.asarray(self.meta.stats["std"], np.float32).reshape(shape)
        return ((logs - mean) / std).astype(np.float32)


def open_store(url: str) -> ImageStore:
    return ImageStore(url)


def store_complete(url: str) -> bool:
    """Whether a Zarr group at ``url`` exists and its cellmi metadata say ``complete``."""
    if not exists(join(url, "zarr.json")):
        return False
    with waiting(url):
        group = zarr.open_group(zarr_store(url, read_only=True), mode="r")
        return bool(group.attrs.get("cellmi", {}).get("complete"))
