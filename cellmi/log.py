"""One logger for the package, configured once, quiet on every rank but 0."""

from __future__ import annotations

import logging
import os
import sys

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
    """Progress bars on rank 0 only, and not when CELLMI_NO_PROGRESS-like CI logs would flood."""
    return int(os.environ.get("RANK", "0")) == 0
