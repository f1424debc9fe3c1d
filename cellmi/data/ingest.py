"""``cellmi ingest``: raw images (DIB/C01/TIFF/PNG, local or s3://) into an OME-Zarr store with masks.

    cellmi ingest --source /data/BBBC018 --workdir ./run          # bbbc018 preset
    cellmi ingest --source ./plate1 --ingest.preset cellomics --ingest.channels DNA,GFP \
        --ingest.platemap ./platemap.csv --ingest.sample_by treatment
    CELLMI_SOURCE=s3://bucket/raw CELLMI_WORKDIR=s3://bucket/run cellmi ingest
    cellmi ingest                                                  # no source: the synthetic set

Steps: file names -> fields (``cellmi.data.layout``), joined with the plate map
(``cellmi.data.platemap``); every field read once to check it and to estimate the illumination
(``cellmi.data.illumination``); then each field corrected, masked and written.

Every problem with the input is collected and reported, as one list, before anything is
written; a failure while writing removes the partial store.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from typing import Any, TypeVar

import numpy as np

from cellmi.colours import channel_colours
from cellmi.data.illumination import MIN_FIELDS, Check, FlatFields, corner_ratio, load_flats
from cellmi.data.intensity import Levels, field_levels, log_intensity, store_pedestal
from cellmi.data.layout import Field, by_field, channel_names, match_files, pattern_of, safe_id
from cellmi.data.masks import foreground_mask
from cellmi.data.platemap import PLATE, WELL, PlateMap, read_platemap
from cellmi.data.readers import read_image_file
from cellmi.errors import UserError
from cellmi.hardware import cores
from cellmi.log import log, progress
from cellmi.settings import IngestSettings, Settings, as_dict, digest
from cellmi.store import (
    STORE_NAME,
    StoreMeta,
    StoreWriter,
    exists,
    filesystem,
    image_name,
    is_s3,
    join,
    provenance,
    read_bytes,
    store_complete,
)
from cellmi.watchdog import waiting

PHENOTYPE_FILE = "phenotypes.json"
MAX_LISTED = 20
FLOAT_RANGE = 65535.0  # floating-point input is scaled so the screen's brightest pixel lands here

T = TypeVar("T")
R = TypeVar("R")


def list_files(source: str) -> list[str]:
    """Every file below ``source`` (local folder or s3:// prefix), as URLs, sorted."""
    fs, path = filesystem(source)
    with waiting(source):
        if not fs.exists(path) or not fs.isdir(path):
            raise UserError(f"{source}: source folder does not exist")
        found = sorted(fs.find(path))
    return [f"s3://{p}" if is_s3(source) else p for p in found]


@dataclass
class Grouping:
    """What the file names (and the plate map) say: fields, channels, labels, and every problem."""

    fields: list[Field]
    channels: list[str]
    labels: dict[str, str]
    problems: list[str]


def group_files(files: list[str], settings: IngestSettings, platemap: PlateMap | None = None) -> Grouping:
    """Group file URLs into fields by the naming pattern; join the plate map; collect problems."""
    pattern = pattern_of(settings)
    matches, unmatched = match_files(files, pattern, ignore={PHENOTYPE_FILE})
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        log.warning("%d files match no pattern and are ignored: %s", len(unmatched), shown)
    channels, token_to_channel = channel_names(matches, settings)
    problems = [f"{m.name}: channel {m.channel!r} is not in CELLMI_INGEST__CHANNELS {channels}"
                for m in matches if m.channel not in token_to_channel]
    wells = "well" in pattern.groupindex
    if not wells and (platemap is not None or settings.sample_by != ["well"]):
        raise UserError("CELLMI_INGEST__PLATEMAP / __SAMPLE_BY: the file naming has no well; use the cellomics "
                        "preset or a pattern with a named group 'well'")
    plates = {m.plate for m in matches}
    fields, labels = [], {}
    for (plate, key, field_token), group in by_field(matches).items():
        by_channel: dict[str, list[str]] = defaultdict(list)
        for m in group:
            if m.channel in token_to_channel:
                by_channel[token_to_channel[m.channel]].append(m.url)
        where = f"{'plate ' + plate + ' ' if plate else ''}{'well' if wells else 'sample'} {key} field {field_token}"
        for channel, urls in by_channel.items():
            if len(urls) > 1:
                problems.append(f"duplicate files for {where} channel {channel}: "
                                + ", ".join(u.rsplit('/', 1)[-1] for u in urls))
        missing = [c for c in channels if c not in by_channel]
        if missing:
            problems.append(f"{where}: missing channel(s) {missing}")
            continue
        files_in_order = [by_channel[c][0] for c in channels]
        if not wells:
            fields.append(Field(key, field_token, files_in_order, plate=plate))
            continue
        field = _well_field(plate, key, field_token, files_in_order, settings, platemap, len(plates) > 1, problems)
        if field is not None:
            fields.append(field)
    if platemap is not None:
        problems = platemap.problems + problems + platemap.unused({(m.plate, m.well or "") for m in matches})
    if settings.label_by:
        labels = _labels(fields, settings.label_by, problems)
    return Grouping(fields, channels, labels, list(dict.fromkeys(problems)))  # one line per well, not per field


def _column(name: str) -> str:
    """A sample_by / label_by name as its metadata column: well, plate, or a plate-map column."""
    builtin = {"well": WELL, "plate": PLATE}
    return builtin.get(name.lower(), name if name.startswith("Metadata_") else f"Metadata_{name}")


def _well_field(plate: str, well: str, token: str, files: list[str], settings: IngestSettings,
                platemap: PlateMap | None, several_plates: bool, problems: list[str]) -> Field | None:
    """A field named by plate and well: its metadata (file names + plate map), sample and field id."""
    metadata = {PLATE: plate, WELL: well} if plate else {WELL: well}
    if platemap is not None:
        row = platemap.row(plate, well)
        if row is None:
            where = f"plate {plate} well {well}" if plate else f"well {well}"
            problems.append(f"{where}: no row in the plate map {platemap.url}")
            return None
        metadata.update(row)
    place = f"{plate}-{well}" if several_plates else well
    if settings.sample_by == ["well"]:
        return Field(safe_id(place), token, files, metadata, plate)
    columns = [_column(c) for c in settings.sample_by]
    unknown = [c for c, col in zip(settings.sample_by, columns, strict=True) if col not in metadata]
    if unknown:
        raise UserError(f"CELLMI_INGEST__SAMPLE_BY: no column {unknown} (columns: {sorted(metadata)})")
    sample = safe_id("_".join(metadata[c] for c in columns))
    return Field(sample, safe_id(f"{place}-{token}"), files, metadata, plate)


def _labels(fields: list[Field], label_by: str, problems: list[str]) -> dict[str, str]:
    """Sample -> label from a metadata column; a sample whose fields disagree is a problem."""
    column = _column(label_by)
    found: dict[str, set[str]] = defaultdict(set)
    for f in fields:
        if column not in f.metadata:
            raise UserError(f"CELLMI_INGEST__LABEL_BY: no column {label_by!r} (columns: {sorted(f.metadata)})")
        found[f.sample].add(f.metadata[column])
    for sample, values in sorted(found.items()):
        if len(values) > 1:
            problems.append(f"sample {sample}: fields disagree on {column} ({', '.join(sorted(values))})")
    return {s: next(iter(v)) for s, v in found.items()}


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
    return read_image_file(read_bytes(url), url.rsplit("/", 1)[-1])


def _where(field: Field) -> str:
    return f"sample {field.sample} field {field.field}"


def read_field(field: Field) -> np.ndarray:
    """Read and stack one field's channels, (C, Y, X) uint16 or float32; mismatches raise UserError."""
    planes = [_read_url(url) for url in field.files]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise UserError(f"{_where(field)}: channel sizes differ {sorted(shapes)}")
    dtypes = {p.dtype for p in planes}
    if len(dtypes) > 1:
        raise UserError(f"{_where(field)}: channel pixel types differ")
    return np.stack(planes)


@dataclass
class Survey:
    """What reading every field once found: common shape, float scaling, flat-field material, problems."""

    shape: tuple[int, int]
    float_scale: float | None
    flats: FlatFields
    problems: list[str]


def known_window(settings: Settings) -> int | None:
    """The window (training crop) when it was given (a flag, a variable, ``cellmi run --quick``); a
    default crop may still change before training, which checks it again."""
    return settings.model.crop if "crop" in settings.model.model_fields_set else None


def survey_fields(fields: list[Field], workers: int, window: int | None, collect_flats: bool) -> Survey:
    """Read every field once: sizes (one per store, none under ``window``), pixel types, and the
    block means the illumination estimate needs."""
    problems, shapes, kinds = [], defaultdict(list), set()
    flats, top = FlatFields(), 0.0

    def check(field: Field) -> tuple[np.ndarray | None, str | None]:
        try:
            return read_field(field), None
        except UserError as err:
            return None, str(err)

    checked = bounded_map(check, fields, workers)
    for field, (pixels, problem) in zip(fields, progress(checked, total=len(fields), desc="check", leave=False),
                                        strict=True):
        if problem or pixels is None:
            problems.append(problem or "")
            continue
        h, w = pixels.shape[1:]
        if window and min(h, w) < window:
            problems.append(f"{_where(field)}: {h}x{w} is smaller than the {window}x{window} window "
                            f"(set CELLMI_MODEL__CROP to at most {min(h, w)}, for ingest and training alike)")
        shapes[(h, w)].append(f"{field.sample}/{field.field}")
        kinds.add(pixels.dtype.kind)
        if pixels.dtype.kind == "f":
            top = max(top, float(pixels.max()))
        if collect_flats:
            flats.add(field.plate, pixels)
    if len(shapes) > 1:
        common = max(shapes, key=lambda s: len(shapes[s]))
        odd = [f"{name} is {s[0]}x{s[1]}" for s, names in shapes.items() if s != common for name in names]
        problems.append(f"field sizes differ from {common[0]}x{common[1]}: " + ", ".join(odd[:MAX_LISTED]))
    if len(kinds) > 1:
        problems.append("some fields are integer images and some floating point; convert them to one type")
    scale = FLOAT_RANGE / top if kinds == {"f"} and top > 0 else (1.0 if kinds == {"f"} else None)
    shape = next(iter(shapes)) if shapes else (0, 0)
    return Survey(shape, scale, flats, problems)


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


@dataclass
class Correction:
    """What ingest does to raw pixels before storing them: floats scaled into the 16-bit range by one
    factor for the whole screen, then each plate's flat-field divided out; the result is uint16."""

    float_scale: float | None = None
    flats: dict[str, np.ndarray] = dc_field(default_factory=dict)

    def __call__(self, plate: str, pixels: np.ndarray) -> np.ndarray:
        flat = self.flats.get(plate)
        if flat is None and pixels.dtype == np.uint16:
            return pixels
        values = pixels.astype(np.float32) * np.float32(self.float_scale or 1.0)
        if flat is not None:
            values /= flat
        return np.clip(np.rint(values), 0, FLOAT_RANGE).astype(np.uint16)


def write_store(url: str, meta: StoreMeta, images: Iterable[tuple[str, str, str, np.ndarray]], count: int,
                settings: Settings, correct: Correction | None = None) -> StoreMeta:
    """Write fields (sample, field, plate, (C, Y, X) raw pixels), corrected, with foreground masks, and
    mark the store complete.

    Correction and masks run in parallel; statistics come from the training samples' foreground.
    Any failure removes the partial store.
    """
    cfg = settings.ingest
    correct = correct or Correction()
    meta.intensity = cfg.intensity
    writer = StoreWriter(url, meta, overwrite=cfg.overwrite or settings.force, chunk=cfg.chunk,
                         colours=channel_colours(meta.channels, cfg.colors))
    stats = IntensityStats(cfg.intensity)
    workers = cfg.workers or cores()

    def with_mask(item: tuple[str, str, str, np.ndarray]) -> tuple[str, str, np.ndarray, np.ndarray]:
        sample, field_id, plate, raw = item
        pixels = correct(plate, raw)
        return sample, field_id, pixels, foreground_mask(pixels, cfg.mask_pixels, seed=0)

    try:
        for plate, flat in correct.flats.items():
            writer.write_flat(plate, flat)
        for sample, field_id, pixels, mask in progress(bounded_map(with_mask, images, workers), total=count,
                                                   desc="ingest", unit="field"):
            writer.write_image(sample, field_id, pixels, mask)
            if meta.split[sample] == "train":
                stats.add(pixels, mask)
        meta.stats, meta.pedestal = stats.result()
        return writer.finish()
    except BaseException as err:
        writer.abort(err)
        raise


def illumination_flats(flats: FlatFields, settings: IngestSettings, channels: list[str],
                       shape: tuple[int, int], plates: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The flat-field per plate that ``ingest.illumination`` asks for, and what to record about it."""
    mode = settings.illumination
    if mode == "none":
        return {}, {"method": "none"}
    if mode not in ("auto", "estimate"):
        chosen = load_flats(mode, plates, channels, shape)
        return chosen, _record("supplied", chosen, flats, source=mode)
    chosen, checks = {}, {}
    for plate in plates:
        label = f"plate {plate}" if plate else "the screen"
        if flats.fields(plate) < 2:
            if mode == "estimate":
                raise UserError(f"CELLMI_INGEST__ILLUMINATION=estimate: {label} has {flats.fields(plate)} field(s); "
                                "a flat-field needs several (use none or supply flat-fields)")
            continue
        checks[plate] = check = flats.check(plate)
        if check.reliable or mode == "estimate":
            chosen[plate] = flats.estimate(plate)
        why = (f"{check.fields} fields, pattern {check.amplitude:.2f}, halves differ by {check.disagreement:.2f}")
        if not check.reliable:
            log.log(logging.WARNING if mode == "estimate" else logging.INFO, "illumination: %s: %s; %s", label, why,
                    "corrected anyway (estimate)" if mode == "estimate" else
                    f"not corrected (needs {MIN_FIELDS}+ fields and a pattern twice the halves' difference)")
    return chosen, _record(mode, chosen, flats, checks)


def _record(method: str, chosen: dict[str, np.ndarray], flats: FlatFields, checks: dict[str, Check] | None = None,
            source: str | None = None) -> dict[str, Any]:
    """What the store records about the correction, per plate."""
    plates = {}
    for plate in sorted(set(flats.shapes) | set(chosen)):
        info: dict[str, Any] = {"fields": flats.fields(plate), "corrected": plate in chosen}
        if checks and plate in checks:
            info.update(pattern=round(checks[plate].amplitude, 4), halves_differ=round(checks[plate].disagreement, 4))
        if plate in chosen:
            info["flat_centre_to_corner"] = [round(corner_ratio(c), 4) for c in chosen[plate]]
            log.info("illumination: plate %s corrected, flat-field centre-to-corner %s", plate or "(one plate)",
                     info["flat_centre_to_corner"])
        plates[plate] = info
    return {"method": method, "plates": plates, **({"source": source} if source else {})}


def read_phenotypes(source: str) -> dict[str, str]:
    """Known phenotype per sample from an optional ``phenotypes.json`` in the source folder."""
    if not exists(join(source, PHENOTYPE_FILE)):
        return {}
    try:
        data = json.loads(read_bytes(join(source, PHENOTYPE_FILE)))  # a timeout is no OSError here
    except (ValueError, OSError) as err:
        raise UserError(f"{join(source, PHENOTYPE_FILE)}: not a JSON object of sample -> phenotype ({err})") from None
    return {str(k): str(v) for k, v in data.items()}


@dataclass
class Plan:
    """A validated ingest: the fields to write, the store metadata, and the pixel correction."""

    fields: list[Field]
    meta: StoreMeta
    correct: Correction


def _raise_problems(source: str, problems: list[str]) -> None:
    if problems:
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; ... {len(problems) - MAX_LISTED} more"
                                                      if len(problems) > MAX_LISTED else "")
        raise UserError(f"{source}: {len(problems)} problem(s), nothing written: {listed}")


def plan_ingest(settings: Settings) -> Plan:
    """Discover and validate the source (names, plate map, every field's pixels); raise one
    UserError listing every problem."""
    source = settings.source
    assert source is not None
    cfg = settings.ingest
    files = list_files(source)
    if not files:
        raise UserError(f"{source}: source folder is empty")
    platemap = read_platemap(cfg.platemap) if cfg.platemap else None
    grouping = group_files(files, cfg, platemap)
    if not grouping.fields and not grouping.problems:
        raise UserError(f"{source}: no file matches the {cfg.preset if not cfg.pattern else 'given'} pattern "
                        f"{pattern_of(cfg).pattern!r}")
    survey = survey_fields(grouping.fields, cfg.workers or cores(), known_window(settings),
                           collect_flats=cfg.illumination in ("auto", "estimate") and not grouping.problems)
    _raise_problems(source, grouping.problems + survey.problems)
    plates = sorted({f.plate for f in grouping.fields})
    flats, record = illumination_flats(survey.flats, cfg, grouping.channels, survey.shape, plates)
    by_sample: dict[str, list[str]] = defaultdict(list)
    for f in grouping.fields:
        by_sample[f.sample].append(f.field)
    meta = StoreMeta(
        channels=grouping.channels,
        fields={s: sorted(f) for s, f in sorted(by_sample.items())},
        split=choose_split(list(by_sample), cfg),
        shape=survey.shape,
        phenotypes=grouping.labels or read_phenotypes(source),
        provenance=provenance(source, digest(ingest_fingerprint(settings))),
        metadata={image_name(f.sample, f.field): f.metadata for f in grouping.fields if f.metadata},
        illumination=record,
        float_scale=survey.float_scale,
    )
    return Plan(grouping.fields, meta, Correction(survey.float_scale, flats))


def ingest_fingerprint(settings: Settings) -> dict[str, Any]:
    """The settings that decide what a store holds (to tell whether it must be rebuilt)."""
    data = as_dict(settings, redact=False)
    return {"source": data["source"], "ingest": {k: v for k, v in data["ingest"].items()
                                                 if k not in ("overwrite", "workers")},
            "synth": data["synth"] if data["source"] is None else None}


def refuse_existing(url: str, settings: Settings) -> None:
    """Refuse early, before any reading, to replace a store unless told to."""
    if store_complete(url) and not (settings.ingest.overwrite or settings.force):
        raise UserError(f"{url}: a store already exists here (set CELLMI_INGEST__OVERWRITE=true to replace it)")


def ingest(settings: Settings) -> StoreMeta:
    """Ingest ``settings.source`` (or the synthetic set when unset) into ``{workdir}/store.zarr``."""
    url = join(settings.workdir, STORE_NAME)
    if settings.source is None:
        from cellmi.data.synth_job import synth_store

        return synth_store(settings, url)
    refuse_existing(url, settings)
    plan = plan_ingest(settings)
    log.info("ingesting %d fields of %d samples from %s", len(plan.fields), len(plan.meta.fields), settings.source)
    images = ((f.sample, f.field, f.plate, read_field(f)) for f in plan.fields)
    meta = write_store(url, plan.meta, images, len(plan.fields), settings, plan.correct)
    log.info("store complete: %s (%d train / %d test samples)", url,
             len(meta.samples_in("train")), len(meta.samples_in("test")))
    return meta


def main(settings: Settings) -> int:
    ingest(settings)
    return 0
