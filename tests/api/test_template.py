"""spec.template: a pod template merged over the worker pod; Capstan's own fields win and cannot be
set; bad values are rejected naming the field, by the models (admission) and by `capstan render`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.api.bodies import tj

from capstan.admission.validation import validate
from capstan.api.crdgen import build_crds
from capstan.api.loading import InvalidObject, parse_object
from capstan.api.podspec import schema_stale
from capstan.api.trainingjob import TrainingJob
from capstan.cli import main
from capstan.labels import SPEC_DIGEST_ANNOTATION
from capstan.training.lifecycle import worker_state
from capstan.training.pods import PODINFO_DIR, worker_pod

SECRET_ENV = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "nlp"}, "annotations": {"example.com/owner": "ml-platform"}},
    "spec": {
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "training-high",
        "securityContext": {"supplementalGroups": [2000]},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [
                    {"key": "disk", "operator": "In", "values": ["nvme"]}]}}]},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                  "labelSelector": {"matchLabels": {"team": "web"}}}}]},
        },
        "initContainers": [{"name": "fetch", "image": "busybox:1.36", "command": ["true"],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        "containers": [
            {"name": "worker",
             "env": [SECRET_ENV, {"name": "NCCL_DEBUG", "value": "INFO"}],
             "envFrom": [{"secretRef": {"name": "wandb"}}],
             "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
             "resources": {"limits": {"ephemeral-storage": "20Gi"}},
             "securityContext": {"readOnlyRootFilesystem": True}},
            {"name": "log-shipper", "image": "fluent/fluent-bit:3.0"},
        ],
    },
}


def job(template: dict[str, Any] = TEMPLATE, **spec: Any) -> TrainingJob:
    body = tj(gpusPerWorker=8, template=template, **spec)
    body["metadata"]["uid"] = "u-1"
    res = parse_object(body)
    assert isinstance(res, TrainingJob)
    return res


def errors_of(template: dict[str, Any], **spec: Any) -> list[str]:
    with pytest.raises(InvalidObject) as err:
        job(template, **spec)
    return err.value.errors


def test_template_is_merged_into_the_worker_pod_and_capstans_fields_win(k8s_valid: Any) -> None:
    pod = worker_pod(job(), rank=1, attempt=0, node="gpu-node-3")
    k8s_valid(pod)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"]["team"] == "nlp" and meta["labels"]["capstan.dev/rank"] == "1"
    assert meta["annotations"]["example.com/owner"] == "ml-platform"
    assert [v["name"] for v in spec["volumes"]] == ["dshm", "checkpoints", "podinfo", "data"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "training-high"
    assert spec["securityContext"] == {"supplementalGroups": [2000], "runAsNonRoot": True,
                                       "seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["tolerations"] == TEMPLATE["spec"]["tolerations"]
    # Capstan's pin and the template's preferences and anti-affinity, together.
    node_affinity = spec["affinity"]["nodeAffinity"]
    assert node_affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchFields"][0]["values"] == ["gpu-node-3"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in node_affinity
    assert "podAntiAffinity" in spec["affinity"]
    assert (spec["hostname"], spec["subdomain"], spec["restartPolicy"]) == ("gpt-1", "gpt-workers", "Never")

    worker, sidecar = spec["containers"]
    assert worker["name"] == "worker" and worker["image"] == "img"
    env = {e["name"]: e for e in worker["env"]}
    assert env["HF_TOKEN"] == SECRET_ENV
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "INFO"}  # overrides Capstan's default
    assert env["NODE_RANK"]["value"] == "1" and env["MASTER_ADDR"]["value"].startswith("gpt-0.")
    assert worker["envFrom"] == [{"secretRef": {"name": "wandb"}}]
    mounts = [m["mountPath"] for m in worker["volumeMounts"]]
    assert mounts == ["/dev/shm", "/checkpoints", PODINFO_DIR, "/data"]
    assert worker["resources"]["limits"] == {"ephemeral-storage": "20Gi", "nvidia.com/gpu": "8"}
    assert worker["securityContext"] == {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                         "capabilities": {"drop": ["ALL"]}}
    # Sidecars and init containers get the hardened defaults under their own settings.
    assert sidecar["name"] == "log-shipper"
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False
    (init,) = spec["initContainers"]
    assert init["name"] == "fetch" and init["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_without_a_template_the_pod_is_unchanged() -> None:
    plain = parse_object({**tj(gpusPerWorker=8), "metadata": {"name": "gpt", "uid": "u-1"}})
    empty = job({})
    assert isinstance(plain, TrainingJob)
    pods = [worker_pod(plain, 0, 0), worker_pod(empty, 0, 0)]
    for pod in pods:  # the digest of the spec differs (the spec does); nothing else
        del pod["metadata"]["annotations"][SPEC_DIGEST_ANNOTATION]
    assert pods[0] == pods[1]


def test_template_tolerations_reach_the_placement() -> None:
    j = job(tolerations=[{"key": "gpu", "operator": "Exists"}])
    own = {"key": "gpu", "operator": "Exists"}
    assert j.spec.pod_tolerations() == [own, *TEMPLATE["spec"]["tolerations"]]


def test_template_scalars_pass_and_grace_period_can_be_raised() -> None:
    pod = worker_pod(job({"spec": {"terminationGracePeriodSeconds": 600, "schedulerName": "volcano"}}), 0, 0)
    assert pod["spec"]["terminationGracePeriodSeconds"] == 600
    assert pod["spec"]["schedulerName"] == "volcano"


def _worker(**fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "worker", **fields}]}}


#: A template setting a field Capstan owns (or the spec already has): (template, field named, says).
OWNED: list[tuple[dict[str, Any], str, str]] = [
    ({"spec": {"nodeName": "n1"}}, "spec.template.spec.nodeName", "placement"),
    ({"spec": {"nodeSelector": {"a": "b"}}}, "spec.template.spec.nodeSelector", "spec.nodeSelector"),
    ({"spec": {"hostname": "h"}}, "spec.template.spec.hostname", "rendezvous"),
    ({"spec": {"subdomain": "s"}}, "spec.template.spec.subdomain", "headless Service"),
    ({"spec": {"restartPolicy": "Always"}}, "spec.template.spec.restartPolicy", "gang"),
    ({"spec": {"serviceAccountName": "sa"}}, "spec.template.spec.serviceAccountName",
     "spec.serviceAccountName"),
    ({"spec": {"priority": 5}}, "spec.template.spec.priority", "priorityClassName"),
    ({"spec": {"securityContext": {"runAsNonRoot": False}}},
     "spec.template.spec.securityContext.runAsNonRoot",
     "runAsNonRoot"),
    ({"spec": {"securityContext": {"runAsUser": 0}}}, "spec.template.spec.securityContext.runAsUser",
     "spec.securityContext.runAsUser"),
    ({"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}},
     "spec.template.spec.securityContext.seccompProfile", "RuntimeDefault"),
    ({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": []}}}}},
     "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution",
     "spec.nodeSelector"),
    ({"spec": {"volumes": [{"name": "checkpoints", "emptyDir": {}}]}}, "spec.template.spec.volumes[0].name",
     "Capstan's own"),
    (_worker(image="other:1"), "spec.template.spec.containers[0].image", "spec.image"),
    (_worker(command=["sh"]), "spec.template.spec.containers[0].command", "spec.command"),
    (_worker(resources={"limits": {"nvidia.com/gpu": 8}}),
     "spec.template.spec.containers[0].resources.limits['nvidia.com/gpu']", "spec.gpusPerWorker"),
    (_worker(resources={"requests": {"rdma/hca": 1}}),
     "spec.template.spec.containers[0].resources.requests['rdma/hca']", "spec.network.rdmaResource"),
    (_worker(env=[{"name": "MASTER_ADDR", "value": "x"}]), "spec.template.spec.containers[0].env[0].name",
     "rendezvous"),
    (_worker(env=[{"name": "CAPSTAN_RESUME", "value": "none"}]),
     "spec.template.spec.containers[0].env[0].name",
     "rendezvous"),
    (_worker(volumeMounts=[{"name": "dshm", "mountPath": "/x"}]),
     "spec.template.spec.containers[0].volumeMounts[0].name", "Capstan's own"),
    (_worker(volumeMounts=[{"name": "shm", "mountPath": "/dev/shm"}]) | {"spec": {
        "containers": [{"name": "worker", "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}],
        "volumes": [{"name": "shm", "emptyDir": {}}]}},
     "spec.template.spec.containers[0].volumeMounts[0].mountPath", "sharedMemory"),
    (_worker(volumeMounts=[{"name": "ckpt", "mountPath": "/checkpoints"}]) | {"spec": {
        "containers": [{"name": "worker", "volumeMounts": [{"name": "ckpt", "mountPath": "/checkpoints"}]}],
        "volumes": [{"name": "ckpt", "emptyDir": {}}]}},
     "spec.template.spec.containers[0].volumeMounts[0].mountPath", "checkpoint"),
    (_worker(ports=[{"name": "metrics", "containerPort": 8000}]),
     "spec.template.spec.containers[0].ports[0].name",
     "Capstan declares"),
    (_worker(securityContext={"privileged": True}),
     "spec.template.spec.containers[0].securityContext.privileged", "privileged"),
    ({"spec": {"initContainers": [{"name": "i", "image": "b", "securityContext": {
        "capabilities": {"add": ["SYS_ADMIN"]}}}]}},
     "spec.template.spec.initContainers[0].securityContext.capabilities", "capability"),
    ({"metadata": {"labels": {"capstan.dev/rank": "0"}}}, "spec.template.metadata.labels['capstan.dev/rank']",
     "Capstan's"),
    ({"metadata": {"annotations": {"k8s.v1.cni.cncf.io/networks": "ib"}}},
     "spec.template.metadata.annotations['k8s.v1.cni.cncf.io/networks']", "spec.network.networks"),
]


@pytest.mark.parametrize(("template", "field", "says"), OWNED, ids=[f for _, f, _ in OWNED])
def test_owned_field_in_the_template_is_rejected_naming_it(template: dict[str, Any], field: str,
                                                           says: str) -> None:
    errors = errors_of(template)
    assert any(e.startswith(f"{field}: ") and says in e for e in errors), errors


#: Invalid values inside the template: (template, field named, says).
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"spec": {"terminationGracePeriodSeconds": -1}}, "spec.template.spec.terminationGracePeriodSeconds",
     "negative"),
    ({"spec": {"activeDeadlineSeconds": "soon"}}, "spec.template.spec.activeDeadlineSeconds",
     "must be an integer, got a string"),
    ({"spec": {"volumes": [{"name": "d", "emptyDir": {"sizeLimit": "lots"}}]}},
     "spec.template.spec.volumes[0].emptyDir.sizeLimit", "quantity"),
    (_worker(resources={"limits": {"memory": "-4Gi"}}),
     "spec.template.spec.containers[0].resources.limits.memory", "quantity"),
    (_worker(ports=[{"containerPort": -80}]), "spec.template.spec.containers[0].ports[0].containerPort",
     "negative"),
    ({"spec": {"volumes": [{"persistentVolumeClaim": {"claimName": "x"}}]}},
     "spec.template.spec.volumes[0].name",
     "required field is missing"),
    ({"spec": {"volumes": [{"name": "d", "persistentVolumeClam": {"claimName": "x"}}]}},
     "spec.template.spec.volumes[0].persistentVolumeClam", "unknown field"),
    ({"spec": {"ephemeralContainers": [{"name": "debug", "image": "busybox"}]}},
     "spec.template.spec.ephemeralContainers", "cannot be created"),
    ({"spec": {"containers": [{"name": "sidecar"}]}}, "spec.template.spec.containers[0].image", "required"),
    ({"spec": {"containers": [{"name": "Bad_Name", "image": "x"}]}}, "spec.template.spec.containers[0].name",
     "DNS-1123"),
    ({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "a", "image": "y"}]}},
     "spec.template.spec.containers[1].name", "also"),
    ({"spec": {"initContainers": [{"name": "worker", "image": "x"}]}},
     "spec.template.spec.initContainers[0].name",
     "worker container"),
    ({"spec": {"volumes": [{"name": "d", "emptyDir": {}}, {"name": "d", "emptyDir": {}}]}},
     "spec.template.spec.volumes[1].name", "twice"),
    (_worker(volumeMounts=[{"name": "nowhere", "mountPath": "/x"}]),
     "spec.template.spec.containers[0].volumeMounts[0].name", "no volume"),
    (_worker(env=[{"name": "1BAD", "value": "x"}]), "spec.template.spec.containers[0].env[0].name", ""),
    ({"metadata": {"labels": {"team": "not a label value"}}}, "spec.template.metadata.labels.team", ""),
    ({"spec": {"volumes": "data"}}, "spec.template.spec.volumes", "must be an array"),
]


@pytest.mark.parametrize(("template", "field", "says"), INVALID, ids=[f for _, f, _ in INVALID])
def test_invalid_value_in_the_template_is_rejected_naming_it(template: dict[str, Any], field: str,
                                                             says: str) -> None:
    errors = errors_of(template)
    assert any(e.startswith(f"{field}: ") and says in e for e in errors), errors


def test_template_resources_may_not_repeat_spec_resources() -> None:
    errors = errors_of(_worker(resources={"requests": {"cpu": "4"}}), resources={"cpu": "8"})
    assert errors == ["spec.template.spec.containers[0].resources.requests.cpu: also set by "
                      "spec.resources.cpu; set it in one place"]


def test_every_problem_is_reported_at_once() -> None:
    errors = errors_of({"spec": {"nodeName": "n", "hostname": "h", "containers": [{"name": "s"}]}})
    assert {e.split(":")[0] for e in errors} == {
        "spec.template.spec.nodeName", "spec.template.spec.hostname",
        "spec.template.spec.containers[0].image"}


def test_admission_rejects_an_owned_field_naming_it() -> None:
    body = tj(template={"spec": {"containers": [{"name": "worker", "resources": {"limits": {
        "nvidia.com/gpu": 1}}}]}})
    errors = validate(body)
    assert len(errors) == 1
    assert errors[0].startswith("spec.template.spec.containers[0].resources.limits['nvidia.com/gpu']: ")


def test_capstan_render_rejects_a_bad_template_naming_the_field(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "job.yaml"
    bad = {"spec": {"hostname": "h", "terminationGracePeriodSeconds": -3}}
    path.write_text(yaml.safe_dump(tj(template=bad)))
    assert main(["render", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.template.spec.hostname: " in err
    assert "spec.template.spec.terminationGracePeriodSeconds: must not be negative" in err


def test_capstan_render_prints_the_merged_pods(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tj(template=TEMPLATE)))
    assert main(["render", "-f", str(path)]) == 0
    pods = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o and o["kind"] == "Pod"]
    assert len(pods) == 2
    assert all(p["spec"]["imagePullSecrets"] == [{"name": "regcred"}] for p in pods)


def test_crd_template_schema_is_upstreams_podspec_with_descriptions() -> None:
    crd = build_crds()["capstan.dev_trainingjobs.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    pod = spec["properties"]["template"]["properties"]["spec"]
    volumes = pod["properties"]["volumes"]
    assert volumes["type"] == "array" and "persistentVolumeClaim" in volumes["items"]["properties"]
    assert volumes["description"]  # kubectl explain trainingjob.spec.template.spec.volumes
    env = pod["properties"]["containers"]["items"]["properties"]["env"]["items"]["properties"]
    assert "secretKeyRef" in env["valueFrom"]["properties"]
    assert "ephemeralContainers" not in pod["properties"] and "required" not in pod
    assert not schema_stale()  # the packaged schema file is upstream's, as `make crds` wrote it


def test_worker_exit_code_is_the_worker_containers() -> None:
    pod = worker_pod(job(), 0, 0)
    pod["status"] = {"phase": "Failed", "containerStatuses": [
        {"name": "log-shipper", "state": {"terminated": {"exitCode": 137}}},
        {"name": "worker", "state": {"terminated": {"exitCode": 75}}},
    ]}
    state = worker_state(pod)
    assert state is not None and state.exit_code == 75
