"""Every CELLMI_* name in k8s/, jobs/ and docker/ is a real setting, and the values there load."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from cellmi.cli import load_settings
from cellmi.settings import env_names

from .conftest import ROOT, kustomize

NAME = re.compile(r"\bCELLMI_[A-Z0-9_]*[A-Z0-9]")
FOLDERS = ("k8s", "jobs", "docker")


def unknown_names(text: str) -> set[str]:
    return set(NAME.findall(text)) - env_names()


def deploy_files() -> list:
    return [p for folder in FOLDERS for p in (ROOT / folder).rglob("*") if p.is_file()]


def test_the_check_catches_a_typo():
    assert unknown_names("env:\n  - name: CELLMI_TRAIN__STEPZ\n    value: 3\n") == {"CELLMI_TRAIN__STEPZ"}
    assert unknown_names("CELLMI_TRAIN_STEPS=3") == {"CELLMI_TRAIN_STEPS"}  # one underscore: no section
    assert unknown_names("CELLMI_TRAIN__STEPS=3 and CELLMI_WORKDIR") == set()


def test_every_cellmi_name_is_a_setting():
    files = deploy_files()
    assert len(files) > 20
    found = set()
    for path in files:
        text = path.read_text(errors="replace")
        found |= set(NAME.findall(text))
        assert not unknown_names(text), f"{path.relative_to(ROOT)}: {sorted(unknown_names(text))}"
    assert {"CELLMI_WORKDIR", "CELLMI_SOURCE", "CELLMI_TRAIN__STEPS"} <= found


def _load(monkeypatch, env: dict[str, str], where: str) -> None:
    """The settings these variables give must validate, as they would at the start of a job."""
    for key, value in env.items():
        if key.startswith("CELLMI_"):
            monkeypatch.setenv(key, value)
    try:
        load_settings([])
    except Exception as err:  # pydantic's ValidationError or UserError: name the file
        raise AssertionError(f"{where}: {err}") from err
    for key in env:
        monkeypatch.delenv(key, raising=False)


def env_file(path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, eq, value = line.partition("=")
            assert eq and key == key.strip() and value == value.strip(), (
                f"{path.name}: {line!r} is not KEY=VALUE"
            )
            assert not value.startswith(("'", '"')), f"{path.name}: docker --env-file keeps quotes"
            pairs[key] = value
    return pairs


@pytest.mark.parametrize("name", ["default.env", "bbbc018-local.env", "s3.env"])
def test_env_files_load(monkeypatch, name):
    env = env_file(ROOT / "jobs" / "env" / name)
    assert "CELLMI_WORKDIR" in env
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), "credentials in an env file"
    _load(monkeypatch, env, name)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_configmap_values_load(monkeypatch, overlay):
    out = kustomize(overlay)
    (config,) = [d for d in yaml.safe_load_all(out) if d["kind"] == "ConfigMap"]
    _load(monkeypatch, config["data"], f"ConfigMap in overlay {overlay}")


def test_batch_definitions_load(monkeypatch):
    for path in sorted((ROOT / "jobs" / "aws-batch").glob("*.json")):
        data = json.loads(path.read_text())
        containers = [r["container"] for r in data.get("nodeProperties", {}).get("nodeRangeProperties", [])]
        containers += [data["containerProperties"]] if "containerProperties" in data else []
        for container in containers:
            _load(monkeypatch, {e["name"]: e["value"] for e in container["environment"]}, path.name)
    for path in sorted((ROOT / "jobs" / "gcp-batch").glob("*.json")):
        for group in json.loads(path.read_text())["taskGroups"]:
            _load(monkeypatch, group["taskSpec"]["environment"]["variables"], path.name)
