"""ModelServing spec.template: a pod template merged over every revision's server pod; Capstan's
own fields win and cannot be set; bad values are rejected naming the field (admission, models)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sim import Cluster, at, make_ms, run

from capstan.admission.validation import validate
from capstan.api.loading import InvalidObject, parse_object
from capstan.serving.model_source import resolve_model
from capstan.serving.revisions import deployment, desired_revision

Validate = Callable[[dict[str, Any]], None]
SECRET_ENV = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "nlp"}, "annotations": {"example.com/owner": "ml-platform"}},
    "spec": {
        "volumes": [{"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},
                    {"name": "tls", "secret": {"secretName": "server-tls"}}],
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "serving-high",
        "serviceAccountName": "model-reader",
        "securityContext": {"supplementalGroups": [2000]},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                              "labelSelector": {"matchLabels": {"team": "nlp"}}}}]}},
        "containers": [
            {"name": "server",
             "env": [SECRET_ENV],
             "envFrom": [{"secretRef": {"name": "hub-credentials"}}],
             "imagePullPolicy": "Always",
             "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
             "resources": {"limits": {"ephemeral-storage": "40Gi"}},
             "securityContext": {"readOnlyRootFilesystem": True}},
            {"name": "proxy", "image": "envoyproxy/envoy:v1.31.0",
             "volumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": True}]},
        ],
    },
}


def _deployment(**spec: Any) -> dict[str, Any]:
    ms = make_ms(**spec)
    rev = desired_revision(ms, resolve_model(ms, None, {}))
    return deployment(ms, rev, 2)


def test_template_is_merged_into_the_server_pod_and_capstans_fields_win(k8s_valid: Validate) -> None:
    dep = _deployment(runtime="vllm", gpu=True, tensorParallel=2, template=TEMPLATE)
    k8s_valid(dep)
    pod = dep["spec"]["template"]
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"]["team"] == "nlp" and meta["labels"]["capstan.dev/modelserving"] == "gpt"
    assert meta["annotations"]["example.com/owner"] == "ml-platform"
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert [v["name"] for v in spec["volumes"]] == ["model", "dshm", "cache", "tls"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "serving-high"
    assert spec["serviceAccountName"] == "model-reader"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["supplementalGroups"] == [2000]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["tolerations"] == TEMPLATE["spec"]["tolerations"]
    # Capstan's TP node affinity and the template's anti-affinity, together.
    assert "requiredDuringSchedulingIgnoredDuringExecution" in spec["affinity"]["nodeAffinity"]
    assert "podAntiAffinity" in spec["affinity"]

    server, proxy = spec["containers"]
    assert server["name"] == "server" and server["image"].startswith("vllm/")
    assert server["args"][:2] == ["--model", "/model/gpt"]
    env = {e["name"]: e for e in server["env"]}
    assert env["HF_TOKEN"] == SECRET_ENV and env["CAPSTAN_REVISION"]["value"] == dep["metadata"]["name"]
    assert server["envFrom"] == [{"secretRef": {"name": "hub-credentials"}}]
    assert server["imagePullPolicy"] == "Always"
    assert [m["mountPath"] for m in server["volumeMounts"]] == ["/model", "/dev/shm", "/cache"]
    assert server["resources"]["limits"] == {"ephemeral-storage": "40Gi", "nvidia.com/gpu": "2"}
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert "readinessProbe" in server and "startupProbe" in server
    assert proxy["name"] == "proxy" and proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_model_download_gets_the_servers_secret_env() -> None:
    dep = _deployment(model={"uri": "hf://org/model@main"}, template=TEMPLATE)
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == "model-download"
    assert SECRET_ENV in init["env"]
    assert init["envFrom"] == [{"secretRef": {"name": "hub-credentials"}}]


def test_without_a_template_the_deployment_is_unchanged() -> None:
    assert _deployment() == _deployment(template=None)
    plain, empty = _deployment(), _deployment(template={})
    # The revision name (a hash of the spec) differs; nothing else.
    for d in (plain, empty):
        d["metadata"].pop("name")
        for key in ("labels",):
            d["metadata"][key].pop("capstan.dev/revision")
            d["spec"]["template"]["metadata"][key].pop("capstan.dev/revision")
        d["spec"]["selector"]["matchLabels"].pop("capstan.dev/revision")
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]:
            if e["name"] == "CAPSTAN_REVISION":
                e["value"] = ""
    assert plain == empty


def test_a_template_change_rolls_out_a_new_revision() -> None:
    cluster = Cluster()
    ms, _ = run(make_ms(template=TEMPLATE), cluster, at(0))
    first = ms.status.stable_revision
    changed = {**TEMPLATE, "metadata": {"labels": {"team": "search"}}}
    ms2 = make_ms(generation=2, template=changed).model_copy(update={"status": ms.status})
    ms2, _ = run(ms2, cluster, at(10))
    assert ms2.status.canary_revision not in (None, first)


def _server(**fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "server", **fields}]}}


def errors_of(template: dict[str, Any], **spec: Any) -> list[str]:
    body = {"apiVersion": "capstan.dev/v1alpha1", "kind": "ModelServing",
            "metadata": {"name": "gpt", "namespace": "ml"},
            "spec": {"model": {"pvc": {"claimName": "models"}}, "template": template, **spec}}
    with pytest.raises(InvalidObject) as err:
        parse_object(body)
    return err.value.errors


#: A template setting a field Capstan owns (or the spec already has): (template, field named, says).
OWNED: list[tuple[dict[str, Any], str, str]] = [
    (_server(image="other:1"), "spec.template.spec.containers[0].image", "spec.image"),
    (_server(command=["sh"]), "spec.template.spec.containers[0].command", "spec.command"),
    (_server(args=["--x"]), "spec.template.spec.containers[0].args", "argsTemplate"),
    (_server(readinessProbe={"httpGet": {"path": "/", "port": 8000}}),
     "spec.template.spec.containers[0].readinessProbe", "probes"),
    (_server(resources={"limits": {"nvidia.com/gpu": 1}}),
     "spec.template.spec.containers[0].resources.limits['nvidia.com/gpu']", "spec.tensorParallel"),
    (_server(env=[{"name": "CAPSTAN_REVISION", "value": "x"}]),
     "spec.template.spec.containers[0].env[0].name", "Capstan"),
    (_server(ports=[{"name": "http", "containerPort": 9000}]),
     "spec.template.spec.containers[0].ports[0].name",
     "Capstan declares"),
    (_server(volumeMounts=[{"name": "model", "mountPath": "/x"}]),
     "spec.template.spec.containers[0].volumeMounts[0].name", "Capstan's own"),
    ({"spec": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}, "spec.template.spec.volumes[0].name",
     "Capstan's own"),
    ({"spec": {"initContainers": [{"name": "model-download", "image": "x"}]}},
     "spec.template.spec.initContainers[0].name", "Capstan's own init container"),
    ({"spec": {"nodeSelector": {"a": "b"}}}, "spec.template.spec.nodeSelector", "spec.nodeSelector"),
    ({"spec": {"restartPolicy": "Never"}}, "spec.template.spec.restartPolicy", "Always"),
    ({"spec": {"automountServiceAccountToken": True}}, "spec.template.spec.automountServiceAccountToken",
     "token"),
    ({"spec": {"securityContext": {"runAsUser": 0}}}, "spec.template.spec.securityContext.runAsUser",
     "spec.securityContext.runAsUser"),
    ({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": []}}}}},
     "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution",
     "spec.nodeSelector"),
    ({"metadata": {"annotations": {"prometheus.io/port": "9"}}},
     "spec.template.metadata.annotations['prometheus.io/port']", "scrape"),
    ({"metadata": {"labels": {"capstan.dev/revision": "x"}}},
     "spec.template.metadata.labels['capstan.dev/revision']", "Capstan's"),
]


@pytest.mark.parametrize(("template", "field", "says"), OWNED, ids=[f for _, f, _ in OWNED])
def test_owned_field_in_the_template_is_rejected_naming_it(template: dict[str, Any], field: str,
                                                           says: str) -> None:
    errors = errors_of(template)
    assert any(e.startswith(f"{field}: ") and says in e for e in errors), errors


CONFLICTS: list[tuple[dict[str, Any], dict[str, Any], str, str]] = [
    (_server(resources={"requests": {"memory": "4Gi"}}), {"resources": {"memory": "8Gi"}},
     "spec.template.spec.containers[0].resources.requests.memory", "spec.resources.memory"),
    (_server(env=[{"name": "HF_TOKEN", "value": "x"}]), {"env": [{"name": "HF_TOKEN", "value": "y"}]},
     "spec.template.spec.containers[0].env[0].name", "spec.env"),
    ({"spec": {"containers": [{"name": "server", "volumeMounts": [{"name": "m", "mountPath": "/model"}]}],
               "volumes": [{"name": "m", "emptyDir": {}}]}}, {},
     "spec.template.spec.containers[0].volumeMounts[0].mountPath", "mounts the model"),
]


@pytest.mark.parametrize(("template", "spec", "field", "says"), CONFLICTS, ids=[c[2] for c in CONFLICTS])
def test_template_repeating_the_spec_is_rejected_naming_it(template: dict[str, Any], spec: dict[str, Any],
                                                           field: str, says: str) -> None:
    errors = errors_of(template, **spec)
    assert any(e.startswith(f"{field}: ") and says in e for e in errors), errors


def test_admission_rejects_an_owned_field_naming_it() -> None:
    body = {"apiVersion": "capstan.dev/v1alpha1", "kind": "ModelServing",
            "metadata": {"name": "gpt", "namespace": "ml"},
            "spec": {"model": {"pvc": {"claimName": "models"}},
                     "template": {"spec": {"containers": [{"name": "server", "image": "x:1"}]}}}}
    errors = validate(body)
    assert errors == ["spec.template.spec.containers[0].image: use spec.image"]
