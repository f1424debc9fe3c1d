"""Two launcher processes on loopback, each with one node's scheduler environment, rendezvous for real.

The probe runs gloo all-reduce under torchrun; the training test runs ``cellmi train`` for a few steps
on two "nodes" once the train job exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROBE = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "node": int(os.environ["GROUP_RANK"]),
       "sum": total.item(), "args": sys.argv[1:]}
with open(os.path.join(sys.argv[-1], f"rank{dist.get_rank()}.json"), "w") as handle:
    json.dump(out, handle)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(extra_path: str | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CELLMI_", "SLURM_", "AWS_BATCH_", "PET_"))
    }
    env.update(OMP_NUM_THREADS="1", PATH="/usr/bin:/bin:" + os.path.dirname(sys.executable))
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_nodes(
    node_envs: list[dict[str, str]], args: list[str], timeout: float
) -> list[subprocess.CompletedProcess]:
    """Start one launcher per node at once and wait for all of them."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cellmi.launch", *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for env in node_envs
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def slurm_env(node: int, port: int) -> dict[str, str]:
    # 127.0.0.1 and 127.0.0.2 are both loopback; the launcher takes the first as the master.
    return {
        "SLURM_JOB_ID": "91",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
        "MASTER_PORT": str(port),
    }


def aws_batch_env(node: int, port: int) -> dict[str, str]:
    env = {
        "AWS_BATCH_JOB_ID": "job#1",
        "AWS_BATCH_JOB_NUM_NODES": "2",
        "AWS_BATCH_JOB_NODE_INDEX": str(node),
        "AWS_BATCH_JOB_MAIN_NODE_INDEX": "0",
        "MASTER_PORT": str(port),
    }
    if node != 0:  # the main node itself does not get this variable
        env["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] = "127.0.0.1"
    return env


@pytest.mark.parametrize("scheduler_env", [slurm_env, aws_batch_env])
def test_two_nodes_rendezvous_on_loopback(tmp_path, scheduler_env):
    (tmp_path / "rdzv_probe.py").write_text(textwrap.dedent(PROBE))
    out = tmp_path / "out"
    out.mkdir()
    port = _free_port()
    envs = [{**_base_env(str(tmp_path)), **scheduler_env(node, port)} for node in (0, 1)]
    results = _run_nodes(envs, ["--nproc-per-node", "1", "--module", "rdzv_probe", "train", str(out)], 180)
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["node"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in ranks)
    assert ranks[0]["args"] == ["train", str(out)]


def test_worker_user_error_is_the_launchers_exit_status(tmp_path):
    (tmp_path / "fails.py").write_text("raise SystemExit(2)\n")
    results = _run_nodes(
        [_base_env(str(tmp_path))], ["--nproc-per-node", "1", "--module", "fails", "train"], 120
    )
    assert results[0].returncode == 2, results[0].stdout[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("cellmi.train.job") is None, reason="cellmi.train.job not written yet"
)
def test_two_slurm_nodes_train_a_few_steps(tmp_path):
    work = tmp_path / "work"
    tiny = {
        "CELLMI_WORKDIR": str(work),
        "CELLMI_SYNTH__SAMPLES": "6",
        "CELLMI_SYNTH__FIELDS": "2",
        "CELLMI_SYNTH__SIZE": "192",
        "CELLMI_INGEST__N_TEST": "2",
        "CELLMI_MODEL__CROP": "64",
        "CELLMI_MODEL__WIDTH": "8",
        "CELLMI_MODEL__LOCAL_DIM": "16",
        "CELLMI_MODEL__GLOBAL_DIM": "8",
        "CELLMI_MODEL__CRITIC_DIM": "16",
        "CELLMI_TRAIN__STEPS": "4",
        "CELLMI_TRAIN__BATCH_SAMPLES": "2",
        "CELLMI_TRAIN__FIELDS_PER_SAMPLE": "2",
        "CELLMI_TRAIN__CHECKPOINT_EVERY": "2",
        "CELLMI_TRAIN__THREADS": "1",
        "CELLMI_TRAIN__DIST_TIMEOUT_S": "120",
    }
    env = {**_base_env(), **tiny}
    ingest = subprocess.run(
        [sys.executable, "-m", "cellmi", "ingest"], env=env, capture_output=True, text=True, timeout=300
    )
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    port = _free_port()
    results = _run_nodes([{**env, **slurm_env(node, port)} for node in (0, 1)], ["train"], 540)
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
    assert any(Path(work, "checkpoints").iterdir()), "no checkpoint written"
