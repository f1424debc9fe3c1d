"""Print (or, with --write, refresh in docs/settings.md) the settings reference table.

    python scripts/settings_reference.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from cellmi.settings import ENV_PREFIX, NESTED, SECTIONS, Settings

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "" if isinstance(info.default_factory, type) else f"`{info.default_factory()}`"
    return f"`{info.default}`" if info.default is not None else "unset"


def table() -> str:
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        if name in SECTIONS:
            continue
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `--{name}` | {_default(info)} | {info.description} |")
    for section in SECTIONS:
        cls = Settings.model_fields[section].annotation
        for name, info in cls.model_fields.items():  # type: ignore[union-attr]
            env = f"{ENV_PREFIX}{section.upper()}{NESTED}{name.upper()}"
            rows.append(f"| `{env}` | `--{section}.{name}` | {_default(info)} | {info.description} |")
    return "\n".join(rows)


def refreshed(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(refreshed(DOC.read_text()))
    else:
        print(table())
