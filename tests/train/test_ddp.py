"""Two processes under real torchrun with gloo: exact gradients with gathered negatives, identical
parameters on both ranks, the loss goes down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from cellmi.store import STORE_NAME

from .test_train import job_env, metrics

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def test_two_gloo_processes_stay_identical_and_learn(store_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(store_dir, STORE_NAME), os.path.join(workdir, STORE_NAME))
    env = job_env(workdir, steps=40, log_every=2, checkpoint_every=20)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        WORKER,
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [40, 40]
    assert reports[0]["numel"] > 1000 and all(r["max_diff"] == 0.0 for r in reports)
    # gathered negatives: the DDP gradient is the gradient of the mean of the ranks' losses
    assert all(r["grad_error"] < 1e-4 for r in reports), reports
    local = [r["local"] for r in metrics(workdir)]
    assert len(local) == 20
    assert sum(local[-5:]) / 5 < sum(local[:5]) / 5 - 0.5, local
