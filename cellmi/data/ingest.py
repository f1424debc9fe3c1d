"""``cellmi ingest``: raw images (DIB/TIFF/PNG, local or s3://) into an OME-Zarr store with masks.

    cellmi ingest --source /data/BBBC018 --workdir ./run          # bbbc018 preset
    CELLMI_SOURCE=s3://bucket/raw CELLMI_WORKDIR=s3://bucket/run cellmi ingest
    cellmi ingest                                                  # no source: the synthetic set

Every problem with the input is collected and reported, as one list, before anything is
written; a failure while writing removes the partial store.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from cellmi.colours import channel_colours
from cellmi.data.intensity import Levels, field_levels, log_intensity, store_pedestal
from cellmi.data.masks import foreground_mask
from cellmi.data.readers import read_image_file
from cellmi.errors import UserError
from cellmi.log import log, progress
from cellmi.settings import IngestSettings, Settings, as_dict, digest
from cellmi.store import STORE_NAME, StoreMeta, StoreWriter, exists, filesystem, is_s3, join, provenance

PRESETS = {
    # BBBC018: {well}-{channel}.DIB, well = 4-digit sample + 1-digit field, e.g. 00733-actin.DIB
    "bbbc018": r"^(?P<sample>\d{4})(?P<field>\d)-(?P<channel>[A-Za-z0-9]+)\.[dD][iI][bB]$",
    "generic": r"^(?P<sample>[^_/]+)_(?P<field>[^_/]+)_(?P<channel>[^_./]+)\.(?i:tiff?|png|dib)$",
}
PHENOTYPE_FILE = "phenotypes.json"
MAX_LISTED = 20

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Field:
    """One field of view: its channel files in store channel order."""

    sample: str
    field: str
    files: list[str]


def pattern_of(settings: IngestSettings) -> re.Pattern[str]:
    return re.compile(settings.pattern or PRESETS[settings.preset])


def list_files(source: str) -> list[str]:
    """Every file below ``source`` (local folder or s3:// prefix), as URLs, sorted."""
    fs, path = filesystem(source)
    if not fs.exists(path) or not fs.isdir(path):
        raise UserError(f"{source}: source folder does not exist")
    found = sorted(fs.find(path))
    return [f"s3://{p}" if is_s3(source) else p for p in found]


def group_files(files: list[str], pattern: re.Pattern[str], channels: list[str]) -> tuple[list[Field], list[str]]:
    """Group file URLs into fields by the pattern's named groups; return fields and problems."""
    wanted = {c.lower(): c for c in channels}
    found: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    problems, unmatched = [], []
    for url in files:
        name = url.rsplit("/", 1)[-1]
        if name == PHENOTYPE_FILE:
            continue
        match = pattern.match(name)
        if not match:
            unmatched.append(name)
            continue
        channel = wanted.get(match["channel"].lower())
        if channel is None:
            problems.append(f"{name}: channel {match['channel']!r} is not in CELLMI_INGEST__CHANNELS {channels}")
            continue
        found[(match["sample"], match["field"])][channel].append(url)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        log.warning("%d files match no pattern and are ignored: %s", len(unmatched), shown)
    fields = []
    for (sample, field_id), by_channel in sorted(found.items()):
        for channel, urls in by_channel.items():
            if len(urls) > 1:
                problems.append(f"duplicate files for sample {sample} field {field_id} channel {channel}: "
                                + ", ".join(u.rsplit('/', 1)[-1] for u in urls))
        missing = [c for c in channels if c not in by_channel]
        if missing:
            problems.append(f"sample {sample} field {field_id}: missing channel(s) {missing}")
            continue
        fields.append(Field(sample, field_id, [by_channel[c][0] for c in channels]))
    return fields, problems


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` on a thread pool, in order, with at most ``2 * workers`` items in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _read_url(url: str) -> np.ndarray:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as handle:
        data = handle.read()
    return read_image_file(data, url.rsplit("/", 1)[-1])


def read_field(field: Field) -> np.ndarray:
    """Read and stack one field's channels, (C, Y, X); mismatched channels raise UserError."""
    planes = [_read_url(url) for url in field.files]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise UserError(f"sample {field.sample} field {field.field}: channel sizes differ {sorted(shapes)}")
    dtypes = {p.dtype for p in planes}
    if len(dtypes) > 1:
        raise UserError(f"sample {field.sample} field {field.field}: channel pixel types differ")
    return np.stack(planes)


def _check_field(field: Field) -> tuple[tuple[int, ...] | None, str | None]:
    try:
        return read_field(field).shape, None
    except UserError as err:
        return None, str(err)


def validate_fields(fields: list[Field], workers: int) -> tuple[tuple[int, int], list[str]]:
    """Read every field once; return the common (Y, X) shape and every problem found."""
    problems, shapes = [], defaultdict(list)
    checked = bounded_map(_check_field, fields, workers)
    for field, (shape, problem) in zip(fields, progress(checked, total=len(fields), desc="check", leave=False),
                                       strict=True):
        if problem:
            problems.append(problem)
        else:
            shapes[shape[1:]].append(f"{field.sample}/{field.field}")
    if len(shapes) > 1:
        common = max(shapes, key=lambda s: len(shapes[s]))
        odd = [f"{name} is {s[0]}x{s[1]}" for s, names in shapes.items() if s != common for name in names]
        problems.append(f"field sizes differ from {common[0]}x{common[1]}: " + ", ".join(odd[:MAX_LISTED]))
    shape = next(iter(shapes)) if shapes else (0, 0)
    return shape, problems


def choose_split(samples: list[str], settings: IngestSettings) -> dict[str, str]:
    """Sample -> "train"/"test": the explicit list, else a seeded shuffle of sorted sample ids."""
    ordered = sorted(samples)
    if settings.test_samples is not None:
        unknown = sorted(set(settings.test_samples) - set(ordered))
        if unknown:
            raise UserError(f"CELLMI_INGEST__TEST_SAMPLES: unknown sample(s) {unknown}; samples are {ordered}")
        test = set(settings.test_samples)
    else:
        if settings.n_test >= len(ordered):
            raise UserError(f"CELLMI_INGEST__N_TEST={settings.n_test} leaves no training sample "
                            f"({len(ordered)} samples)")
        rng = np.random.default_rng(settings.split_seed)
        test = set(rng.permutation(ordered)[: settings.n_test].tolist())
    if len(test) >= len(ordered):
        raise UserError("CELLMI_INGEST__TEST_SAMPLES: every sample is held out; nothing left to train on")
    return {s: ("test" if s in test else "train") for s in ordered}


SAMPLE_PIXELS = 20_000  # foreground pixels per training field kept for the intensity statistics


class IntensityStats:
    """Per-channel mean and std of log intensities (of the store's mode) over foreground pixels.

    In ``field`` mode the transform needs the store's pedestal, known only once every training
    field has been seen, so up to ``SAMPLE_PIXELS`` foreground pixels per field are kept (seeded)
    and the statistics are taken over them at the end.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.fields: list[tuple[Levels, np.ndarray]] = []

    def add(self, pixels: np.ndarray, mask: np.ndarray) -> None:
        values = pixels[:, mask]
        if values.shape[1] > SAMPLE_PIXELS:
            rng = np.random.default_rng(len(self.fields))
            values = values[:, np.sort(rng.choice(values.shape[1], SAMPLE_PIXELS, replace=False))]
        self.fields.append((field_levels(pixels, mask, self.mode), values))

    def result(self) -> tuple[dict[str, list[float]], list[float]]:
        """The statistics and the pedestal (empty in ``store`` mode)."""
        kept = [(levels, values) for levels, values in self.fields if values.shape[1]]
        if not kept:
            raise UserError("no foreground pixels in the training samples: cannot compute intensity statistics")
        pedestal = store_pedestal([levels for levels, _ in kept]) if self.mode == "field" else None
        logs = np.concatenate(
            [log_intensity(values, replace(lv, pedestal=pedestal)) for lv, values in kept], axis=1
        ).astype(np.float64)
        mean, std = logs.mean(axis=1), np.maximum(logs.std(axis=1), 1e-6)
        return {"mean": mean.tolist(), "std": std.tolist()}, [] if pedestal is None else pedestal.tolist()


def write_store(url: str, meta: StoreMeta, images: Iterable[tuple[str, str, np.ndarray]], count: int,
                settings: Settings) -> StoreMeta:
    """Write fields (sample, field, (C, Y, X) pixels) with foreground masks and mark the store complete.

    Masks are computed in parallel; statistics come from the training samples' foreground.
    Any failure removes the partial store.
    """
    cfg = settings.ingest
    meta.intensity = cfg.intensity
    writer = StoreWriter(url, meta, overwrite=cfg.overwrite or settings.force, chunk=cfg.chunk,
                         colours=channel_colours(meta.channels, cfg.colors))
    stats = IntensityStats(cfg.intensity)
    workers = cfg.workers or os.cpu_count() or 1

    def with_mask(item: tuple[str, str, np.ndarray]) -> tuple[str, str, np.ndarray, np.ndarray]:
        sample, field_id, pixels = item
        return sample, field_id, pixels, foreground_mask(pixels, cfg.mask_pixels, seed=0)

    try:
        for sample, field_id, pixels, mask in progress(bounded_map(with_mask, images, workers), total=count,
                                                   desc="ingest", unit="field"):
            writer.write_image(sample, field_id, pixels, mask)
            if meta.split[sample] == "train":
                stats.add(pixels, mask)
        meta.stats, meta.pedestal = stats.result()
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def read_phenotypes(source: str) -> dict[str, str]:
    """Known phenotype per sample from an optional ``phenotypes.json`` in the source folder."""
    fs, path = filesystem(join(source, PHENOTYPE_FILE))
    if not fs.exists(path):
        return {}
    try:
        with fs.open(path, "rb") as handle:
            data = json.load(handle)
    except (ValueError, OSError) as err:
        raise UserError(f"{join(source, PHENOTYPE_FILE)}: not a JSON object of sample -> phenotype ({err})") from None
    return {str(k): str(v) for k, v in data.items()}


def plan_ingest(settings: Settings) -> tuple[list[Field], StoreMeta]:
    """Discover and validate the source; raise one UserError listing every problem."""
    source = settings.source
    assert source is not None
    cfg = settings.ingest
    files = list_files(source)
    if not files:
        raise UserError(f"{source}: source folder is empty")
    fields, problems = group_files(files, pattern_of(cfg), cfg.channels)
    if not fields and not problems:
        raise UserError(f"{source}: no file matches the {cfg.preset if not cfg.pattern else 'given'} pattern "
                        f"{pattern_of(cfg).pattern!r}")
    shape, read_problems = validate_fields(fields, cfg.workers or os.cpu_count() or 1)
    problems += read_problems
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; ... {len(problems) - MAX_LISTED} more"
                                                      if len(problems) > MAX_LISTED else "")
        raise UserError(f"{source}: {len(problems)} problem(s), nothing written: {listed}")
    by_sample: dict[str, list[str]] = defaultdict(list)
    for field in fields:
        by_sample[field.sample].append(field.field)
    meta = StoreMeta(
        channels=list(cfg.channels),
        fields={s: sorted(f) for s, f in sorted(by_sample.items())},
        split=choose_split(list(by_sample), cfg),
        shape=shape,
        phenotypes=read_phenotypes(source),
        provenance=provenance(source, digest(ingest_fingerprint(settings))),
    )
    return fields, meta


def ingest_fingerprint(settings: Settings) -> dict[str, Any]:
    """The settings that decide what a store holds (to tell whether it must be rebuilt)."""
    data = as_dict(settings, redact=False)
    return {"source": data["source"], "ingest": {k: v for k, v in data["ingest"].items()
                                                 if k not in ("overwrite", "workers")},
            "synth": data["synth"] if data["source"] is None else None}


def refuse_existing(url: str, settings: Settings) -> None:
    """Refuse early, before any reading, to replace a store unless told to."""
    if exists(join(url, "zarr.json")) and not (settings.ingest.overwrite or settings.force):
        raise UserError(f"{url}: a store already exists here (set CELLMI_INGEST__OVERWRITE=true to replace it)")


def ingest(settings: Settings) -> StoreMeta:
    """Ingest ``settings.source`` (or the synthetic set when unset) into ``{workdir}/store.zarr``."""
    url = join(settings.workdir, STORE_NAME)
    if settings.source is None:
        from cellmi.data.synth_job import synth_store

        return synth_store(settings, url)
    refuse_existing(url, settings)
    fields, meta = plan_ingest(settings)
    log.info("ingesting %d fields of %d samples from %s", len(fields), len(meta.fields), settings.source)
    images = ((f.sample, f.field, read_field(f)) for f in fields)
    meta = write_store(url, meta, images, len(fields), settings)
    log.info("store complete: %s (%d train / %d test samples)", url,
             len(meta.samples_in("train")), len(meta.samples_in("test")))
    return meta


def main(settings: Settings) -> int:
    ingest(settings)
    return 0
