"""``cellmi synth``: the synthetic HT29-like screen, as a store or as a BBBC018-style raw folder.

    cellmi synth                                  # {workdir}/store.zarr with masks
    cellmi synth --synth.raw_out ./raw            # ./raw/00011-DNA.DIB ... + phenotypes.json
    cellmi ingest --source ./raw                  # ... which ingest reads back like BBBC018
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from cellmi.data.illumination import FlatFields
from cellmi.data.ingest import (
    PHENOTYPE_FILE,
    Correction,
    choose_split,
    illumination_flats,
    ingest_fingerprint,
    refuse_existing,
    write_store,
)
from cellmi.data.readers import write_dib
from cellmi.data.synth import CHANNELS, SynthField, sample_id, synth_screen
from cellmi.errors import UserError
from cellmi.log import log, progress
from cellmi.settings import Settings, digest
from cellmi.store import STORE_NAME, StoreMeta, exists, join, provenance, write_bytes_atomic

KEEP_BYTES = 2 << 30


def _screen(settings: Settings):
    cfg = settings.synth
    return synth_screen(
        cfg.samples, cfg.fields, cfg.size, cfg.seed, workers=settings.ingest.workers or 2, variation=cfg.variation
    )


def synth_store(settings: Settings, url: str) -> StoreMeta:
    """Generate the synthetic screen straight into an image store (masks from the GMM, as for real data)."""
    refuse_existing(url, settings)
    cfg = settings.synth
    samples = [sample_id(i) for i in range(cfg.samples)]
    fields = [str(f + 1) for f in range(cfg.fields)]
    phenotypes: dict[str, str] = {}

    screen = _screen_once(settings)

    def images():
        for item in screen():
            phenotypes[item.sample] = item.phenotype
            yield item.sample, item.field, "", item.pixels

    meta = StoreMeta(
        channels=list(CHANNELS),
        fields={s: list(fields) for s in samples},
        split=choose_split(samples, settings.ingest),
        shape=(cfg.size, cfg.size),
        phenotypes=phenotypes,
        provenance=provenance(
            f"synthetic(seed={cfg.seed}, variation={cfg.variation})", digest(ingest_fingerprint(settings))
        ),
    )
    log.info("generating the synthetic screen: %d samples x %d fields, %d px", cfg.samples, cfg.fields, cfg.size)
    meta.illumination, correct = _illumination(settings, meta, screen)
    meta = write_store(url, meta, images(), cfg.samples * cfg.fields, settings, correct)
    log.info("store complete: %s", url)
    return meta


def _screen_once(settings: Settings) -> Callable[[], Iterable[SynthField]]:
    """The screen as something to iterate twice (illumination estimate, then writing): held in
    memory when it fits in ``KEEP_BYTES``, else generated again (the generator is deterministic)."""
    cfg = settings.synth
    size = cfg.samples * cfg.fields * len(CHANNELS) * cfg.size**2 * 2
    if size > KEEP_BYTES:
        return lambda: _screen(settings)
    kept: list[SynthField] = []

    def items() -> Iterable[SynthField]:
        if kept:
            yield from kept
            return
        for item in _screen(settings):
            kept.append(item)
            yield item

    return items


def _illumination(settings: Settings, meta: StoreMeta,
                  screen: Callable[[], Iterable[SynthField]]) -> tuple[dict, Correction]:
    """The synthetic screen is one plate; its flat-field estimate takes a first pass over it."""
    flats = FlatFields()
    if settings.ingest.illumination in ("auto", "estimate"):
        for item in progress(screen(), total=settings.synth.samples * settings.synth.fields,
                             desc="synth", leave=False):
            flats.add("", item.pixels)
    chosen, record = illumination_flats(flats, settings.ingest, meta.channels, meta.shape, [""])
    return record, Correction(flats=chosen)


def write_raw(settings: Settings, folder: str) -> None:
    """Write ``{sample}{field}-{channel}.DIB`` files and ``phenotypes.json`` into ``folder``."""
    if settings.synth.fields > 9:
        raise UserError("CELLMI_SYNTH__FIELDS: the BBBC018 layout holds at most 9 fields per sample")
    if exists(join(folder, PHENOTYPE_FILE)) and not settings.force:
        raise UserError(f"{folder}: already holds a synthetic screen (use --force to replace it)")
    phenotypes = {}
    for item in progress(_screen(settings), total=settings.synth.samples * settings.synth.fields, desc="synth"):
        phenotypes[item.sample] = item.phenotype
        for channel, plane in zip(CHANNELS, item.pixels, strict=True):
            write_bytes_atomic(join(folder, f"{item.sample}{item.field}-{channel}.DIB"), write_dib(plane))
    write_bytes_atomic(join(folder, PHENOTYPE_FILE), json.dumps(phenotypes, indent=1).encode())
    log.info("wrote %d fields to %s", len(phenotypes) * settings.synth.fields, folder)


def main(settings: Settings) -> int:
    if settings.synth.raw_out:
        write_raw(settings, settings.synth.raw_out)
    else:
        synth_store(settings, join(settings.workdir, STORE_NAME))
    return 0
