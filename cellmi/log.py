"""One logger for the package, configured once, quiet on every rank but 0."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm.auto import tqdm

from cellmi.settings import redact

LOGGER_NAME = "cellmi"
log = logging.getLogger(LOGGER_NAME)


class RedactingFormatter(logging.Formatter):
    """Log lines with ``scheme://user:password@`` in URLs (an address, an endpoint, an error) redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``cellmi`` logger; processes of rank > 0 only log warnings."""
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""
    handler.setFormatter(RedactingFormatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level if rank == 0 else "WARNING")
    log.propagate = False


def progress_enabled() -> bool:
    """Progress bars on rank 0 only."""
    return int(os.environ.get("RANK", "0")) == 0


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on rank 0; redrawn every 30 s instead of 10 times a second when stderr is not a
    terminal, so batch logs (Kubernetes, SLURM, CI) get a line now and then, not a flood."""
    kwargs.setdefault("disable", not progress_enabled())
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
