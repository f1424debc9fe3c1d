"""Shared fixtures: a real S3 server (moto) on loopback, small threads for torch."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.clirun import AWS, AWS_KEY_ID, AWS_SECRET, cellmi

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; yields its URL. Credentials are fake and local."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@dataclass
class S3Run:
    workdir: str  # s3://bucket/run
    env: dict[str, str]  # endpoint and credentials
    s3: Any  # a boto3 client of the server
    proc: subprocess.CompletedProcess
    cwd: Path  # where the process ran


@pytest.fixture(scope="session")
def s3_quick_run(s3_endpoint, tmp_path_factory) -> S3Run:
    """One ``cellmi run --quick`` into a fresh bucket of the moto server with the planted credentials of
    tests.clirun: the S3 run tests check what it wrote, the security tests that no credential is in it."""
    import boto3

    bucket = "cellmi-run-" + os.urandom(4).hex()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=AWS_KEY_ID,
                      aws_secret_access_key=AWS_SECRET, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    env = {**AWS, "AWS_ENDPOINT_URL": s3_endpoint}
    workdir = f"s3://{bucket}/run"
    cwd = tmp_path_factory.mktemp("s3-run-cwd")
    proc = cellmi("run", "--quick", env={**env, "CELLMI_WORKDIR": workdir}, cwd=str(cwd), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return S3Run(workdir, env, s3, proc, cwd)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Point AWS clients (s3fs, boto) at the local server with fake keys; yields a fresh bucket URL."""
    import uuid

    import boto3

    for key, value in {**AWS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    bucket = f"cellmi-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


@pytest.fixture(autouse=True)
def _no_cellmi_env(monkeypatch):
    """Tests start from the defaults: no CELLMI_* variables leak in from the shell."""
    for key in list(os.environ):
        if key.startswith("CELLMI_"):
            monkeypatch.delenv(key)
