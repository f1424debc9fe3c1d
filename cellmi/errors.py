"""What went wrong, as an exit status a scheduler can act on.

    0    done
    2    user error (bad input, bad settings, a refused operation): fix it, retrying cannot help
    75   infrastructure (storage or a cluster service did not answer in time): safe to retry as is
    143  stopped by SIGTERM (preemption); training wrote a checkpoint first

75 is ``EX_TEMPFAIL`` of sysexits.h ("temporary failure; the user is invited to retry"); Python
(1, 120), torchrun (1) and signals (128 + N) never use it. The CLI prints one line for 2 and 75.
"""

from __future__ import annotations

import errno
import sys

INFRA_EXIT = 75
# errno values of a storage endpoint or network that failed for now (s3fs maps S3's 5xx to EREMOTEIO)
_TRANSIENT_ERRNO = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
    errno.EBUSY,
    getattr(errno, "EREMOTEIO", errno.EIO),
}


class UserError(Exception):
    """Bad input, bad settings or a refused operation; the message names what is wrong."""

    exit_code = 2


class IncompleteStoreError(UserError):
    """A store (or run folder) that was never marked complete."""


class InfrastructureError(Exception):
    """Storage or a cluster service did not answer in time; nothing is wrong with the input.

    The message names what was waited on and for how long; re-running the same command is safe.
    """

    exit_code = INFRA_EXIT


def _transient_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout or lost-connection types, types that look like one but are not: TLS certificates)."""
    kinds: list[type[BaseException]] = [TimeoutError, ConnectionError, InfrastructureError]
    never: list[type[BaseException]] = []
    try:
        from botocore.exceptions import (
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
            SSLError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        kinds += [ReadTimeoutError, ConnectionClosedError, ResponseStreamingError, IncompleteReadError]
        kinds.append(BotoConnectionError)  # refused, connect timeout, proxy
        never.append(SSLError)
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        kinds += [ClientConnectionError, ClientPayloadError]
    except ImportError:  # pragma: no cover - s3fs brings aiohttp
        pass
    comm = sys.modules.get("distributed.comm.core")  # not imported: no Dask connection to lose
    if comm is not None:
        kinds.append(comm.CommClosedError)
    return tuple(kinds), tuple(never)


def is_infrastructure(err: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a timeout or a lost connection rather
    than a bug or bad input: a refusal (403, 404, bad credentials) or a TLS certificate is not one."""
    current: BaseException | None = err
    for _ in range(8):  # the chain of causes, bounded
        if current is None:
            return False
        if _is_transient(current):
            return True
        suppressed = current.__suppress_context__  # `raise ... from None` ends the chain
        current = current.__cause__ if current.__cause__ is not None or suppressed else current.__context__
    return False


def _is_transient(err: BaseException) -> bool:
    kinds, never = _transient_types()
    if isinstance(err, never):
        return False
    if isinstance(err, kinds):
        return True
    wrapped = getattr(err, "kwargs", {}).get("error") if type(err).__name__ == "HTTPClientError" else None
    if isinstance(wrapped, BaseException):  # botocore's wrapper of whatever the HTTP client raised
        return _is_transient(wrapped)
    return isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNO


def no_answer(what: str, seconds: float, reason: str = "") -> InfrastructureError:
    """The error of a wait that ended without an answer: what was waited on, how long, why."""
    because = f" ({reason})" if reason else ""
    return InfrastructureError(f"no progress for {seconds:.0f} s waiting on {what}{because}")


# The end of every line the CLI prints for an InfrastructureError.
RETRY_NOTE = f"; infrastructure fault, safe to retry (exit status {INFRA_EXIT})"


def first_line(err: BaseException) -> str:
    """An exception's first message line, or its type when it has none."""
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__
