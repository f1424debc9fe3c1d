"""``cellmi run`` end to end as a user runs it: ``python -m cellmi run --quick`` in a real process.

One quick run (a module fixture) is copied for each test that re-runs it, so every test starts
from the same finished run folder. Copies keep file times, which is how "reused" is checked:
a reused stage leaves every byte and every modification time of its output as it was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cellmi.data.readers import write_dib
from cellmi.pipeline import STAGES, apply_quick, stage_digests
from cellmi.settings import Settings
from tests.clirun import assert_one_line_error, cellmi

pytestmark = pytest.mark.timeout(300)

OUTPUTS = {"ingest": "store.zarr", "train": "checkpoints", "infer": "representations.zarr", "cluster": "analysis"}
RUN_TIMEOUT = 240


@dataclass
class Run:
    workdir: Path
    stdout: str
    stderr: str
    seconds: float


def quick(workdir: Path | str, *flags: str, env: dict[str, str] | None = None):
    """``cellmi run --quick FLAGS`` with CELLMI_WORKDIR=workdir."""
    return cellmi("run", "--quick", *flags, env={"CELLMI_WORKDIR": str(workdir), **(env or {})},
                  timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Run:
    workdir = tmp_path_factory.mktemp("quick") / "run"
    start = time.monotonic()
    proc = quick(workdir)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\n`cellmi run --quick` took {seconds:.1f} s (wall clock, including start-up)")
    return Run(workdir, proc.stdout, proc.stderr, seconds)


def copy_of(run: Run, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run.workdir, target)  # copy2: file times are kept
    return target


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: (size, mtime in ns, sha256)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            out[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns,
                                                  hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def under(snap: dict, prefix: str) -> dict:
    return {k: v for k, v in snap.items() if k == prefix or k.startswith(prefix + "/")}


def ran(stderr: str) -> list[str]:
    """The stages the log says were run (``== name ==`` alone on its line)."""
    return re.findall(r"INFO == (\w+) ==$", stderr, flags=re.M)


def reused(stderr: str, workdir: str) -> list[str]:
    """The stages the log says were reused, each naming its output in ``workdir``."""
    return [name for name, output in OUTPUTS.items()
            if f"INFO == {name} == unchanged, reusing {workdir}/{output}" in stderr]


def headline(stdout: str) -> list[str]:
    return stdout.strip().splitlines()


# ---------------------------------------------------------------- the first run
def test_a_quick_run_writes_the_report_and_ends_with_its_path_and_the_scores(quick_run):
    workdir = quick_run.workdir
    report = workdir / "analysis" / "report.html"
    assert report.is_file() and "<html" in report.read_text()[:500].lower()
    metrics = json.loads((workdir / "analysis" / "metrics.json").read_text())
    assert {"dim", "random", "handcrafted"} <= set(metrics)

    lines = headline(quick_run.stdout)  # stdout holds only the headline: the report, then one line per encoder
    assert lines[0] == f"report: {report}"
    assert [line.split()[0] for line in lines[1:]] == ["dim", "random", "handcrafted"]
    window_ari = metrics["dim"]["test"]["window_ari"]
    assert f"test window_ari={window_ari:.3f}" in lines[1]
    assert all("image_ari=" in line for line in lines[1:])

    assert ran(quick_run.stderr) == [stage.name for stage in STAGES]
    assert re.search(r"done \(ingest \d+s, train \d+s, infer \d+s, cluster \d+s\)", quick_run.stderr)
    assert "Traceback" not in quick_run.stderr
    print(f"`cellmi run --quick`: {quick_run.seconds:.1f} s")


def test_every_stage_records_its_settings_in_the_run_folder(quick_run):
    workdir = quick_run.workdir
    record = json.loads((workdir / "run.json").read_text())
    settings = apply_quick(Settings(workdir=str(workdir), quick=True))
    assert list(record["stages"]) == ["ingest", "train", "infer", "cluster"]
    assert {k: v["digest"] for k, v in record["stages"].items()} == stage_digests(settings)
    stages = record["stages"]
    assert stages["ingest"]["settings"]["source"] is None and stages["ingest"]["settings"]["synth"]["samples"] == 6
    assert stages["train"]["settings"]["train"]["steps"] == 40 and stages["train"]["settings"]["model"]["crop"] == 64
    assert stages["infer"]["settings"]["infer"]["mode"] == "shared"
    assert stages["cluster"]["settings"]["cluster"]["neighbors"] == 8
    assert all(v["seconds"] > 0 and v["finished"] for v in stages.values())

    saved = json.loads((workdir / "settings.json").read_text())  # the whole effective settings tree
    assert saved["workdir"] == str(workdir) and saved["quick"] is True
    assert saved["train"]["steps"] == 40 and saved["synth"]["size"] == 192 and saved["cluster"]["gallery"] == 4


# ---------------------------------------------------------------- re-runs
def test_the_same_command_again_reuses_every_stage(quick_run, tmp_path):
    workdir = copy_of(quick_run, tmp_path)
    before = snapshot(workdir)
    proc = quick(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reused(proc.stderr, str(workdir)) == list(OUTPUTS) and ran(proc.stderr) == []
    after = snapshot(workdir)
    before.pop("settings.json"), after.pop("settings.json")  # rewritten by every run (it names the workdir)
    assert after == before  # checkpoints, representations, report: not a byte or a file time changed
    assert headline(proc.stdout)[0] == f"report: {workdir}/analysis/report.html"
    assert headline(proc.stdout)[1:] == headline(quick_run.stdout)[1:]


def test_a_cluster_setting_redoes_only_the_cluster_stage(quick_run, tmp_path):
    workdir = copy_of(quick_run, tmp_path)
    before = snapshot(workdir)
    record = json.loads((workdir / "run.json").read_text())
    proc = quick(workdir, "--cluster.umap_dim", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reused(proc.stderr, str(workdir)) == ["ingest", "train", "infer"] and ran(proc.stderr) == ["cluster"]
    after = snapshot(workdir)
    for output in ("store.zarr", "checkpoints", "representations.zarr", "representations.parquet"):
        assert under(after, output) == under(before, output), output
    assert after["analysis/report.html"][1] != before["analysis/report.html"][1]
    new = json.loads((workdir / "run.json").read_text())
    assert new["stages"]["cluster"]["settings"]["cluster"]["umap_dim"] == 4
    for stage in ("ingest", "train", "infer"):
        assert new["stages"][stage] == record["stages"][stage]


def test_a_train_setting_redoes_train_and_the_stages_after_it(quick_run, tmp_path):
    """An explicit flag wins over --quick's table, and only the stages it feeds are redone."""
    workdir = copy_of(quick_run, tmp_path)
    before = snapshot(workdir)
    proc = quick(workdir, "--train.steps", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reused(proc.stderr, str(workdir)) == ["ingest"] and ran(proc.stderr) == ["train", "infer", "cluster"]
    assert "stopped at step 12 (steps)" in proc.stderr
    after = snapshot(workdir)
    assert under(after, "store.zarr") == under(before, "store.zarr")
    assert [k for k in under(after, "checkpoints") if k.endswith(".pt")] == ["checkpoints/step_000012.pt"]
    record = json.loads((workdir / "run.json").read_text())
    assert record["stages"]["train"]["settings"]["train"]["steps"] == 12


def test_force_redoes_every_stage_even_for_another_run(quick_run, tmp_path):
    """--force in a folder of another run (here another synthetic draw) redoes every stage."""
    workdir = copy_of(quick_run, tmp_path)
    before = snapshot(workdir)
    proc = quick(workdir, "--synth.seed", "1", "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ran(proc.stderr) == list(OUTPUTS) and reused(proc.stderr, str(workdir)) == []
    after = snapshot(workdir)
    for name in ("store.zarr/zarr.json", "checkpoints/step_000040.pt", "representations.zarr/zarr.json",
                 "representations.parquet", "analysis/report.html", "run.json"):
        assert after[name][1] != before[name][1], name
    assert sorted(after) == sorted(before)  # a run of the same shape: the same files
    record = json.loads((workdir / "run.json").read_text())
    assert record["stages"]["ingest"]["settings"]["synth"]["seed"] == 1


# ---------------------------------------------------------------- a folder of another run
def raw_folder(path: Path) -> Path:
    """Three samples of BBBC018-style .DIB files."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sample in range(1, 4):
        for channel in ("DNA", "pH3", "actin"):
            (path / f"{sample:04d}1-{channel}.DIB").write_bytes(write_dib(rng.poisson(100, (64, 64)).astype(np.uint16)))
    return path


def test_a_folder_holding_another_run_is_refused_untouched_unless_forced(quick_run, tmp_path):
    workdir = copy_of(quick_run, tmp_path)
    before = snapshot(workdir)
    raw = raw_folder(tmp_path / "raw")
    for flags in (("--synth.seed", "1"), ("--source", str(raw)), ("--synth.samples", "4")):
        proc = quick(workdir, *flags)
        assert_one_line_error(proc, f"cellmi run: error: {workdir}: holds a different run", "--force")
        assert proc.stdout == ""
        assert snapshot(workdir) == before, flags  # nothing in it changed, not even run.json or settings.json

    (workdir / "run.json").unlink()  # a store that no `cellmi run` recorded
    proc = quick(workdir)
    assert_one_line_error(proc, f"{workdir}: holds a store that no `cellmi run` recorded; pass --force")
    # that --force then redoes every stage: test_force_redoes_every_stage_even_for_another_run


# ---------------------------------------------------------------- on S3
def objects(s3, workdir: str) -> dict[str, tuple]:
    bucket, prefix = workdir.removeprefix("s3://").split("/", 1)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"].removeprefix(prefix + "/"): (o["ETag"], o["LastModified"])
            for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_a_quick_run_on_s3_writes_every_output_there(s3_quick_run):
    workdir, s3, proc = s3_quick_run.workdir, s3_quick_run.s3, s3_quick_run.proc
    assert headline(proc.stdout)[0] == f"report: {workdir}/analysis/report.html"
    assert [line.split()[0] for line in headline(proc.stdout)[1:]] == ["dim", "random", "handcrafted"]
    assert ran(proc.stderr) == list(OUTPUTS)
    found = objects(s3, workdir)
    for key in ("run.json", "settings.json", "analysis/report.html", "analysis/metrics.json",
                "checkpoints/step_000040.pt", "checkpoints/step_000040.json", "representations.parquet",
                "representations.zarr/zarr.json", "store.zarr/zarr.json"):
        assert key in found, key
    bucket, prefix = workdir.removeprefix("s3://").split("/", 1)
    record = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/run.json")["Body"].read())
    assert list(record["stages"]) == list(OUTPUTS)


@pytest.mark.slow
def test_the_same_run_on_s3_again_reuses_every_stage(s3_quick_run):
    workdir, env, s3 = s3_quick_run.workdir, s3_quick_run.env, s3_quick_run.s3
    before = objects(s3, workdir)
    again = quick(workdir, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert reused(again.stderr, workdir) == list(OUTPUTS) and ran(again.stderr) == []
    after = objects(s3, workdir)
    before.pop("settings.json"), after.pop("settings.json")  # rewritten by every run
    assert after == before  # no object rewritten
