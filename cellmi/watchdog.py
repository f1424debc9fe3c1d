"""Bounded waits: a stage that waits on storage or a cluster and makes no progress stops, with one line.

A stage marks what it waits on and what counts as progress::

    with waiting("s3://bucket/run/checkpoints/step_000200.pt"):   # a URL or a Dask address
        write(...)
    mark_progress()                                              # a field, a step, a file done

A wait that ends counts as progress. While any wait is open, the watchdog of the running command
(:func:`watch`, started by the CLI) checks that progress came within ``timeouts.stall_s``; if
not, it prints ``cellmi <stage>: error: no progress for N s waiting on <what> ...`` and ends the
process with exit status 75 at once: a process stuck in a hung connection cannot be trusted to
clean up, and every output is written so that a killed run leaves nothing that looks finished.
Work that waits on nothing (UMAP, a training step's arithmetic) is never timed.

A storage or network exception (a timeout, a refused or reset connection) that leaves a wait
becomes an :class:`~cellmi.errors.InfrastructureError` naming the wait and its length, in any
process (also in Dask workers, where no watchdog runs).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cellmi.errors import INFRA_EXIT, RETRY_NOTE, InfrastructureError, first_line, is_infrastructure, no_answer
from cellmi.settings import TimeoutSettings, redact

__all__ = ["Watchdog", "dask_config", "gather", "mark_progress", "set_stage", "waiting", "watch"]


@dataclass
class _Wait:
    what: str
    started: float


def _exit_now(line: str) -> None:
    """Print the line and end the process with the infrastructure status, skipping clean-up."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(INFRA_EXIT)


class Watchdog:
    """Watches the open waits of one command; ``on_stall`` gets the line when progress stops."""

    def __init__(
        self,
        stage: str,
        stall_s: float,
        on_stall: Callable[[str], None] = _exit_now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage, self.stall_s, self.on_stall, self.clock = stage, stall_s, on_stall, clock
        self._lock = threading.Lock()
        self._waits: dict[int, _Wait] = {}
        self._tokens = itertools.count()
        self._last = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, what: str) -> int:
        with self._lock:
            token = next(self._tokens)
            self._waits[token] = _Wait(what, self.clock())
            return token

    def end(self, token: int) -> None:
        with self._lock:
            self._waits.pop(token, None)

    def progress(self) -> None:
        with self._lock:
            self._last = self.clock()

    def quiet(self) -> float:
        """Seconds since the last progress (or the start)."""
        with self._lock:
            return self.clock() - self._last

    def stalled(self) -> tuple[str, float] | None:
        """(what, seconds without progress) when a wait has gone on past ``stall_s``, else None.

        Time counts from the last progress or the start of the oldest open wait, whichever is
        later (work before the wait is not waiting); the newest open wait is the one named.
        """
        with self._lock:
            if not self._waits:
                return None
            waits = list(self._waits.values())
            quiet = self.clock() - max(self._last, min(w.started for w in waits))
            if quiet <= self.stall_s:
                return None
            return max(waits, key=lambda w: w.started).what, quiet

    def line(self, what: str, seconds: float) -> str:
        reason = f"CELLMI_TIMEOUTS__STALL_S={self.stall_s:g}"
        return redact(f"cellmi {self.stage}: error: {no_answer(what, seconds, reason)}{RETRY_NOTE}")

    def start(self) -> None:
        poll = max(0.05, min(1.0, self.stall_s / 10))
        self._thread = threading.Thread(target=self._run, args=(poll,), name="cellmi-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, poll: float) -> None:
        while not self._stop.wait(poll):
            found = self.stalled()
            if found is not None:
                self.on_stall(self.line(*found))
                return


_current: Watchdog | None = None


@contextmanager
def watch(stage: str, stall_s: float, on_stall: Callable[[str], None] = _exit_now) -> Iterator[Watchdog]:
    """Run the body under a watchdog for ``stage`` (one per process; the CLI starts it)."""
    global _current
    dog = Watchdog(stage, stall_s, on_stall)
    previous, _current = _current, dog
    dog.start()
    try:
        yield dog
    finally:
        dog.stop()
        _current = previous


def set_stage(stage: str) -> None:
    """Name the stage in the watchdog's line (``cellmi run`` runs several)."""
    if _current is not None:
        _current.stage = stage


def mark_progress() -> None:
    """Something was done: a field, a step, a file."""
    if _current is not None:
        _current.progress()


@contextmanager
def waiting(what: str) -> Iterator[None]:
    """Mark a wait on ``what`` (a URL or address); a timeout or lost connection inside becomes an
    InfrastructureError naming it and how long it was waited on."""
    dog = _current
    token = dog.begin(what) if dog is not None else None
    started = time.monotonic()
    try:
        yield
    except InfrastructureError:
        raise
    except Exception as err:
        if is_infrastructure(err):
            raise no_answer(what, time.monotonic() - started, first_line(err)) from err
        raise
    else:
        mark_progress()
    finally:
        if dog is not None and token is not None:
            dog.end(token)


# ---------------------------------------------------------------- Dask
def dask_config(timeouts: TimeoutSettings) -> dict[str, Any]:
    """Dask settings that bound waits on a scheduler or worker that stops answering.

    ``worker-ttl`` acts in the scheduler (the embedded cluster's; a remote one keeps its own).
    """
    seconds = f"{timeouts.dask_s:g}s"
    return {
        "distributed.comm.timeouts.connect": seconds,
        "distributed.comm.timeouts.tcp": seconds,
        "distributed.scheduler.worker-ttl": seconds,
    }


def gather(futures: list[Any], what: str) -> list[Any]:
    """The results of Dask futures in their order; each one done is progress, the wait is on ``what``."""
    from distributed import as_completed

    index = {future.key: i for i, future in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    with waiting(what):
        for future in as_completed(futures):
            results[index[future.key]] = future.result()
            mark_progress()
    return results
