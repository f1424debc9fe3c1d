"""Credentials never appear in what cellmi prints or writes.

Secrets reach cellmi in two ways: the AWS credential variables (read by botocore, never by cellmi
itself) and ``user:password@`` inside a URL (a Dask scheduler address, a checkpoint URL, an
endpoint). Every test plants distinctive values and searches every byte cellmi produced for them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.clirun import AWS, AWS_KEY_ID, AWS_SECRET, assert_one_line_error, cellmi

PASSWORD = "pAsSw0rd-in-url-K3jH6"
SECRETS = (AWS_KEY_ID, AWS_SECRET, PASSWORD)


def leaks(data: bytes | str) -> list[str]:
    """The planted secrets found in some output (also their percent-encoded and UTF-16 forms)."""
    raw = data.encode() if isinstance(data, str) else data
    found = []
    for secret in SECRETS:
        forms = (secret.encode(), secret.replace("-", "%2D").encode(), secret.encode("utf-16-le"))
        if any(form in raw for form in forms):
            found.append(secret)
    return found


def assert_no_leak(proc: subprocess.CompletedProcess) -> None:
    assert not leaks(proc.stdout + proc.stderr), (leaks(proc.stdout + proc.stderr), proc.stderr[-3000:])


def test_config_redacts_userinfo_and_never_shows_aws_keys():
    scheduler = f"tls://alice:{PASSWORD}@scheduler.example:8786"
    checkpoint = f"s3://alice:{PASSWORD}@bucket/ckpt/step_000010.pt"
    proc = cellmi("config", "--infer.checkpoint", checkpoint,
                  env={**AWS, "CELLMI_INFER__SCHEDULER_ADDRESS": scheduler})  # one flag, one variable
    assert proc.returncode == 0, proc.stderr
    assert_no_leak(proc)
    shown = json.loads(proc.stdout)["infer"]
    assert shown["scheduler_address"] == "tls://***@scheduler.example:8786"
    assert shown["checkpoint"] == "s3://***@bucket/ckpt/step_000010.pt"


@pytest.mark.parametrize("flag", ["--workdir", "--source", "--cluster.apply_to"])
def test_a_refused_url_with_userinfo_is_not_echoed(tmp_path, flag):
    """URL settings refuse userinfo; the one-line refusal names the setting without the password."""
    proc = cellmi("config", flag, f"s3://alice:{PASSWORD}@bucket/run", env=AWS)
    assert_one_line_error(proc, "is neither a local path nor s3://bucket/prefix", "s3://***@bucket/run")
    assert_no_leak(proc)


def test_an_endpoint_with_userinfo_is_not_echoed(tmp_path):
    env = {**AWS, "AWS_ENDPOINT_URL": f"http://alice:{PASSWORD}@127.0.0.1:9", "CELLMI_TIMEOUTS__S3_ATTEMPTS": "1"}
    proc = cellmi("ingest", "--workdir", "s3://bucket/run", env=env, cwd=str(tmp_path))
    assert_one_line_error(proc, "cellmi ingest: error: S3 ")  # a malformed endpoint is the user's to fix
    assert_no_leak(proc)


def test_a_scheduler_address_with_userinfo_is_not_echoed(tmp_path):
    """Dask cannot parse userinfo; the refusal names the address redacted, at any log level."""
    from tests.infer.standin import make_store, write_checkpoint

    workdir = str(tmp_path / "run")
    make_store(os.path.join(workdir, "store.zarr"), samples=2, fields=1, size=96)
    write_checkpoint(os.path.join(workdir, "checkpoints"))
    proc = cellmi("infer", "--workdir", workdir, "--log_level", "DEBUG",
                  env={**AWS, "DASK_SCHEDULER_ADDRESS": f"tcp://alice:{PASSWORD}@127.0.0.1:8786"})
    assert_one_line_error(proc, "cellmi infer: error: tcp://***@127.0.0.1:8786: not a Dask scheduler address")
    assert_no_leak(proc)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_quick_run_on_s3_writes_no_credential_anywhere(s3_quick_run):
    """The run got the credentials from the environment, as on a cloud node; none is in what it printed,
    in any object it wrote or in any local file."""
    s3 = s3_quick_run.s3
    bucket, prefix = s3_quick_run.workdir.removeprefix("s3://").split("/", 1)
    assert_no_leak(s3_quick_run.proc)

    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    for name in ("report.html", "metrics.json", "clusters_images.parquet"):
        assert f"{prefix}/analysis/{name}" in keys
    for name in ("run.json", "settings.json", "checkpoints/metrics.jsonl", "checkpoints/step_000040.json",
                 "representations.parquet", "representations.zarr/zarr.json", "store.zarr/zarr.json"):
        assert f"{prefix}/{name}" in keys
    leaked = {key: found for key in keys if (found := leaks(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))}
    assert not leaked, leaked
    local = [os.path.join(root, name) for root, _, names in os.walk(s3_quick_run.cwd) for name in names]
    leaked = {path: found for path in local if (found := leaks(Path(path).read_bytes()))}
    assert not leaked, leaked
    settings = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/settings.json")["Body"].read())
    assert settings["workdir"] == s3_quick_run.workdir  # the file is the real settings, just without secrets
