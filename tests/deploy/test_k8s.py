"""Kubernetes manifests: rendered with kustomize, validated strictly, checked for shape and policy.

Built-in kinds go through kubernetes-validate (strict: unknown fields fail). Custom resources
(DaskJob, Argo CronWorkflow) have their embedded pod specs validated as Pods and their own fields
checked against the fields of their CRDs.
"""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from cellmi.cli import JOBS
from cellmi.errors import InfrastructureError, UserError

from .conftest import ROOT, kustomize

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
OVERLAYS = ("cpu", "gpu")
IMAGE = {"cpu": "registry.example.com/cellmi:0.1.0-cpu", "gpu": "registry.example.com/cellmi:0.1.0-cu126"}
STAGES = {"common", "ingest", "train", "infer", "infer-plain", "cluster", "schedule"}


def render(overlay: str) -> list[dict]:
    out = kustomize(overlay)
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


# ---------------------------------------------------------------- every pod spec, whatever holds it
def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the resource makes; Argo templates become one-container pods."""
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind in ("Job", "Deployment"):
        return [(kind, spec["template"]["spec"])]
    if kind == "CronJob":
        return [(kind, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "DaskJob":
        cluster = spec["cluster"]["spec"]
        return [
            ("job", spec["job"]["spec"]),
            ("worker", cluster["worker"]["spec"]),
            ("scheduler", cluster["scheduler"]["spec"]),
        ]
    if kind == "CronWorkflow":
        wf = spec["workflowSpec"]
        pods = []
        for template in wf["templates"]:
            if "container" in template:
                pod = {
                    "containers": [{"name": "main", **template["container"]}],
                    "restartPolicy": "Never",
                    "securityContext": wf["securityContext"],
                    "volumes": wf["volumes"],
                    "serviceAccountName": wf["serviceAccountName"],
                    "automountServiceAccountToken": wf["automountServiceAccountToken"],
                }
                if "tolerations" in template:
                    pod["tolerations"] = template["tolerations"]
                pods.append((template["name"], pod))
        return pods
    return []


def validate_pod(spec: dict, where: str, version: str) -> None:
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": where.lower()}, "spec": spec}
    kubernetes_validate.validate(pod, version, strict=True)


def k8s_versions() -> list[str]:
    """Kubernetes versions whose schemas the manifests must pass: 1.30, 1.34 and the newest known."""
    from kubernetes_validate.utils import latest_version

    return sorted({"1.30.0", "1.34.0", latest_version()}, key=lambda v: tuple(map(int, v.split("."))))


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("version", k8s_versions())
def test_builtin_kinds_validate_strictly(rendered, version):
    import kubernetes_validate

    _, docs = rendered
    builtin = [d for d in docs if d["apiVersion"].split("/")[0] not in ("argoproj.io", "kubernetes.dask.org")]
    assert {d["kind"] for d in builtin} >= {
        "ConfigMap",
        "ServiceAccount",
        "Service",
        "Job",
        "CronJob",
        "Deployment",
        "NetworkPolicy",
        "Role",
        "RoleBinding",
    }
    for doc in builtin:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_typo():
    """The validator used above does fail on an unknown field (the check can fail)."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    job = one(render("cpu"), "Job", "cellmi-cluster")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, latest_version(), strict=True)


@pytest.mark.parametrize("version", k8s_versions())
def test_custom_resources_embed_valid_pods(rendered, version):
    _, docs = rendered
    custom = by_kind(docs, "DaskJob") + by_kind(docs, "CronWorkflow")
    assert len(custom) == 2
    for doc in custom:
        for where, spec in pod_specs(doc):
            validate_pod(spec, where, version)


def test_daskjob_shape_matches_the_crd(rendered):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    _, docs = rendered
    job = one(docs, "DaskJob", "cellmi-infer")
    assert job["apiVersion"] == "kubernetes.dask.org/v1"
    spec = job["spec"]
    assert set(spec) == {"job", "cluster"}
    assert set(spec["job"]) <= {"metadata", "spec"}
    assert set(spec["cluster"]) <= {"metadata", "spec"}
    cluster = spec["cluster"]["spec"]
    assert set(cluster) <= {"idleTimeout", "scheduler", "worker"} and {"scheduler", "worker"} <= set(cluster)
    assert set(cluster["worker"]) <= {"replicas", "spec"} and cluster["worker"]["replicas"] >= 1
    assert set(cluster["scheduler"]) == {"spec", "service"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": cluster["scheduler"]["service"],
    }
    kubernetes_validate.validate(service, latest_version(), strict=True)
    # The operator labels the scheduler pod with the DaskJob's name; the Service must select it.
    assert cluster["scheduler"]["service"]["selector"] == {
        "dask.org/cluster-name": job["metadata"]["name"],
        "dask.org/component": "scheduler",
    }
    (runner,) = spec["job"]["spec"]["containers"]
    assert runner["args"] == ["infer"] and "command" not in runner
    (worker,) = cluster["worker"]["spec"]["containers"]
    assert worker["command"] == ["dask"] and worker["args"][:3] == ["worker", "--name", "$(DASK_WORKER_NAME)"]


