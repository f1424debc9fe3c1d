"""Hangs: the S3 server (moto, its own process on loopback) frozen with SIGSTOP in the middle of a
stage and thawed with SIGCONT after it, and a Dask worker or scheduler frozen the same way.

Each freeze ends the stage within its bound, with one line naming what it waited on and for how
long, and exit status 75 (infrastructure, safe to retry); after the thaw the same command
completes, with nothing lost, nothing twice and nothing half-written taken as finished. A slow
server (answers within the timeouts) is no fault. The freeze during inference is in
test_faults.py (beside the endpoint that goes away).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import boto3
import numpy as np
import pytest

from cellmi.data.readers import write_dib
from cellmi.errors import INFRA_EXIT, IncompleteStoreError
from cellmi.representations import load_representations, read_parquet, write_representations
from cellmi.store import S3Limits, join, open_store, set_s3_limits
from cellmi.train.checkpoint import latest_checkpoint, load_encoder
from tests.analyze.conftest import make_reps
from tests.analyze.conftest import make_store as make_analysis_store
from tests.clirun import AWS, assert_one_line_error, cellmi, clean_env
from tests.infer.standin import make_store as make_infer_store
from tests.infer.standin import write_checkpoint
from tests.reliability.servers import FAST_S3, MotoServer, Proxy, free_port, wait_for
from tests.train.conftest import make_store as make_train_store
from tests.train.conftest import train_env

pytestmark = pytest.mark.timeout(240)

RETRY = "infrastructure fault, safe to retry (exit status 75)"
BOUND_S = 30  # from the freeze to the exit: two S3 tries of ~1 s, Dask and process shutdown
CHANNELS = ("DNA", "pH3", "actin")


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto, monkeypatch) -> str:
    """A fresh bucket; this process's S3 clients point at the server. The server is thawed after."""
    for key, value in {**AWS, "AWS_ENDPOINT_URL": moto.url}.items():
        monkeypatch.setenv(key, value)
    name = f"freeze-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=name)
    yield name
    moto.thaw()


def keys(bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def run_and_freeze(args: list[str], env: dict[str, str], ready: Callable[[], bool], freeze: Callable[[], None],
                   thaw: Callable[[], None]) -> tuple[subprocess.CompletedProcess, float]:
    """Start ``cellmi ARGS``, freeze once ``ready()``, let it end; (its result, seconds from freeze to exit)."""
    cmd = [sys.executable, "-m", "cellmi", *args]
    proc = subprocess.Popen(cmd, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or ready(), 120, "the moment to freeze", poll=0.01)
        assert proc.poll() is None, "the stage finished before the freeze: nothing was tested"
        freeze()
        start = time.monotonic()
        out, err = proc.communicate(timeout=BOUND_S + 60)
        waited = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        thaw()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), waited


