"""AWS Batch job definitions, the EventBridge Scheduler schedule and Google Cloud Batch jobs."""

from __future__ import annotations

import fnmatch
import json

import pytest

from cellmi.cli import JOBS
from cellmi.errors import InfrastructureError, UserError
from cellmi.launch import detect

from .conftest import ROOT

AWS = ROOT / "jobs" / "aws-batch"
GCP = ROOT / "jobs" / "gcp-batch"


def aws(name: str) -> dict:
    return json.loads((AWS / name).read_text())


def containers(jobdef: dict) -> list[dict]:
    if jobdef["type"] == "multinode":
        return [r["container"] for r in jobdef["nodeProperties"]["nodeRangeProperties"]]
    return [jobdef["containerProperties"]]


def check_command(command: list[str]) -> None:
    """The image's entrypoint is cellmi; Batch can only give it arguments."""
    assert command[0] in JOBS, command
    if command[0] == "launch":
        assert command[1] == "train"


def aws_action(rules: list[dict], code: int, reason: str = "", status_reason: str = "") -> str:
    """What AWS Batch does after an attempt: the first evaluateOnExit rule whose every pattern
    matches (glob; absent matches anything), else RETRY (AWS's default)."""
    seen = {"onExitCode": str(code), "onReason": reason, "onStatusReason": status_reason}
    for rule in rules:
        if all(fnmatch.fnmatchcase(seen[k], v) for k, v in rule.items() if k != "action"):
            return rule["action"]
    return "RETRY"


@pytest.mark.parametrize("name", ["train.json", "ingest.json", "infer.json", "cluster.json", "pipeline.json"])
def test_aws_job_definitions(name):
    jobdef = aws(name)
    assert jobdef["jobDefinitionName"] == f"cellmi-{name.removesuffix('.json')}"
    exits = jobdef["retryStrategy"]["evaluateOnExit"]
    assert exits[0] == {"onExitCode": str(UserError.exit_code), "action": "EXIT"}, (
        "user errors must not retry"
    )
    assert aws_action(exits, UserError.exit_code, "Essential container in task exited") == "EXIT"
    assert aws_action(exits, InfrastructureError.exit_code, "Essential container in task exited") == "RETRY"
    assert {"onExitCode": str(InfrastructureError.exit_code), "action": "RETRY"} in exits  # said, not by default
    assert jobdef["retryStrategy"]["attempts"] >= 2
    for container in containers(jobdef):
        check_command(container["command"])
        assert container["image"].rsplit(":", 1)[0].endswith("/cellmi")
        assert container["readonlyRootFilesystem"] is True and container["privileged"] is False
        assert container["user"] != "0"
        assert any(t["containerPath"] == "/tmp" for t in container["linuxParameters"]["tmpfs"])
        names = {e["name"] for e in container["environment"]}
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "S3 access is the job role's"
        assert container["jobRoleArn"].startswith("arn:aws:iam::")
        kinds = {r["type"] for r in container["resourceRequirements"]}
        assert {"VCPU", "MEMORY"} <= kinds


def test_aws_training_is_multinode_with_the_launcher():
    jobdef = aws("train.json")
    nodes = jobdef["nodeProperties"]
    assert jobdef["type"] == "multinode" and nodes["numNodes"] >= 2 and nodes["mainNode"] == 0
    assert [r["targetNodes"] for r in nodes["nodeRangeProperties"]] == ["0:"]  # every node the same
    (container,) = containers(jobdef)
    assert container["command"] == ["launch", "train"]
    port = {e["name"]: e["value"] for e in container["environment"]}["MASTER_PORT"]
    # What Batch sets on a child node, plus this definition's environment, gives a topology.
    env = {
        "AWS_BATCH_JOB_NUM_NODES": str(nodes["numNodes"]),
        "AWS_BATCH_JOB_NODE_INDEX": "1",
        "AWS_BATCH_JOB_MAIN_NODE_INDEX": str(nodes["mainNode"]),
        "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS": "10.0.0.9",
        "MASTER_PORT": port,
    }
    assert detect(env).master_port == int(port) and detect(env).nnodes == nodes["numNodes"]


def test_eventbridge_schedule_submits_the_pipeline_job():
    schedule = aws("schedule.json")
    assert schedule["Target"]["Arn"] == "arn:aws:scheduler:::aws-sdk:batch:submitJob"
    expression = schedule["ScheduleExpression"]
    assert expression.startswith("cron(") and len(expression[5:-1].split()) == 6
    request = json.loads(schedule["Target"]["Input"])
    assert set(request) >= {"JobName", "JobQueue", "JobDefinition"}
    names = {aws(p.name)["jobDefinitionName"] for p in AWS.glob("*.json") if p.name != "schedule.json"}
    assert request["JobDefinition"] in names
    assert schedule["FlexibleTimeWindow"]["Mode"] in ("OFF", "FLEXIBLE")
    assert schedule["Target"]["RoleArn"].startswith("arn:aws:iam::")


@pytest.mark.parametrize("name", ["train.json", "pipeline.json"])
def test_google_cloud_batch_jobs(name):
    job = json.loads((GCP / name).read_text())
    (group,) = job["taskGroups"]
    (runnable,) = group["taskSpec"]["runnables"]
    check_command(runnable["container"]["commands"])
    assert "entrypoint" not in runnable["container"], "the image's entrypoint (cellmi) is used"
    options = runnable["container"]["options"]
    assert "--read-only" in options and "--cap-drop=ALL" in options and "--user 10001" in options
    policies = group["taskSpec"]["lifecyclePolicies"]
    assert policies[0] == {"action": "FAIL_TASK", "actionCondition": {"exitCodes": [UserError.exit_code]}}
    retry = [p["action"] for p in policies if InfrastructureError.exit_code in p["actionCondition"]["exitCodes"]]
    assert retry[:1] == ["RETRY_TASK"] and group["taskSpec"]["maxRetryCount"] >= 1
    secrets = group["taskSpec"]["environment"].get("secretVariables", {})
    assert all(v.startswith("projects/") and "/secrets/" in v for v in secrets.values())
    assert not {"AWS_SECRET_ACCESS_KEY"} & set(group["taskSpec"]["environment"]["variables"])
    if group["taskCount"] > 1:
        assert group["requireHostsFile"] is True and group["taskCountPerNode"] == 1
        assert runnable["container"]["commands"] == ["launch", "train"]