CRON_WORKFLOW_SPEC = {
    "schedules",
    "schedule",
    "timezone",
    "concurrencyPolicy",
    "startingDeadlineSeconds",
    "suspend",
    "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit",
    "workflowSpec",
    "workflowMetadata",
    "stopStrategy",
    "when",
}
WORKFLOW_SPEC = {
    "entrypoint",
    "templates",
    "serviceAccountName",
    "automountServiceAccountToken",
    "executor",
    "activeDeadlineSeconds",
    "ttlStrategy",
    "podGC",
    "securityContext",
    "volumes",
    "arguments",
    "nodeSelector",
    "tolerations",
    "affinity",
    "podMetadata",
    "retryStrategy",
    "parallelism",
}
TEMPLATE = {
    "name",
    "container",
    "steps",
    "dag",
    "inputs",
    "outputs",
    "retryStrategy",
    "tolerations",
    "nodeSelector",
    "activeDeadlineSeconds",
    "metadata",
    "podSpecPatch",
    "timeout",
}


def test_cronworkflow_shape_and_chain(rendered):
    _, docs = rendered
    cron = one(docs, "CronWorkflow", "cellmi-chain")
    assert cron["apiVersion"] == "argoproj.io/v1alpha1"
    spec = cron["spec"]
    assert set(spec) <= CRON_WORKFLOW_SPEC
    assert spec["concurrencyPolicy"] == "Forbid"
    assert all(len(s.split()) == 5 for s in spec["schedules"])
    wf = spec["workflowSpec"]
    assert set(wf) <= WORKFLOW_SPEC
    templates = {t["name"]: t for t in wf["templates"]}
    assert all(set(t) <= TEMPLATE for t in templates.values())
    assert wf["entrypoint"] in templates
    steps = [step["template"] for group in templates[wf["entrypoint"]]["steps"] for step in group]
    assert steps == ["ingest", "train", "infer", "cluster"]
    assert all(s in templates and "container" in templates[s] for s in steps)
    assert templates["train"]["container"]["args"] == ["launch", "train"]
    assert "ttlStrategy" in wf and wf["automountServiceAccountToken"] is False
    executor_sa = wf["executor"]["serviceAccountName"]
    binding = one(docs, "RoleBinding", "cellmi-argo-executor")
    assert binding["subjects"][0]["name"] == executor_sa
    role = one(docs, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}
    ]


def test_every_pod_is_locked_down(rendered):
    _, docs = rendered
    pods = [
        (f"{d['kind']}/{d['metadata']['name']}/{where}", spec) for d in docs for where, spec in pod_specs(d)
    ]
    assert len(pods) >= 13
    for where, spec in pods:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), f"{where} {part}"
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), (
                f"{where}: /tmp not writable"
            )


def test_finished_work_is_cleaned_up(rendered):
    _, docs = rendered
    for job in by_kind(docs, "Job"):
        assert job["spec"]["ttlSecondsAfterFinished"] > 0, job["metadata"]["name"]
    for cron in by_kind(docs, "CronJob"):
        assert cron["spec"]["jobTemplate"]["spec"]["ttlSecondsAfterFinished"] > 0
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert one(docs, "CronWorkflow", "cellmi-chain")["spec"]["workflowSpec"]["ttlStrategy"][
        "secondsAfterCompletion"
    ]


def first_rule(rules: list[dict], container: str, code: int) -> str | None:
    """The action of the first podFailurePolicy rule matching a container's exit status (None: the
    default, which counts the failure against backoffLimit)."""
    for rule in rules:
        on = rule.get("onExitCodes")
        if on and on.get("containerName", container) == container and (code in on["values"]) == (
            on["operator"] == "In"
        ):
            return rule["action"]
    return None


