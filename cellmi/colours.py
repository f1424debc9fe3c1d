"""Display colour of each channel, chosen once at ingest and kept in the store's NGFF ``omero`` metadata.

A channel takes, in order: the colour given in ``ingest.colors`` (``name=RRGGBB``); the colour of
its name in ``PALETTE``, matched case-insensitively on the whole name or any word of it (so
``Hoechst 33342`` and ``DNA_ch1`` are blue); else the next colour of ``FALLBACK`` that no other
channel has taken. Readers (report, napari) take the colours from the store, never from names.
"""

from __future__ import annotations

import re

from cellmi.errors import UserError

BLUE, GREEN, RED, MAGENTA, CYAN, YELLOW, ORANGE, WHITE = (
    "0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FF8000", "FFFFFF",
)
PALETTE = {
    **dict.fromkeys(("dna", "dapi", "hoechst", "nuclei", "nucleus", "draq5", "h2b"), BLUE),
    **dict.fromkeys(("actin", "factin", "phalloidin", "agp"), RED),
    **dict.fromkeys(("gfp", "egfp", "fitc", "alexa488", "af488", "ph3", "tubulin"), GREEN),
    **dict.fromkeys(("rfp", "mcherry", "tritc", "mito", "mitotracker", "cy5"), MAGENTA),
    **dict.fromkeys(("er", "concanavalin", "cona"), CYAN),
    **dict.fromkeys(("rna", "syto14", "cy3"), YELLOW),
}
FALLBACK = (GREEN, MAGENTA, CYAN, YELLOW, RED, BLUE, ORANGE, WHITE)
COLOUR_WORDS = {
    BLUE: "blue", GREEN: "green", RED: "red", MAGENTA: "magenta", CYAN: "cyan", YELLOW: "yellow",
    ORANGE: "orange", WHITE: "white",
}
_PAIR = re.compile(r"^\s*([^=]+?)\s*=\s*#?([0-9A-Fa-f]{6})\s*$")


def parse_pairs(pairs: list[str]) -> list[str]:
    """``name=RRGGBB`` strings, checked and normalised (upper-case hex, no ``#``); ValueError names a bad one."""
    out, seen = [], set()
    for pair in pairs:
        match = _PAIR.match(pair)
        if not match:
            raise ValueError(f"{pair!r} is not name=RRGGBB (six hex digits, e.g. GFP=00FF00)")
        name = match[1]
        if name.lower() in seen:
            raise ValueError(f"channel {name!r} is given twice")
        seen.add(name.lower())
        out.append(f"{name}={match[2].upper()}")
    return out


def palette_colour(name: str) -> str | None:
    """The palette's colour for a channel name, by the whole name or any of its words; None if unknown."""
    lowered = name.lower()
    words = [lowered.replace("-", "").replace("_", ""), *re.split(r"[^a-z0-9]+", lowered)]
    return next((PALETTE[w] for w in words if w in PALETTE), None)


def channel_colours(channels: list[str], pairs: list[str] | None = None) -> list[str]:
    """One ``RRGGBB`` colour per channel, in channel order (see the module docstring for the rule).

    ``pairs`` are ``ingest.colors``; a pair naming no channel is a UserError.
    """
    chosen = {}
    for pair in parse_pairs(pairs or []):
        name, colour = pair.rsplit("=", 1)
        chosen[name.lower()] = colour
    unknown = sorted(set(chosen) - {c.lower() for c in channels})
    if unknown:
        raise UserError(f"CELLMI_INGEST__COLORS: {unknown[0]!r} names no channel (channels: {', '.join(channels)})")
    colours: list[str | None] = [chosen.get(c.lower()) or palette_colour(c) for c in channels]
    spare = [c for c in FALLBACK if c not in colours]
    for i, colour in enumerate(colours):
        if colour is None:
            colours[i] = spare.pop(0) if spare else FALLBACK[i % len(FALLBACK)]
    return [str(c) for c in colours]


def colour_word(colour: str) -> str:
    """``0000FF`` -> ``blue``; a colour without a plain name stays ``#RRGGBB``."""
    colour = colour.upper().lstrip("#")
    return COLOUR_WORDS.get(colour, f"#{colour}")


def rgb(colour: str) -> tuple[float, float, float]:
    """``RRGGBB`` -> (r, g, b) in [0, 1]."""
    value = colour.lstrip("#")
    return tuple(int(value[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]