def raw_folder(path, samples: int, fields: int, size: int = 64) -> dict[tuple[str, str], np.ndarray]:
    """BBBC018-style .DIB files; returns the pixels (C, Y, X) of each (sample, field)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for s in range(samples):
        for f in range(1, fields + 1):
            pixels = rng.poisson(100, (3, size, size)).astype(np.uint16)
            pixels[:, 10:30, 10:40] += 2000
            for c, name in enumerate(CHANNELS):
                (path / f"{s:04d}{f}-{name}.DIB").write_bytes(write_dib(pixels[c]))
            truth[(f"{s:04d}", str(f))] = pixels
    return truth


# ---------------------------------------------------------------- ingest
def test_a_freeze_during_ingest_ends_in_bound_and_a_rerun_completes(moto, bucket, tmp_path):
    truth = raw_folder(tmp_path / "raw", samples=8, fields=1)  # enough that the freeze lands mid-way
    workdir = f"s3://{bucket}/run"
    args = ["ingest", "--source", str(tmp_path / "raw"), "--workdir", workdir, "--ingest.n_test", "1"]
    env = {**AWS, "AWS_ENDPOINT_URL": moto.url, **FAST_S3}

    def images() -> set[str]:
        return {k.split("/")[3] for k in keys(bucket, "run/store.zarr/images/") if k.count("/") > 3}

    failed, waited = run_and_freeze(args, env, lambda: len(images()) >= 1, moto.freeze, moto.thaw)
    assert_one_line_error(failed, "cellmi ingest: error: no progress for ", f"waiting on {workdir}/store.zarr",
                          "Read timeout on endpoint URL", RETRY, code=INFRA_EXIT)
    assert waited < BOUND_S, f"{waited:.0f} s from the freeze to the exit"
    assert len(images()) < len(truth)  # the freeze came mid-way
    with pytest.raises(IncompleteStoreError):  # what was written is not taken as a store
        open_store(join(workdir, "store.zarr"))

    again = cellmi(*args, env=env, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]  # no overwrite needed: the old store was incomplete
    store = open_store(join(workdir, "store.zarr"))
    assert store.meta.images() == sorted(truth)
    assert images() == {f"{s}_{f}" for s, f in truth}  # nothing left over from the first attempt
    for (sample, field), pixels in truth.items():
        np.testing.assert_array_equal(store.read_image(sample, field), pixels)


def test_a_slow_server_within_the_timeouts_is_no_fault(moto, bucket, tmp_path):
    """Every packet delayed 0.1 s: each request waits ~0.2-0.4 s for its answer, the timeout is 1 s."""
    truth = raw_folder(tmp_path / "raw", samples=2, fields=1)
    workdir = f"s3://{bucket}/run"
    proxy = Proxy(moto.port, delay=0.1)
    proxy.open()
    try:
        start = time.monotonic()
        proc = cellmi("ingest", "--source", str(tmp_path / "raw"), "--workdir", workdir, "--ingest.n_test", "1",
                      env={**AWS, "AWS_ENDPOINT_URL": proxy.url, **FAST_S3}, timeout=180)
        took = time.monotonic() - start
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took > 4, f"{took:.1f} s: the proxy did not slow the run down"
    assert open_store(join(workdir, "store.zarr")).meta.images() == sorted(truth)


# ---------------------------------------------------------------- a checkpoint write
def test_a_freeze_during_a_checkpoint_write_ends_in_bound_and_training_resumes(moto, bucket):
    workdir = f"s3://{bucket}/run"
    make_train_store(join(workdir, "store.zarr"))
    steps, every = 20, 5
    env = {**train_env(workdir, steps=steps, checkpoint_every=every, log_every=1000), **AWS,
           "AWS_ENDPOINT_URL": moto.url, **FAST_S3}
    folder = join(workdir, "checkpoints")

    def sidecars() -> list[int]:
        names = [k.rsplit("/", 1)[-1] for k in keys(bucket, "run/checkpoints/")]
        return sorted(int(n[5:11]) for n in names if n.startswith("step_") and n.endswith(".json"))

    failed, waited = run_and_freeze(["train"], env, lambda: bool(sidecars()), moto.freeze, moto.thaw)
    assert_one_line_error(failed, "cellmi train: error: no progress for ", f"waiting on {folder}", RETRY,
                          code=INFRA_EXIT)
    assert waited < BOUND_S, f"{waited:.0f} s from the freeze to the exit"
    time.sleep(0.5)  # requests the frozen server held are served now; they must change nothing below
    resume = max(sidecars())
    assert resume < steps
    assert latest_checkpoint(folder) == join(folder, f"step_{resume:06d}.pt")  # no newer .pt taken as done

    again = cellmi("train", env=env, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {folder}/step_{resume:06d}.pt at step {resume}" in again.stderr
    _, info = load_encoder(folder)
    assert info["step"] == steps and info["stop_reason"] == "steps"


# ---------------------------------------------------------------- Dask
class DaskCluster:
    """``dask scheduler`` and one ``dask worker`` (no nanny: the worker is that process) on loopback."""

    def __init__(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        dask = os.path.join(os.path.dirname(sys.executable), "dask")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": clean_env()}
        self.scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port",
                                           self.address.rsplit(":", 1)[1], "--dashboard-address", ":0"], **quiet)
        self.worker = subprocess.Popen([dask, "worker", self.address, "--no-nanny", "--nthreads", "1",
                                        "--dashboard-address", ":0"], **quiet)
        from distributed import Client

        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
            client.run(lambda: __import__("cellmi.infer.task"))  # torch loaded before any timing starts

    def stop(self) -> None:
        for proc in (self.worker, self.scheduler):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dask_cluster():
    cluster = DaskCluster()
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("part", ["worker", "scheduler"])
def test_a_frozen_dask_worker_or_scheduler_ends_inference_by_the_stall_limit_and_a_rerun_completes(
    dask_cluster, tmp_path, part
):
    workdir = str(tmp_path / "run")
    samples, fields = 3, 3
    make_infer_store(join(workdir, "store.zarr"), samples=samples, fields=fields, size=96)
    write_checkpoint(join(workdir, "checkpoints"))
    parts = join(workdir, "representations.parts")
    args = ["infer", "--workdir", workdir, "--infer.fields_per_task", "1"]
    env = {"DASK_SCHEDULER_ADDRESS": dask_cluster.address, "CELLMI_TIMEOUTS__STALL_S": "10"}
    frozen = getattr(dask_cluster, part)

    def done() -> int:
        return len([n for n in os.listdir(parts) if n.endswith(".done")]) if os.path.isdir(parts) else 0

    failed, waited = run_and_freeze(args, env, lambda: done() >= 1, lambda: frozen.send_signal(signal.SIGSTOP),
                                    lambda: frozen.send_signal(signal.SIGCONT))
    line = assert_one_line_error(failed, "cellmi infer: error: no progress for ",
                                 f"waiting on the Dask cluster {dask_cluster.address}", "CELLMI_TIMEOUTS__STALL_S=10",
                                 RETRY, code=INFRA_EXIT)
    assert 10 <= int(line.split("no progress for ")[1].split()[0]) < 20
    assert waited < 20, f"{waited:.0f} s from the freeze to the exit"
    kept = done()
    assert 1 <= kept < samples * fields

    # The thawed worker may still finish the field it held, for a client that is gone: a late
    # duplicate, which the rerun must neither lose nor count twice.
    again = cellmi(*args, env={"DASK_SCHEDULER_ADDRESS": dask_cluster.address}, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = int(again.stderr.split("resuming: ")[1].split()[0])
    assert kept <= resumed <= kept + 1
    reps = load_representations(join(workdir, "representations.zarr"))
    rows = list(zip(reps.table["sample"], reps.table["field"], reps.table["y"], reps.table["x"], strict=True))
    assert len(rows) == len(set(rows))
    assert len(set(zip(reps.table["sample"], reps.table["field"], strict=True))) == samples * fields


# ---------------------------------------------------------------- clustering
@pytest.fixture
def restore_s3_limits():
    """The in-process runs below set this process's S3 limits from their settings: put them back."""
    yield
    set_s3_limits(S3Limits())


