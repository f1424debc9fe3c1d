"""The launcher's scheduler detection, with each scheduler's real variable names."""

from __future__ import annotations

import json

import pytest

from cellmi.errors import INFRA_EXIT, UserError
from cellmi.launch import Topology, detect, expand_hostlist, main, run_torchrun, torchrun_args


def test_no_scheduler_is_one_standalone_node():
    assert detect({}) == Topology("none", 1, 0, "127.0.0.1", 29500)
    args = torchrun_args(detect({}), 1, "cellmi", ["train"])
    assert args[:2] == ["--standalone", "--nnodes=1"] and args[-3:] == ["-m", "cellmi", "train"]


def test_kubeflow_pytorchjob_uses_torchruns_own_variables():
    env = {
        "PET_NNODES": "4",
        "PET_NODE_RANK": "3",
        "PET_MASTER_ADDR": "job-master-0",
        "PET_MASTER_PORT": "23456",
        "PET_NPROC_PER_NODE": "2",
        "RANK": "3",
        "WORLD_SIZE": "4",
    }
    assert detect(env) == Topology("kubeflow", 4, 3, "job-master-0", 23456)


def test_kubernetes_indexed_job():
    env = {"JOB_COMPLETION_INDEX": "1", "PET_NNODES": "2", "PET_MASTER_ADDR": "cellmi-train-0.cellmi-train"}
    topology = detect(env)
    assert topology == Topology("kubernetes", 2, 1, "cellmi-train-0.cellmi-train", 29500)
    assert torchrun_args(topology, 1, "cellmi", ["train"])[:4] == [
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=cellmi-train-0.cellmi-train",
        "--master-port=29500",
    ]


def test_kubernetes_indexed_job_without_node_count_is_a_user_error():
    with pytest.raises(UserError, match="PET_NNODES is not set"):
        detect({"JOB_COMPLETION_INDEX": "0", "PET_MASTER_ADDR": "a"})


def test_slurm_takes_master_from_the_node_list(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: parse the list ourselves
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu-a[07-09]",
        "SLURM_PROCID": "2",
    }
    assert detect(env) == Topology("slurm", 3, 2, "gpu-a07", 29500)


def test_slurm_step_values_and_master_addr_win():
    env = {
        "SLURM_JOB_ID": "1",
        "SLURM_NNODES": "4",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "n[1-4]",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "31000",
    }
    assert detect(env) == Topology("slurm", 2, 1, "10.0.0.5", 31000)


def test_slurm_with_several_tasks_per_node_is_refused():
    env = {
        "SLURM_JOB_ID": "1",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    with pytest.raises(UserError, match="one launcher per node"):
        detect(env)


def test_slurm_asks_scontrol_when_it_is_there(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "first-host\\nsecond-host\\n"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    env = {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "weird[x]"}
    assert detect(env).master_addr == "first-host"


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node01", ["node01"]),
        ("n[01-03]", ["n01", "n02", "n03"]),
        ("a[1,3-4],b7", ["a1", "a3", "a4", "b7"]),
        ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
        ("gpu[009-011]", ["gpu009", "gpu010", "gpu011"]),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


def test_aws_batch_child_node_gets_the_main_nodes_address():
    env = {
        "AWS_BATCH_JOB_ID": "abc#1",
        "AWS_BATCH_JOB_NUM_NODES": "3",
        "AWS_BATCH_JOB_NODE_INDEX": "1",
        "AWS_BATCH_JOB_MAIN_NODE_INDEX": "0",
        "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS": "10.1.2.3",
    }
    assert detect(env) == Topology("aws-batch", 3, 1, "10.1.2.3", 29500)


def test_aws_batch_main_node_has_no_address_and_hosts_the_store():
    env = {
        "AWS_BATCH_JOB_NUM_NODES": "3",
        "AWS_BATCH_JOB_NODE_INDEX": "2",
        "AWS_BATCH_JOB_MAIN_NODE_INDEX": "2",
    }
    assert detect(env) == Topology("aws-batch", 3, 0, "127.0.0.1", 29500)


def test_aws_batch_child_without_main_address_is_a_user_error():
    env = {
        "AWS_BATCH_JOB_NUM_NODES": "2",
        "AWS_BATCH_JOB_NODE_INDEX": "1",
        "AWS_BATCH_JOB_MAIN_NODE_INDEX": "0",
    }
    with pytest.raises(UserError, match="AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"):
        detect(env)


def test_google_cloud_batch_reads_the_hosts_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.128.0.7\n10.128.0.9\n")
    env = {
        "BATCH_TASK_INDEX": "1",
        "BATCH_TASK_COUNT": "2",
        "BATCH_HOSTS_FILE": str(hosts),
        "BATCH_JOB_ID": "j",
    }
    assert detect(env) == Topology("gcp-batch", 2, 1, "10.128.0.7", 29500)


def test_google_cloud_batch_single_task_needs_no_hosts_file():
    assert detect({"BATCH_TASK_INDEX": "0", "BATCH_TASK_COUNT": "1"}).nnodes == 1


def test_google_cloud_batch_missing_hosts_file_is_a_user_error(tmp_path):
    env = {"BATCH_TASK_INDEX": "0", "BATCH_TASK_COUNT": "2", "BATCH_HOSTS_FILE": str(tmp_path / "nope")}
    with pytest.raises(UserError, match="BATCH_HOSTS_FILE"):
        detect(env)


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_JOB_ID": "1", "SLURM_NNODES": "two", "SLURM_NODEID": "0", "MASTER_ADDR": "a"},
        {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "2", "MASTER_ADDR": "a"},
        {"MASTER_PORT": "70000"},
    ],
)
def test_bad_values_are_user_errors(env):
    with pytest.raises(UserError):
        detect(env)


def test_dry_run_prints_torchrun_arguments(monkeypatch, capsys):
    for name, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["--dry-run", "--nproc-per-node", "2", "train", "--train.steps", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["topology"]["node_rank"] == 1
    assert out["torchrun"] == [
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=127.0.0.1",
        "--master-port=29999",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "-m",
        "cellmi",
        "train",
        "--train.steps",
        "3",
    ]


def test_bad_train_setting_fails_before_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("CELLMI_TRAIN__STEPS", "-1")
    assert main(["--dry-run", "train"]) == 2
    assert "CELLMI_TRAIN__STEPS" in capsys.readouterr().err


def test_cellmi_cli_dispatches_launch(capsys):
    from cellmi.cli import main as cellmi_main

    assert cellmi_main(["launch", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["scheduler"] == "none"


@pytest.mark.parametrize(("worker", "launcher"), [(INFRA_EXIT, INFRA_EXIT), (UserError.exit_code, 2), (3, 1)])
def test_a_workers_exit_status_reaches_the_scheduler(worker, launcher, monkeypatch):
    """torchrun itself says 1 for any failed worker; the launcher passes on 2 and 75, which schedulers act on."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = torchrun_args(detect({}), 1, "tests.launch.exit_with", ["train", str(worker)])
    assert run_torchrun(args) == launcher
