"""The SLURM scripts under stand-in srun/scontrol/apptainer/sbatch that record and run locally."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from cellmi.errors import INFRA_EXIT, UserError

from .conftest import ROOT, STUBS

SCRIPTS = [*sorted((ROOT / "jobs" / "slurm").iterdir()), ROOT / "docker" / "test-image.sh"]


def _submit(slurm, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *args],
        env={**slurm.env, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)"
)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_shellcheck_clean(script):
    result = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_train_script_starts_one_launcher_per_node(slurm):
    job = _submit(
        slurm,
        "jobs/slurm/train.sbatch",
        "--train.steps",
        "5",
        env={"LAUNCH_FLAGS": "--dry-run --nproc-per-node 1", "ENV_FILE": "jobs/env/default.env"},
    )
    code, out = slurm.wait(job)
    assert code == "0", out
    nodes = sorted(
        (json.loads(line) for line in out.splitlines() if line.startswith("{")),
        key=lambda row: row["topology"]["node_rank"],
    )
    assert [n["topology"]["node_rank"] for n in nodes] == [0, 1]
    port = 20000 + int(job) % 20000
    for node in nodes:
        assert node["topology"] | {"node_rank": 0} == {
            "scheduler": "slurm",
            "nnodes": 2,
            "node_rank": 0,
            "master_addr": "127.0.0.1",
            "master_port": port,
        }
        assert node["torchrun"][-5:] == ["-m", "cellmi", "train", "--train.steps", "5"]
    (srun,) = slurm.calls("srun")
    assert "--ntasks-per-node=1" in srun["args"]
    apptainer = slurm.calls("apptainer")
    assert len(apptainer) == 2
    assert apptainer[0]["args"][:4] == ["exec", "--nv", "--env-file", "jobs/env/default.env"]
    assert apptainer[0]["args"][4:7] == [str(slurm.sif), "cellmi-launch", "--dry-run"]
    assert slurm.calls("scontrol")[0]["args"] == ["show", "hostnames", "127.0.0.[1-2]"]


def test_stage_script_runs_the_job_in_the_image(slurm):
    job = _submit(
        slurm,
        "jobs/slurm/stage.sbatch",
        "config",
        "--train.steps",
        "9",
        env={"ENV_FILE": "jobs/env/bbbc018-local.env"},
    )
    code, out = slurm.wait(job)
    assert code == "0", out
    settings = json.loads(out[out.index("{") :])
    assert settings["train"]["steps"] == 9  # the flag
    assert settings["source"] == "/data/BBBC018"  # the env file, through apptainer --env-file
    assert slurm.calls("apptainer")[0]["args"][-4:] == ["cellmi", "config", "--train.steps", "9"]


def test_pipeline_chains_stages_with_afterok(slurm):
    env = {**slurm.env, "STUB_APPTAINER_ONLY_RECORD": "1", "LAUNCH": "true"}  # no Dask workers here
    out = subprocess.run(
        ["bash", "jobs/slurm/pipeline.sh", "--account=lab"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ids = [int(word) for word in out.split() if word.isdigit()]
    assert len(ids) == 4 and ids == sorted(ids)
    for job in ids:
        assert slurm.wait(str(job), timeout=60)[0] == "0"
    submitted = slurm.calls("sbatch")
    deps = [next((a for a in call["args"] if a.startswith("--dependency=")), None) for call in submitted]
    assert deps == [
        None,
        f"--dependency=afterok:{ids[0]}",
        f"--dependency=afterok:{ids[1]}",
        f"--dependency=afterok:{ids[2]}",
    ]
    assert all(
        "--account=lab" in call["args"] and "--kill-on-invalid-dep=yes" in call["args"] for call in submitted
    )
    scripts = [
        next(a for a in call["args"] if a.endswith((".sbatch", ".sh"))).rsplit("/", 1)[1]
        for call in submitted
    ]
    assert scripts == ["stage.sbatch", "train.sbatch", "infer.sbatch", "stage.sbatch"]


def test_failed_stage_stops_the_chain(slurm):
    env = {
        **slurm.env,
        "STUB_APPTAINER_ONLY_RECORD": "1",
        "STUB_APPTAINER_FAIL": "cellmi-launch",
        "LAUNCH": "true",
    }
    out = subprocess.run(
        ["bash", "jobs/slurm/pipeline.sh"], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    ingest, train, infer, cluster = [w for w in out.split() if w.isdigit()]
    assert slurm.wait(ingest, timeout=60)[0] == "0"
    assert slurm.wait(train, timeout=60)[0] != "0"
    assert slurm.wait(infer, timeout=60)[0] == "DependencyNeverSatisfied"
    assert slurm.wait(cluster, timeout=60)[0] == "DependencyNeverSatisfied"
    assert not [c for c in slurm.calls("apptainer") if "cluster" in c["args"]], (
        "cluster ran after a failed train"
    )


PROBE = (
    "import os; from distributed import Client; "
    "c = Client(os.environ['DASK_SCHEDULER_ADDRESS']); print('sum', c.submit(sum, [20, 22]).result()); "
    "print('workers', len(c.scheduler_info()['workers']))"
)


@pytest.mark.slow
def test_dask_slurm_runs_workers_as_jobs_in_the_image(slurm):
    """SLURMCluster submits worker jobs through sbatch; they start inside the image and serve a client."""
    pytest.importorskip("dask_jobqueue")
    python = f"apptainer exec --env-file {ROOT}/jobs/env/default.env {slurm.sif} {sys.executable}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellmi.launch",
            "dask-slurm",
            "--jobs",
            "1",
            "--cores",
            "1",
            "--memory",
            "1GB",
            "--host",
            "127.0.0.1",
            "--python",
            python,
            "--wait-timeout",
            "120",
            "--",
            sys.executable,
            "-c",
            PROBE,
        ],
        env=slurm.env,
        cwd=slurm.state.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sum 42" in result.stdout and "workers 1" in result.stdout
    (_submitted,) = slurm.calls("sbatch")
    worker_jobs = [c for c in slurm.calls("apptainer") if "distributed.cli.dask_worker" in c["args"]]
    assert worker_jobs and worker_jobs[0]["args"][:2] == ["exec", "--env-file"]
    assert slurm.calls("scancel"), "workers were not cancelled at the end"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("cellmi.infer.job") is None, reason="cellmi.infer.job not written yet"
)
def test_infer_script_wires_dask_slurm_to_cellmi_infer(slurm):
    """infer.sbatch: workers via dask-jobqueue in the image, `cellmi infer` given DASK_SCHEDULER_ADDRESS."""
    env = {
        "LAUNCH": f"{sys.executable} -m cellmi.launch",
        "WORKERS": "1",
        "WORKER_CORES": "1",
        "WORKER_MEMORY": "2GB",
        "WORKER_GPUS": "1",
        "ENV_FILE": "jobs/env/default.env",
        "STUB_APPTAINER_FAIL": "infer",
    }
    job = _submit(slurm, "jobs/slurm/infer.sbatch", env=env)
    _code, out = slurm.wait(job, timeout=300)
    driver = [c for c in slurm.calls("apptainer") if c["args"][-2:] == ["cellmi", "infer"]]
    assert driver, out
    assert driver[0]["env"]["DASK_SCHEDULER_ADDRESS"].startswith("tcp://")
    # WORKER_GPUS: each worker job asks SLURM for a GPU and its worker offers the Dask resource GPU
    worker = [c for c in slurm.calls("apptainer") if "distributed.cli.dask_worker" in c["args"]]
    assert worker and "--resources GPU=1" in " ".join(worker[0]["args"]) and "--nv" in worker[0]["args"]


# ---------------------------------------------------------------- exit status 75: requeue
REQUEUED = {  # script -> (its arguments, what makes its command the one that fails)
    "stage.sbatch": (["ingest"], {"STUB_APPTAINER_FAIL": "ingest"}),
    "train.sbatch": ([], {"STUB_APPTAINER_FAIL": "cellmi-launch"}),
    "infer.sbatch": ([], {"STUB_APPTAINER_FAIL": "infer", "LAUNCH": str(STUBS / "after-dashes")}),
}


def runs(slurm, word: str) -> list[str]:
    """SLURM_RESTART_COUNT of each apptainer call whose command holds ``word`` ("0": the first run)."""
    return [c["env"].get("SLURM_RESTART_COUNT", "0") for c in slurm.calls("apptainer") if word in c["args"]]


@pytest.mark.parametrize("script", sorted(REQUEUED))
def test_an_infrastructure_fault_requeues_the_job_which_then_completes(slurm, script):
    args, fail = REQUEUED[script]
    env = {**fail, "STUB_APPTAINER_FAIL_CODE": str(INFRA_EXIT), "STUB_APPTAINER_FAIL_RUNS": "1",
           "STUB_APPTAINER_ONLY_RECORD": "1"}
    job = _submit(slurm, f"jobs/slurm/{script}", *args, env=env)
    code, out = slurm.wait(job, timeout=60)
    assert code == "0", out
    assert "infrastructure fault (exit status 75): requeueing job" in out
    assert [c["args"] for c in slurm.calls("scontrol") if c["args"][0] == "requeue"] == [["requeue", job]]
    assert sorted(set(runs(slurm, fail["STUB_APPTAINER_FAIL"]))) == ["0", "1"]


@pytest.mark.parametrize(("code", "requeues"), [(UserError.exit_code, 0), (1, 0), (INFRA_EXIT, 1)])
def test_other_failures_and_too_many_requeues_end_the_job(slurm, code, requeues):
    """A user error or a bug is final at once; an infrastructure fault after MAX_REQUEUES requeues."""
    env = {"STUB_APPTAINER_FAIL": "ingest", "STUB_APPTAINER_FAIL_CODE": str(code), "MAX_REQUEUES": "1"}
    job = _submit(slurm, "jobs/slurm/stage.sbatch", "ingest", env=env)
    rc, out = slurm.wait(job, timeout=60)
    assert rc == str(code), out
    assert len([c for c in slurm.calls("scontrol") if c["args"][0] == "requeue"]) == requeues
    assert len(runs(slurm, "ingest")) == requeues + 1
