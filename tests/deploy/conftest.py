"""Fixtures for the deployment tests: the repository root and the SLURM/Apptainer stand-ins."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).resolve().parent / "stubs"


def kustomize(overlay: str) -> str:
    """The manifests of ``k8s/overlays/{overlay}`` as kubectl's kustomize renders them."""
    args = ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


class Slurm:
    """A fake cluster: stub commands first on PATH, their calls and job files in ``state``."""

    def __init__(self, state: Path, sif: Path):
        self.state, self.sif = state, sif
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLMI_", "SLURM_", "MASTER_"))}
        self.env.update(
            PATH=f"{STUBS}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
            STUB_DIR=str(state),
            SIF=str(sif),
            OMP_NUM_THREADS="1",
        )

    def calls(self, cmd: str | None = None) -> list[dict]:
        path = self.state / "calls.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [row for row in rows if cmd is None or row["cmd"] == cmd]

    def wait(self, job_id: str, timeout: float = 300) -> tuple[str, str]:
        """(exit status, output) of a stub job once it has finished."""
        rc = self.state / "jobs" / f"{job_id}.rc"
        deadline = time.monotonic() + timeout
        while not rc.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"stub job {job_id} still running after {timeout} s")
            time.sleep(0.2)
        out = self.state / "jobs" / f"{job_id}.out"
        return rc.read_text().strip(), out.read_text() if out.exists() else ""

    def cancel_all(self) -> None:
        import signal

        for pid_file in (self.state / "jobs").glob("*.pid") if (self.state / "jobs").exists() else []:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture
def slurm(tmp_path):
    sif = tmp_path / "cellmi.sif"
    sif.write_bytes(b"")  # the apptainer stand-in only checks that the image exists
    cluster = Slurm(tmp_path / "stub-state", sif)
    yield cluster
    cluster.cancel_all()
