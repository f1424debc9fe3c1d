"""From file names to fields: naming presets, channel names, plate, well and sample.

A file name is matched against a regular expression with named groups. ``field`` and ``channel``
are always needed; the sample comes from a ``sample`` group, or from the ``well`` (and optional
``plate``) groups, joined with a plate map when one is given (``cellmi.data.platemap``).

Channels are named two ways. Where the file names carry channel *names* (``bbbc018``, most
``generic`` folders) they are matched, case-insensitively, against ``ingest.channels``. Where they
carry the instrument's channel *indices* (``cellomics``: ``d0``, ``d1`` ...), ``ingest.channels``
names the indices found, in index order (``DNA,pH3,actin`` names d0, d1 and d2); unset, they are
called ``ch0``, ``ch1`` ...
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from cellmi.errors import UserError
from cellmi.settings import CHANNEL_NAMES, IngestSettings

__all__ = ["PRESETS", "Field", "Match", "channel_names", "match_files", "pattern_of", "safe_id", "well_id"]

PRESETS = {
    # BBBC018: {well}-{channel}.DIB, well = 4-digit sample + 1-digit field, e.g. 00733-actin.DIB
    "bbbc018": r"^(?P<sample>\d{4})(?P<field>\d)-(?P<channel>[A-Za-z0-9]+)\.[dD][iI][bB]$",
    # Cellomics ArrayScan export: {plate}_{well}f{field}d{channel}, e.g. AS_09125_050116030001_D03f00d0.tif;
    # some instruments write o{channel}; field and channel may be left out.
    "cellomics": r"^(?P<plate>.+)_(?P<well>[A-Za-z]{1,2}\d{1,3})(?:f(?P<field>\d{2,3}))?(?:[dDoO](?P<channel>\d+))?"
    r"\.(?i:tiff?|dib|c01)$",
    "generic": r"^(?P<sample>[^_/]+)_(?P<field>[^_/]+)_(?P<channel>[^_./]+)\.(?i:tiff?|png|dib|c01)$",
}
DEFAULT_FIELD = "00"  # a Cellomics name without f{field}
DEFAULT_CHANNEL = "0"  # ... or without d{channel}
_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+\-]+")


@dataclass
class Match:
    """One image file and what its name says."""

    url: str
    name: str
    channel: str  # the token in the name (a channel name, or an index)
    field: str
    sample: str | None = None
    plate: str = ""
    well: str | None = None


@dataclass
class Field:
    """One field of view: its channel files in store channel order, and its metadata columns."""

    sample: str
    field: str
    files: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    plate: str = ""
    shape: tuple[int, int] | None = None  # (Y, X), known once read


def pattern_of(settings: IngestSettings) -> re.Pattern[str]:
    return re.compile(settings.pattern or PRESETS[settings.preset])


def well_id(text: str) -> str:
    """``a1``, ``A01``, ``A001`` -> ``A01``: one spelling per well so file names and plate maps meet."""
    match = _WELL.match(text.strip())
    if not match:
        return text.strip()
    return f"{match[1].upper()}{int(match[2]):02d}"


def safe_id(text: str) -> str:
    """A sample or field id usable as a store path component: runs of other characters become '-'."""
    return _UNSAFE.sub("-", text.strip()).strip("-") or "-"


def match_files(urls: list[str], pattern: re.Pattern[str], ignore: set[str]) -> tuple[list[Match], list[str]]:
    """The files whose names match ``pattern`` (names in ``ignore`` skipped), and the names that don't."""
    groups = set(pattern.groupindex)
    if "sample" not in groups and "well" not in groups:
        raise UserError(f"CELLMI_INGEST__PATTERN: {pattern.pattern!r} needs a named group 'sample' or 'well'")
    found, unmatched = [], []
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if name in ignore:
            continue
        m = pattern.match(name)
        if not m:
            unmatched.append(name)
            continue
        parts = m.groupdict()
        found.append(Match(
            url=url,
            name=name,
            channel=parts.get("channel") or DEFAULT_CHANNEL,
            field=parts.get("field") or DEFAULT_FIELD,
            sample=parts.get("sample"),
            plate=parts.get("plate") or "",
            well=well_id(parts["well"]) if parts.get("well") else None,
        ))
    return found, unmatched


def channel_names(matches: list[Match], settings: IngestSettings) -> tuple[list[str], dict[str, str]]:
    """Store channel names, in order, and the map from a file name's channel token to one of them.

    Index tokens (all digits) are named in index order; name tokens are matched case-insensitively
    against ``ingest.channels`` (default DNA, pH3, actin). A token that names no channel is left
    out of the map (the caller reports it).
    """
    tokens = {m.channel for m in matches}
    if tokens and all(t.isdigit() for t in tokens):
        indices = sorted({int(t) for t in tokens})
        names = settings.channels or [f"ch{i}" for i in indices]
        if len(names) != len(indices):
            found = ", ".join(f"d{i}" for i in indices)
            raise UserError(f"CELLMI_INGEST__CHANNELS names {len(names)} channel(s) {names} but the files hold "
                            f"{len(indices)} channel index(es) ({found}); give one name per index, in index order")
        by_index = dict(zip(indices, names, strict=True))
        return list(names), {t: by_index[int(t)] for t in tokens}
    names = settings.channels or list(CHANNEL_NAMES)
    wanted = {c.lower(): c for c in names}
    return list(names), {t: wanted[t.lower()] for t in tokens if t.lower() in wanted}


def by_field(matches: list[Match]) -> dict[tuple[str, str, str], list[Match]]:
    """Matches grouped per field: key (plate, sample or well, field)."""
    grouped: dict[tuple[str, str, str], list[Match]] = defaultdict(list)
    for m in matches:
        grouped[(m.plate, m.sample if m.sample is not None else m.well or "", m.field)].append(m)
    return dict(sorted(grouped.items()))