@pytest.mark.slow
def test_a_freeze_while_clustering_writes_ends_in_bound_and_a_rerun_completes(
    moto, bucket, monkeypatch, capsys, restore_s3_limits
):
    """In this process (UMAP's compiled code is then shared with the rerun and other tests)."""
    from cellmi.cli import main as cli_main

    workdir = f"s3://{bucket}/run"
    make_analysis_store(join(workdir, "store.zarr"))
    write_representations(join(workdir, "representations.zarr"), make_reps(join(workdir, "store.zarr")))
    for key, value in FAST_S3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CELLMI_CLUSTER__BASELINES", "false")

    def outputs() -> list[str]:
        return [k.rsplit("/", 1)[-1] for k in keys(bucket, "run/analysis/")]

    stop = threading.Event()
    froze_at: list[float] = []

    def freeze_on_first_output() -> None:
        while not stop.is_set():
            if outputs():
                moto.freeze()
                froze_at.append(time.monotonic())
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=freeze_on_first_output, daemon=True)
    watcher.start()
    try:
        code = cli_main(["cluster", "--workdir", workdir])
        ended = time.monotonic()
    finally:
        stop.set()
        watcher.join()
        moto.thaw()
    err = capsys.readouterr().err
    assert froze_at, "clustering finished before the freeze: nothing was tested"
    failed = subprocess.CompletedProcess(["cellmi", "cluster"], code, "", err)
    # the first request after the freeze is named: an output's write, or a read of the store for the maps
    assert_one_line_error(failed, "cellmi cluster: error: no progress for ", f"waiting on {workdir}/", RETRY,
                          code=INFRA_EXIT)
    assert ended - froze_at[0] < BOUND_S
    time.sleep(0.5)  # requests the frozen server held are served now
    written = outputs()
    assert "report.html" not in written  # written last: the stage is not taken as done

    assert cli_main(["cluster", "--workdir", workdir]) == 0
    assert {"report.html", "metrics.json", "clusters_images.parquet", "clusters_windows.parquet"} <= set(outputs())
    table = read_parquet(join(workdir, "analysis", "clusters_windows.parquet"))
    reps = load_representations(join(workdir, "representations.zarr")).table
    assert len(table) == int(((reps["split"] == "test") & ~reps["background"]).sum())  # every window once
    assert not table.duplicated(["Metadata_sample", "Metadata_field", "Metadata_y", "Metadata_x"]).any()
