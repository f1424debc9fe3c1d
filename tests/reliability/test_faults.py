"""Faults with real parts: a training worker killed under torchrun, the S3 endpoint going away or
hanging mid-inference, and the out-of-memory guard at the command line.

Also covered elsewhere (not repeated here):

- A Dask worker killed (SIGKILL) while an inference task runs: the run completes and every field
  is in the output exactly once -- tests/infer/test_job.py::test_a_killed_worker_loses_and_duplicates_no_field.
- A plain ``cellmi train`` process killed right after a checkpoint resumes to the same weights as
  straight training -- tests/train/test_train.py::test_kill_and_resume_equals_straight_training.
- The memory estimate and the other refusals of ``make_plan``, in-process --
  tests/infer/test_job.py::test_bad_settings_are_refused_before_any_work (here: the same guard
  through the command line, with the estimate in the message).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import boto3
import psutil
import pytest

from cellmi.errors import INFRA_EXIT
from cellmi.representations import load_representations
from cellmi.store import STORE_NAME, join
from cellmi.train.checkpoint import load_encoder
from tests.clirun import AWS, assert_one_line_error, cellmi, clean_env
from tests.infer.standin import make_store as make_infer_store
from tests.infer.standin import write_checkpoint
from tests.reliability.servers import FAST_S3, MotoServer, Proxy, wait_for
from tests.train.conftest import make_store as make_train_store
from tests.train.conftest import train_env

pytestmark = pytest.mark.timeout(240)


# ---------------------------------------------------------------- a training worker killed under torchrun
def sidecar_steps(folder: str) -> list[int]:
    """Steps of the checkpoints whose sidecar exists (the sidecar is written after the .pt)."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(folder) if (m := re.fullmatch(r"step_(\d+)\.json", name)))


def worker_of(launcher: subprocess.Popen) -> psutil.Process:
    """The training process torchrun started (its child running ``-m cellmi train``)."""
    found: list[psutil.Process] = []

    def look() -> bool:
        found[:] = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                    if "cellmi" in p.cmdline() and "train" in p.cmdline()]
        return bool(found) or launcher.poll() is not None

    wait_for(look, 60, "torchrun's worker process")
    assert len(found) == 1, [p.cmdline() for p in found]
    return found[0]