def test_failure_policies_fail_fast_on_user_errors_and_retry_infrastructure(rendered):
    _, docs = rendered
    jobs = by_kind(docs, "Job") + [
        c["spec"]["jobTemplate"] | {"metadata": c["metadata"]} for c in by_kind(docs, "CronJob")
    ]
    for job in jobs:
        rules = job["spec"]["podFailurePolicy"]["rules"]
        name = job["metadata"]["name"]
        (container,) = [c["name"] for c in job["spec"]["template"]["spec"]["containers"]]
        assert first_rule(rules, container, UserError.exit_code) == "FailJob", name
        assert first_rule(rules, container, InfrastructureError.exit_code) == "Count", name  # retried, bounded
        assert first_rule(rules, container, 1) is None, name
        assert all(r["onExitCodes"]["containerName"] == container for r in rules if "onExitCodes" in r), name
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        assert job["spec"]["backoffLimit"] >= 1, name
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    for template in one(docs, "CronWorkflow", "cellmi-chain")["spec"]["workflowSpec"]["templates"]:
        if "container" in template:
            assert (
                template["retryStrategy"]["expression"]
                == f"asInt(lastRetry.exitCode) != {UserError.exit_code}"
            )


def test_training_job_and_its_rendezvous_service_agree(rendered):
    _, docs = rendered
    job = one(docs, "Job", "cellmi-train")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["PET_NNODES"])
    service = one(docs, "Service", pod["subdomain"])
    assert env["PET_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert int(env["PET_MASTER_PORT"]) == service["spec"]["ports"][0]["port"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_gpu_overlay_asks_for_gpus(rendered):
    overlay, docs = rendered
    train = one(docs, "Job", "cellmi-train")["spec"]["template"]["spec"]
    limits = train["containers"][0]["resources"]["limits"]
    daskjob = one(docs, "DaskJob", "cellmi-infer")["spec"]["cluster"]["spec"]["worker"]["spec"]
    config = one(docs, "ConfigMap", "cellmi-config")["data"]
    plain = one(docs, "Deployment", "cellmi-dask-worker")["spec"]["template"]["spec"]
    workers = [daskjob["containers"][0], plain["containers"][0]]
    offers = [" ".join(w["args"]).find("--resources GPU=1") >= 0 for w in workers]
    if overlay == "gpu":
        assert (
            limits["nvidia.com/gpu"] == "1"
            and daskjob["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        )
        assert config["CELLMI_TRAIN__DEVICE"] == "cuda"
        assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
        # Dask workers offer the GPU, so `cellmi infer` sends them batches, prepared on their CPUs
        assert all(offers) and all(w["resources"]["limits"]["nvidia.com/gpu"] == "1" for w in workers)
        assert plain["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert int(config["CELLMI_INFER__PREP_THREADS"]) == int(workers[0]["resources"]["limits"]["cpu"])
    else:
        assert "nvidia.com/gpu" not in limits and "CELLMI_TRAIN__DEVICE" not in config
        assert not any(offers)


def test_images_and_commands_are_what_the_image_provides(rendered):
    overlay, docs = rendered
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["cellmi"]' in dockerfile
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'cellmi-launch = "cellmi.launch:main"' in scripts
    seen = 0
    for doc in docs:
        for where, spec in pod_specs(doc):
            for container in spec["containers"]:
                seen += 1
                assert container["image"] == IMAGE[overlay], where
                assert container["imagePullPolicy"] == "Always", where
                args = container.get("args", [])
                if "command" not in container:  # the image's entrypoint: cellmi <job>
                    assert args[0] in JOBS, f"{where}: cellmi {args[0]} is no job"
                    if args[0] == "launch":
                        assert args[1] == "train"
                else:  # dask's own CLI, installed with distributed
                    assert container["command"] == ["dask"] and args[0] in ("scheduler", "worker"), where
    assert seen == 14


def test_every_resource_belongs_to_a_stage(rendered):
    _, docs = rendered
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "cellmi"
        assert labels["app.kubernetes.io/component"] in STAGES, doc["metadata"]["name"]
        assert doc["metadata"]["namespace"] == "cellmi"
    stages = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in docs}
    assert stages == STAGES


def test_no_secret_values_in_manifests():
    for path in (ROOT / "k8s").rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*\S", text), path
        for doc in yaml.safe_load_all(text):
            assert not isinstance(doc, dict) or doc.get("kind") != "Secret", f"{path}: ships a Secret"
