"""S3 requests of cellmi.store against an endpoint that never answers: bounded tries, one clear error."""

from __future__ import annotations

import time

import pytest

from cellmi.errors import InfrastructureError
from cellmi.store import S3Limits, read_bytes, set_s3_limits, write_bytes_atomic
from tests.clirun import AWS
from tests.reliability.servers import SilentServer


@pytest.fixture
def silent(monkeypatch):
    server = SilentServer()
    for key, value in {**AWS, "AWS_ENDPOINT_URL": server.url}.items():
        monkeypatch.setenv(key, value)
    set_s3_limits(S3Limits(connect_s=1, read_s=0.5, attempts=3))
    yield server
    set_s3_limits(S3Limits())
    server.close()


@pytest.mark.parametrize("request_of", ["read", "write"])
def test_a_silent_endpoint_gets_exactly_the_set_tries_then_one_error(silent, request_of):
    url = "s3://bucket/run/checkpoints/step_000010.pt"
    start = time.monotonic()
    with pytest.raises(InfrastructureError, match=rf"waiting on {url} \(Read timeout on endpoint URL"):
        if request_of == "read":
            read_bytes(url)
        else:
            write_bytes_atomic(url, b"x" * 1000)
    took = time.monotonic() - start
    method = "HEAD" if request_of == "read" else "PUT"  # a read asks for the object's size first
    assert silent.requests == [f"{method} /bucket/run/checkpoints/step_000010.pt HTTP/1.1"] * 3
    assert 3 * 0.5 <= took < 3 * 0.5 + (1 + 2) + 3  # three timeouts, two backoffs of at most 1 and 2 s, slack
