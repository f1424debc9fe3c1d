import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from cellmi.cli import describe_validation, load_settings, main
from cellmi.errors import UserError
from cellmi.settings import Settings, check_env, env_names


def cellmi(*args, env=None):
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CELLMI_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "cellmi", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_env_and_flags_fill_the_same_fields(monkeypatch):
    monkeypatch.setenv("CELLMI_TRAIN__STEPS", "7")
    monkeypatch.setenv("CELLMI_INGEST__TEST_SAMPLES", "0001, 0002")
    monkeypatch.setenv("CELLMI_WORKDIR", "s3://bucket/run")
    s = load_settings(["--cluster.split", "all"])
    assert s.train.steps == 7 and s.ingest.test_samples == ["0001", "0002"]
    assert s.workdir == "s3://bucket/run" and s.cluster.split == "all"
    assert load_settings(["--train.steps", "9"]).train.steps == 9  # flag beats env
    monkeypatch.setenv("CELLMI_INFER__VIEWS", "4")  # a number from a variable arrives as text
    assert load_settings([]).infer.views == 4 and load_settings(["--infer.views", "8"]).infer.views == 8


def test_model_size_presets_fill_the_widths_that_are_not_given(monkeypatch):
    base = load_settings([]).model
    assert (base.size, base.width, base.local_dim, base.critic_dim) == ("base", 16, 128, 256)
    large = load_settings(["--model.size", "large"]).model
    assert (large.width, large.local_dim, large.critic_dim, large.global_dim) == (32, 256, 512, 64)
    monkeypatch.setenv("CELLMI_MODEL__SIZE", "xl")
    monkeypatch.setenv("CELLMI_MODEL__WIDTH", "24")
    xl = load_settings([]).model
    assert (xl.width, xl.local_dim, xl.critic_dim) == (24, 512, 1024)  # an explicit width wins
    with pytest.raises(ValidationError, match="'base', 'large' or 'xl'"):
        load_settings(["--model.size", "huge"])


def test_every_field_is_documented_and_defaulted():
    for name in env_names():
        assert name.startswith("CELLMI_")
    sections = [Settings, *(Settings.model_fields[s].annotation for s in
                            ("synth", "ingest", "model", "train", "infer", "cluster"))]
    for cls in sections:
        for field, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{field} has no description"
    Settings()  # every default validates


def test_unknown_variable_is_an_error_naming_it():
    with pytest.raises(UserError, match="CELLMI_TRAIN__EPOHCS: unknown setting"):
        check_env({"CELLMI_TRAIN__EPOHCS": "3", "CELLMI_TRAIN__STEPS": "3", "OTHER": "x"})
    check_env({"CELLMI_TRAIN__STEPS": "3", "CELLMI_WORKDIR": "/tmp/x"})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CELLMI_TRAIN__STEPS": "-5"}, "CELLMI_TRAIN__STEPS (--train.steps): Input should be greater than"),
        ({"CELLMI_INGEST__CHANNELS": "DNA,DNA"}, "CELLMI_INGEST__CHANNELS (--ingest.channels): repeated channel"),
        ({"CELLMI_WORKDIR": "http://host/x"}, "CELLMI_WORKDIR (--workdir): 'http://host/x' is neither"),
        ({"CELLMI_SOURCE": "s3://Bad_Bucket/x"}, "CELLMI_SOURCE (--source): "),
        ({"CELLMI_INGEST__PATTERN": "(?P<sample>x)"}, "needs named groups field, channel and sample or well"),
        ({"CELLMI_TRAIN__ESTIMATOR": "mine"}, "CELLMI_TRAIN__ESTIMATOR (--train.estimator): Input should be"),
        ({"CELLMI_INFER__VIEWS": "3"}, "CELLMI_INFER__VIEWS (--infer.views): must be 1, 2, 4 or 8, got 3"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as err:
        load_settings([])
    assert expected in describe_validation(err.value)


def test_cli_bad_value_exit_2_one_line_no_traceback():
    proc = cellmi("config", env={"CELLMI_TRAIN__STEPS": "-1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "CELLMI_TRAIN__STEPS" in proc.stderr and "Traceback" not in proc.stderr
    typo = cellmi("config", env={"CELLMI_TRAIN__EPOHCS": "3"})
    assert typo.returncode == 2 and "CELLMI_TRAIN__EPOHCS: unknown setting" in typo.stderr


def test_config_prints_nested_json_with_field_names():
    proc = cellmi("config", "--train.steps", "11", env={"CELLMI_CLUSTER__SPLIT": "all"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["train"]["steps"] == 11 and data["cluster"]["split"] == "all"
    assert set(data) >= {"workdir", "source", "synth", "ingest", "model", "train", "infer", "cluster"}


def test_config_redacts_credentials_in_urls(monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-for-test")
    assert main(["config", "--infer.scheduler_address", "tls://user:hunter2@sched:8786"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "fake-secret-for-test" not in out and "***@sched" in out


def test_help_lists_flags_and_jobs():
    proc = cellmi("train", "--help")
    assert proc.returncode == 0 and "--train.steps" in proc.stdout and "--ingest.preset" in proc.stdout
    top = cellmi("--help")
    for job in ("synth", "ingest", "train", "infer", "cluster", "run", "config"):
        assert job in top.stdout
    assert cellmi("nonsense").returncode == 2


def test_settings_reference_is_current():
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ns = runpy.run_path(str(root / "scripts" / "settings_reference.py"))
    text = (root / "docs" / "settings.md").read_text()
    assert ns["refreshed"](text) == text, "run: python scripts/settings_reference.py --write"
