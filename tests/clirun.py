"""Run ``python -m cellmi`` as a real process and check what a user sees (shared by the CLI-level tests)."""

from __future__ import annotations

import os
import subprocess
import sys

ENV_DROP = ("CELLMI_", "AWS_", "DASK_")

# Fake credentials for the moto server (it takes any), distinctive so that the security tests can search
# every output for them.
AWS_KEY_ID = "AKIAQXZSECRETKEYID77"
AWS_SECRET = "sEcReT-aws-key-Zq9vX2wY8tU1"
AWS = {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without cellmi, AWS or Dask settings, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(ENV_DROP)}
    full["OMP_NUM_THREADS"] = "1"
    full.update(env or {})
    return full


def cellmi(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: str | None = None):
    """``python -m cellmi ARGS`` with a clean environment; the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "cellmi", *args], capture_output=True, text=True,
                          env=clean_env(env), timeout=timeout, cwd=cwd)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def assert_one_line_error(proc, *fragments: str, code: int = 2) -> str:
    """Exit status ``code``, exactly one ``cellmi <job>: error:`` line holding every fragment, no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


class CodePayload:
    """Runs code when a full unpickler loads it: creates the marker file (for "refused, code not run")."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