def test_a_killed_torchrun_worker_is_restarted_and_resumes_from_its_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    make_train_store(join(workdir, STORE_NAME))
    steps, every = 200, 10
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "--max-restarts", "1", "-m", "cellmi", "train"]
    launcher = subprocess.Popen(cmd, env=train_env(workdir, steps=steps, checkpoint_every=every, log_every=every),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = worker_of(launcher)
        ckpt_dir = os.path.join(workdir, "checkpoints")
        wait_for(lambda: sidecar_steps(ckpt_dir) or launcher.poll() is not None, 120, "the first checkpoint",
                 poll=0.002)
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        resume_step = max(sidecar_steps(ckpt_dir))  # nothing more is written after SIGKILL
        assert resume_step < steps, "the worker finished before it was killed: nothing was tested"
        _, stderr = launcher.communicate(timeout=150)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr, stderr[-3000:]  # torchrun saw the worker die and restarted it
    resumed = os.path.join(ckpt_dir, f"step_{resume_step:06d}.pt")
    assert f"resumed from {resumed} at step {resume_step}" in stderr, stderr[-3000:]
    assert f"steps {resume_step}..{steps}" in stderr and f"stopped at step {steps} (steps)" in stderr
    encoder, info = load_encoder(ckpt_dir)
    assert info["step"] == steps and info["stop_reason"] == "steps" and not encoder.training
    with open(os.path.join(ckpt_dir, "metrics.jsonl")) as handle:
        logged = [json.loads(line)["step"] for line in handle]
    assert logged == list(range(every, steps + 1, every))  # no step lost or logged twice across the restart


# ---------------------------------------------------------------- the S3 endpoint failing mid-inference
@pytest.fixture
def moto_process():
    """A moto S3 server in its own process on loopback."""
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


FAULTS = {
    # connections reset, new ones refused (a restarting endpoint); then the same address again
    "reset": (lambda proxy, moto: proxy.close(), lambda proxy, moto: proxy.open()),
    # the server stops answering, connections stay open (a hung endpoint, a dead NAT path); then thawed
    "frozen": (lambda proxy, moto: moto.freeze(), lambda proxy, moto: moto.thaw()),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_s3_failing_mid_inference_is_one_line_exit_75_and_a_rerun_computes_only_the_rest(
    moto_process, monkeypatch, fault
):
    moto = moto_process
    for key, value in {**AWS, "AWS_ENDPOINT_URL": moto.url}.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=moto.url)
    s3.create_bucket(Bucket="faults")
    workdir = "s3://faults/run"
    samples, fields = 3, 3
    make_infer_store(join(workdir, STORE_NAME), samples=samples, fields=fields, size=96)
    write_checkpoint(join(workdir, "checkpoints"))

    def markers() -> dict[str, dict]:
        listed = s3.list_objects_v2(Bucket="faults", Prefix="run/representations.parts/").get("Contents", [])
        keys = [o["Key"] for o in listed if o["Key"].endswith(".done")]
        return {k.rsplit("/", 1)[-1]: json.loads(s3.get_object(Bucket="faults", Key=k)["Body"].read())
                for k in keys}

    def outputs() -> list[str]:
        listed = s3.list_objects_v2(Bucket="faults", Prefix="run/representations").get("Contents", [])
        return [o["Key"] for o in listed if not o["Key"].startswith("run/representations.parts/")]

    proxy = Proxy(moto.port, delay=0.01)
    proxy.open()
    # Each S3 request is given up on after two tries of one second (the defaults: five of 20 s).
    env = {**AWS, "AWS_ENDPOINT_URL": proxy.url, **FAST_S3}
    args = ("infer", "--workdir", workdir, "--infer.workers", "1", "--infer.retries", "1",
            "--infer.fields_per_task", "3")
    cmd = [sys.executable, "-m", "cellmi", *args]
    break_it, mend_it = FAULTS[fault]
    proc = subprocess.Popen(cmd, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(markers()) >= 2 or proc.poll() is not None, 90, "two fields done", poll=0.05)
        assert proc.poll() is None, "inference finished before the fault: nothing was tested"
        break_it(proxy, moto)
        cut = time.monotonic()
        stdout, stderr = proc.communicate(timeout=90)
        waited = time.monotonic() - cut
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mend_it(proxy, moto)
    failed = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert_one_line_error(failed, "of 3 task(s) (", "failed after 1 retries",
                          f"waiting on {workdir}/",  # what was waited on
                          f"endpoint URL: \"{proxy.url}/faults",  # at which endpoint
                          "re-run to finish them (fields done before a failure are kept)",
                          "infrastructure fault, safe to retry (exit status 75)", code=INFRA_EXIT)
    assert "Compute Failed" not in stderr  # the workers' tracebacks stay out of the user's terminal
    assert waited < 45, f"{waited:.0f} s from the fault to the error: retries are not bounded"
    done = markers()
    assert 2 <= len(done) < samples * fields, sorted(done)
    assert outputs() == [], outputs()  # no representations written, let alone marked complete

    proxy.delay = 0.0  # the same server and data behind the same address, now at full speed
    try:
        again = cellmi(*args, env=env, timeout=120)
    finally:
        proxy.close()
    assert again.returncode == 0, again.stderr[-3000:]
    total = samples * fields
    assert f"resuming: {len(done)} fields already done, {total - len(done)} to compute" in again.stderr
    reps = load_representations(join(workdir, "representations.zarr"))  # complete, or it would not load
    assert f"wrote {len(reps.table)} windows to {workdir}/representations.zarr" in again.stderr
    keys = list(zip(reps.table["sample"], reps.table["field"], reps.table["y"], reps.table["x"], strict=True))
    assert len(keys) == len(set(keys))
    assert len(set(zip(reps.table["sample"], reps.table["field"], strict=True))) == total
    assert markers() == {}  # the parts folder is cleaned up once the output is complete


# ---------------------------------------------------------------- the out-of-memory guard at the command line
def test_a_batch_that_would_not_fit_is_refused_before_work_starts(tmp_path):
    from cellmi.infer.job import GB, make_plan
    from cellmi.settings import Settings

    workdir = str(tmp_path / "run")
    make_infer_store(join(workdir, STORE_NAME), samples=2, fields=1, size=96)
    write_checkpoint(join(workdir, "checkpoints"))
    big = {"mode": "naive", "batch_windows": 200_000}
    want = make_plan(Settings(workdir=workdir, infer={**big, "memory_limit_gb": 1e6})).task_bytes / GB
    assert want > 4  # the default limit
    start = time.monotonic()
    proc = cellmi("infer", "--workdir", workdir, "--infer.mode", "naive", "--infer.batch_windows", "200000")
    line = assert_one_line_error(proc, "CELLMI_INFER__MEMORY_LIMIT_GB (--infer.memory_limit_gb)",
                                 "above the limit 4")
    got = float(re.search(r"needs about ([\d.e+-]+) GB", line).group(1))
    assert got == pytest.approx(want, rel=5e-3)
    assert time.monotonic() - start < 60
    assert "Dask" not in proc.stderr  # refused before any cluster was started
    assert sorted(os.listdir(workdir)) == ["checkpoints", STORE_NAME]  # no parts, no output

    fits = cellmi("infer", "--workdir", workdir, "--infer.mode", "naive", "--infer.batch_windows", "200000",
                  "--infer.memory_limit_gb", str(int(want) + 1), "--infer.workers", "1")
    assert fits.returncode == 0, fits.stderr[-3000:]
