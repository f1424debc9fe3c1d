"""Bounded waits (cellmi.watchdog) and the kinds of failure (cellmi.errors), in this process.

The same parts against real frozen servers: tests/reliability/test_freeze.py.
"""

from __future__ import annotations

import errno
import re
import threading
import time

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from distributed.comm.core import CommClosedError

from cellmi.errors import INFRA_EXIT, RETRY_NOTE, InfrastructureError, UserError, is_infrastructure
from cellmi.settings import TimeoutSettings
from cellmi.watchdog import Watchdog, mark_progress, waiting, watch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_wait_without_progress_past_the_limit_is_a_stall():
    clock = Clock()
    dog = Watchdog("infer", 10, on_stall=lambda line: None, clock=clock)
    clock.now += 50  # work that waits on nothing (UMAP, arithmetic) is never timed
    assert dog.stalled() is None
    outer = dog.begin("the Dask cluster tcp://10.0.0.1:8786")  # the clock starts with the wait, not before
    clock.now += 9
    assert dog.stalled() is None
    dog.progress()  # a field done
    clock.now += 9
    assert dog.stalled() is None
    inner = dog.begin("s3://bucket/run/store.zarr/images/a_1")
    clock.now += 2
    assert dog.stalled() == ("s3://bucket/run/store.zarr/images/a_1", 11)  # the newest wait is named
    dog.end(inner)
    assert dog.stalled() == ("the Dask cluster tcp://10.0.0.1:8786", 11)
    dog.end(outer)
    assert dog.stalled() is None


def test_the_watchdog_thread_gives_one_line_when_a_wait_hangs():
    lines: list[str] = []
    with watch("ingest", 0.3, on_stall=lines.append), waiting("s3://bucket/run/store.zarr"):
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
    (line,) = lines
    assert line.startswith("cellmi ingest: error: no progress for ")
    assert "waiting on s3://bucket/run/store.zarr (CELLMI_TIMEOUTS__STALL_S=0.3)" in line
    assert line.endswith(RETRY_NOTE) and f"exit status {INFRA_EXIT}" in line


def test_progress_keeps_a_long_wait_alive():
    lines: list[str] = []
    with watch("infer", 0.5, on_stall=lines.append), waiting("the Dask cluster tcp://127.0.0.1:1"):
        for _ in range(15):  # 1.5 s in all, never 0.5 s without progress
            time.sleep(0.1)
            mark_progress()
    assert lines == []


def test_waits_from_many_threads_end_cleanly():
    with watch("ingest", 60, on_stall=pytest.fail) as dog:

        def read(i: int) -> None:
            with waiting(f"s3://bucket/raw/{i}.DIB"):
                time.sleep(0.01)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert dog.stalled() is None and not dog._waits


def test_a_timeout_inside_a_wait_becomes_one_infrastructure_error_naming_it():
    with pytest.raises(InfrastructureError) as caught, waiting("s3://bucket/run/checkpoints/step_000010.pt"):
        raise ReadTimeoutError(endpoint_url="http://127.0.0.1:9000/bucket/run/checkpoints/step_000010.pt")
    message = str(caught.value)
    assert re.match(r"no progress for \d+ s waiting on s3://bucket/run/checkpoints/step_000010\.pt \(", message)
    assert 'Read timeout on endpoint URL: "http://127.0.0.1:9000/bucket/run/checkpoints' in message
    assert caught.value.exit_code == INFRA_EXIT


@pytest.mark.parametrize(
    "err",
    [ValueError("a bug"), PermissionError("AccessDenied"), FileNotFoundError("no such key"), UserError("bad")],
)
def test_other_errors_leave_a_wait_unchanged(err):
    with pytest.raises(type(err)) as caught, waiting("s3://bucket/x"):
        raise err
    assert caught.value is err


def _raised_from(err: BaseException, cause: BaseException | None, suppress: bool = False) -> BaseException:
    """``err`` as raised inside ``except cause`` (``from None`` when ``suppress``)."""
    try:
        try:
            raise cause
        except BaseException:
            if suppress:
                raise err from None
            raise err  # noqa: B904 - the implicit chain is what is tested
    except BaseException as got:
        return got


INFRASTRUCTURE = [
    TimeoutError("timed out"),
    ConnectionResetError(errno.ECONNRESET, "reset"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    OSError(errno.EBUSY, "SlowDown"),  # s3fs's 503
    OSError(getattr(errno, "EREMOTEIO", errno.EIO), "InternalError"),  # s3fs's 500
    ReadTimeoutError(endpoint_url="http://h/b/k"),
    ConnectTimeoutError(endpoint_url="http://h/b/k"),
    EndpointConnectionError(endpoint_url="http://h/b/k"),
    HTTPClientError(error=TimeoutError("inner")),
    InfrastructureError("no answer"),
    CommClosedError("in <TCP (closed) ...>: Stream is closed"),
]
NOT_INFRASTRUCTURE = [
    ValueError("bad value"),
    PermissionError(errno.EACCES, "AccessDenied"),
    FileNotFoundError(errno.ENOENT, "NoSuchKey"),
    OSError(errno.EIO, "local disk"),
    SSLError(endpoint_url="http://h", error="certificate verify failed"),
    HTTPClientError(error=ValueError("Cannot combine AUTHORIZATION header with credentials encoded in URL")),
    NoCredentialsError(),
    ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "GetObject"),
    UserError("bad setting"),
]


@pytest.mark.parametrize("err", INFRASTRUCTURE, ids=lambda e: type(e).__name__)
def test_timeouts_and_lost_connections_are_infrastructure(err):
    assert is_infrastructure(err)
    assert is_infrastructure(_raised_from(RuntimeError("wrapped"), err))  # a chained cause counts


@pytest.mark.parametrize("err", NOT_INFRASTRUCTURE, ids=lambda e: type(e).__name__)
def test_refusals_bad_input_and_bugs_are_not(err):
    assert not is_infrastructure(err)


def test_raise_from_none_ends_the_chain():
    assert not is_infrastructure(_raised_from(UserError("bad address"), TimeoutError(), suppress=True))


def test_the_default_s3_limits_give_up_on_a_silent_endpoint_within_two_minutes():
    """botocore's standard mode: each try waits at most max(connect, read); backoff between tries is
    random up to min(2**i, 20) s."""
    t = TimeoutSettings()
    backoff = sum(min(2**i, 20) for i in range(t.s3_attempts - 1))
    worst = t.s3_attempts * max(t.s3_connect_s, t.s3_read_s) + backoff
    assert 60 <= worst <= 120, worst  # rides out short interruptions, gives up within about two minutes
    assert t.stall_s > worst  # a hung request ends in its own line (naming the URL) before the watchdog's
