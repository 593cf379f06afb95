"""Installing Capstan on the real API server: Helm, kustomize, the samples, CEL and webhook rules.

The chart's release and the in-process operator come from conftest.py. Invalid objects are sent
with ``dryRun=All``: the API server validates and admits them (webhooks included, sideEffects None)
exactly as for a real write, and nothing is stored.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.e2e.conftest import ROOT, Cluster, Install, wait_until
from tests.support.kube import parsed_yaml

pytestmark = pytest.mark.e2e

CRDS = ROOT / "crds"
SAMPLES = ROOT / "manifests" / "samples"
OVERLAY = Path(__file__).parent / "kustomize"
GROUP, VERSION = "capstan.dev", "v1alpha1"
PLURALS = {"TrainingJob": "trainingjobs", "ModelServing": "modelservings"}


def generated_crds() -> dict[str, dict[str, Any]]:
    """The CRDs of crds/ by name, parsed once (they are large, and each CEL case reads its rule's
    message from them): callers only read them."""
    out = {}
    for path in sorted(CRDS.glob("capstan.dev_*.yaml")):
        (crd,) = parsed_yaml(path)
        out[crd["metadata"]["name"]] = crd
    return out


def cel_rules(transition: bool = False) -> set[tuple[str, str, str]]:
    """(kind, schema path, fieldPath) of every x-kubernetes-validations rule in the CRDs; with
    ``transition``, of the transition rules (``oldSelf``: checked on updates only) instead."""
    found: set[tuple[str, str, str]] = set()

    def walk(kind: str, node: dict[str, Any], path: str) -> None:
        for rule in node.get("x-kubernetes-validations") or []:
            if ("oldSelf" in rule["rule"]) == transition:
                found.add((kind, path, rule.get("fieldPath", "")))
        for name, sub in (node.get("properties") or {}).items():
            walk(kind, sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(kind, node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(kind, node["additionalProperties"], f"{path}{{}}")

    for crd in generated_crds().values():
        kind = crd["spec"]["names"]["kind"]
        walk(kind, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
    return found


def body(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A TrainingJob or ModelServing that is valid unless ``spec`` breaks it."""
    base: dict[str, Any] = (
        {"image": "registry.example/trainer:1", "workers": 1}
        if kind == "TrainingJob"
        else {"model": {"uri": "hf://org/model"}, "gpu": False}
    )
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name},
            "spec": {**base, **spec}}


def rejection(cluster: Cluster, obj: dict[str, Any], namespace: str = "default",
              statuses: tuple[int, ...] = (400, 422)) -> str:
    """Create ``obj`` as a server-side dry run; return the API server's message (fail if admitted
    or refused with another status than ``statuses``)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(cluster.client)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj,
                                               dry_run="All")
    except ApiException as exc:
        assert exc.status in statuses, exc
        return str(json.loads(exc.body)["message"])
    pytest.fail(f"the API server admitted {obj['kind']} {obj['spec']}")


# --- Helm ----------------------------------------------------------------------------------------


def test_helm_release_installs_crds_rbac_and_the_webhook(cluster: Cluster, capstan: Install) -> None:
    from kubernetes import client

    status = json.loads(cluster.run("helm", "status", capstan.release, "-n", capstan.namespace,
                                    "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"

    ext = client.ApiextensionsV1Api(cluster.client)
    for name, crd in generated_crds().items():
        served = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in served.status.conditions}
        assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
        assert served.spec.names.short_names == crd["spec"]["names"]["shortNames"]
        (version,) = served.spec.versions
        assert [c.name for c in version.additional_printer_columns] == [
            c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
        ]

    rbac = client.RbacAuthorizationV1Api(cluster.client)
    binding = rbac.read_cluster_role_binding(f"{capstan.release}-capstan-operator")
    assert [(s.kind, s.namespace, s.name) for s in binding.subjects] == [
        ("ServiceAccount", capstan.namespace, capstan.service_account)
    ]

    vwc = client.AdmissionregistrationV1Api(cluster.client).read_validating_webhook_configuration(
        f"{capstan.release}-capstan-validating")
    url = f"https://127.0.0.1:{capstan.webhook_port}"
    assert {h.name: h.client_config.url for h in vwc.webhooks} == {
        "trainingjobs.validate.capstan.dev": f"{url}/validate-trainingjobs",
        "modelservings.validate.capstan.dev": f"{url}/validate-modelservings",
    }
    assert all(h.failure_policy == "Fail" and h.side_effects == "None" for h in vwc.webhooks)


def test_webhook_server_speaks_tls_with_the_chart_ca_bundle(capstan: Install) -> None:
    ca = base64.b64decode(capstan.values["webhook"]["caBundle"]).decode()
    ctx = ssl.create_default_context(cadata=ca)
    with socket.create_connection(("127.0.0.1", capstan.webhook_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]


# --- kustomize -----------------------------------------------------------------------------------


def test_kustomize_base_applies_beside_the_helm_release(cluster: Cluster, capstan: Install) -> None:
    """``kubectl apply -k`` of manifests/base (through tests/e2e/kustomize, which says what it
    changes and why) into its own namespace, next to the release: every object is stored, and the
    API server calls the base's own webhook (its Service in capstan-system, which nothing serves)."""
    objs = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(OVERLAY)).stdout) if d]
    namespaces = {o["metadata"].get("namespace") for o in objs} - {None}
    assert namespaces == {"capstan-system"}
    not_crds = [o for o in objs if o["kind"] != "CustomResourceDefinition"]
    try:
        cluster.kubectl("apply", "-k", str(OVERLAY))
        for obj in objs:
            meta = obj["metadata"]
            args = ["get", f"{obj['kind']}.{obj['apiVersion'].split('/')[0]}" if "/" in obj["apiVersion"]
                    else obj["kind"], meta["name"], "-o", "name"]
            if meta.get("namespace"):
                args += ["-n", meta["namespace"]]
            assert cluster.kubectl(*args).stdout.strip(), obj["kind"]
        message = wait_until(
            lambda: rejection(cluster, body("TrainingJob", "in-base-ns", {}), "capstan-system", (500,)),
            lambda m: "capstan-webhook.capstan-system.svc" in m, timeout=30,
            what="the base's webhook to be called")
        assert 'failed calling webhook "trainingjobs.validate.capstan.dev"' in message
    finally:
        # Everything but the CRDs, which the release shares (deleting them deletes every object).
        cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-",
                        stdin=yaml.safe_dump_all(not_crds), check=False)


# --- samples, CEL rules, webhook rules ------------------------------------------------------------


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.yaml")))
def test_sample_passes_server_side_dry_run(cluster: Cluster, capstan: Install, sample: str) -> None:
    res = cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", str(SAMPLES / sample))
    assert "(server dry run)" in res.stdout, res.stdout


IN_WITHOUT_VALUES = {"key": "app", "operator": "In"}
#: One invalid spec per CEL rule of the CRDs: (kind, schema path, fieldPath) → (spec, field named).
CEL_CASES: dict[tuple[str, str, str], tuple[dict[str, Any], str]] = {
    ("TrainingJob", ".spec", ".checkpoint.snapshots"):
        ({"checkpoint": {"snapshots": {"keep": 1}}}, "spec.checkpoint.snapshots"),
    ("TrainingJob", ".spec", ".checkpoint.restoreFrom"):
        ({"checkpoint": {"restoreFrom": "gpt-ckpt-final"}}, "spec.checkpoint.restoreFrom"),
    ("TrainingJob", ".spec", ".network.rdma"):
        ({"network": {"rdma": "required", "rdmaResource": "rdma/hca"}}, "spec.network.rdma"),
    ("TrainingJob", ".spec", ".network.rdmaResource"):
        ({"gpusPerWorker": 1, "network": {"rdma": "required"}}, "spec.network.rdmaResource"),
    ("TrainingJob", ".spec", ".procsPerWorker"):
        ({"gpusPerWorker": 2, "procsPerWorker": 1}, "spec.procsPerWorker"),
    ("TrainingJob", ".spec", ".args"): ({"launcher": "deepspeed"}, "spec.args"),
    ("TrainingJob", ".spec", ".preemptible"): ({"preemptible": True}, "spec.preemptible"),
    ("TrainingJob", ".spec.failurePolicy.rules[]", ""):
        ({"failurePolicy": {"rules": [{"action": "FailJob"}]}}, "spec.failurePolicy.rules[0]"),
    ("TrainingJob", ".spec.checkpoint.volume", ""):
        ({"checkpoint": {"volume": {"size": "1Gi", "claimName": "mine"}}}, "spec.checkpoint.volume"),
    ("ModelServing", ".spec", ".argsTemplate"):
        ({"runtime": "custom", "image": "registry.example/server:1"}, "spec.argsTemplate"),
    ("ModelServing", ".spec.model", ""):
        ({"model": {"uri": "hf://org/model", "pvc": {"claimName": "models"}}}, "spec.model"),
    ("ModelServing", ".spec.autoscaling", ".minReplicas"):
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling.minReplicas"),
    ("ModelServing", ".spec.autoscaling", ".activationQuery"):
        ({"autoscaling": {"minReplicas": 0}}, "spec.autoscaling.activationQuery"),
    ("ModelServing", ".spec", ".autoscaling.metric"):
        ({"runtime": "tgi", "autoscaling": {"metric": "kvCache"}}, "spec.autoscaling.metric"),
    ("ModelServing", ".spec", ".quantization"):
        ({"runtime": "vllm", "quantization": "int8"}, "spec.quantization"),
    ("ModelServing", ".spec", ".rollout.analysis.maxTimeToFirstTokenP95Ms"):
        ({"runtime": "tgi",
          "rollout": {"steps": [{"weight": 10}], "analysis": {"maxTimeToFirstTokenP95Ms": 500}}},
         "spec.rollout.analysis.maxTimeToFirstTokenP95Ms"),
    ("ModelServing", ".spec", ".rollout.analysis.maxKvCacheUsage"):
        ({"runtime": "tgi", "rollout": {"steps": [{"weight": 10}], "analysis": {"maxKvCacheUsage": 0.9}}},
         "spec.rollout.analysis.maxKvCacheUsage"),
    ("ModelServing", ".spec.rollout.analysis.queries[]", ".max"):
        ({"rollout": {"steps": [{"weight": 10}], "analysis": {"queries": [{"name": "q", "query": "up"}]}}},
         "spec.rollout.analysis.queries[0].max"),
    ("ModelServing", ".spec.model", ".cache"):
        ({"model": {"pvc": {"claimName": "models"}, "cache": {"size": "1Gi"}}}, "spec.model.cache"),
    ("ModelServing", ".spec.rollout", ".maxSurge"): ({"rollout": {"maxSurge": 0}}, "spec.rollout.maxSurge"),
    ("ModelServing", ".spec", ".rollout.maxSurge"):
        ({"replicas": 1, "rollout": {"maxSurge": 0, "steps": [{"weight": 50}]}}, "spec.rollout.maxSurge"),
    ("ModelServing", ".spec", ".routing.inferencePool"):
        ({"runtime": "tgi", "routing": {"inferencePool": "Required", "gateway": {"name": "gw"}}},
         "spec.routing.inferencePool"),
    ("ModelServing", ".spec.routing", ".gateway"):
        ({"runtime": "vllm", "routing": {"inferencePool": "Required"}}, "spec.routing.gateway"),
    # Two rules share this key (whole pods; tensor-parallel groups over whole pods): one case.
    ("ModelServing", ".spec", ".gpusPerPod"):
        ({"runtime": "vllm", "tensorParallel": 8, "gpusPerPod": 3}, "spec.gpusPerPod"),
    ("ModelServing", ".spec", ".runtime"): ({"runtime": "tgi", "pipelineParallel": 2}, "spec.runtime"),
    ("ModelServing", ".spec", ".gpu"):
        ({"runtime": "vllm", "gpu": False, "pipelineParallel": 2}, "spec.gpu"),
    ("ModelServing", ".spec.rollout.steps[].pause", ""):
        ({"rollout": {"steps": [{"weight": 10, "pause": "9000h"}]}}, "spec.rollout.steps[0].pause"),
    # Two rules share this key (the runtime serves adapters; names are unique): one case each.
    ("ModelServing", ".spec", ".adapters"):
        ({"runtime": "tgi", "adapters": [{"name": "a", "uri": "pvc://adapters/a"}]}, "spec.adapters"),
    ("ModelServing", ".spec.adapters[]", ""):
        ({"adapters": [{"name": "a"}]}, "spec.adapters[0]"),
    ("ModelServing", ".spec.adapters[].rollout.steps[].pause", ""):
        ({"adapters": [{"name": "a", "uri": "pvc://adapters/a", "rollout": {"steps": [
            {"weight": 10, "pause": "9000h"}]}}]}, "spec.adapters[0].rollout.steps[0].pause"),
    ("TrainingJob", ".spec.fineTune", ".lora"):
        ({"fineTune": {"method": "lora"}}, "spec.fineTune.lora"),
    ("TrainingJob", ".spec.fineTune", ".merge"):
        ({"fineTune": {"method": "full", "merge": True}}, "spec.fineTune.merge"),
    **{
        (kind, ".spec.tolerations[]", f".{field}"):
            ({"tolerations": [toleration]}, f"spec.tolerations[0].{field}")
        for kind in ("TrainingJob", "ModelServing")
        for field, toleration in (
            ("operator", {"operator": "Equal", "value": "gpu"}),
            ("value", {"key": "nvidia.com/gpu", "operator": "Exists", "value": "present"}),
            ("effect", {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule",
                        "tolerationSeconds": 30}),
        )
    },
    # NetworkPolicy peers: neither or both kinds of peer; a selector requirement's values.
    **{
        (kind, f".spec.networkPolicy.{peers}[]", ""):
            ({"networkPolicy": {peers: [{}]}}, f"spec.networkPolicy.{peers}[0]")
        for kind, peers in (("TrainingJob", "metricsFrom"), ("ModelServing", "metricsFrom"),
                            ("ModelServing", "clientsFrom"))
    },
    **{
        (kind, f".spec.networkPolicy.{peers}[].{selector}.matchExpressions[]", ".values"):
            ({"networkPolicy": {peers: [{selector: {"matchExpressions": [IN_WITHOUT_VALUES]}}]}},
             f"spec.networkPolicy.{peers}[0].{selector}.matchExpressions[0].values")
        for kind, peers in (("TrainingJob", "metricsFrom"), ("ModelServing", "metricsFrom"),
                            ("ModelServing", "clientsFrom"))
        for selector in ("podSelector", "namespaceSelector")
    },
}


def test_every_cel_rule_has_a_case() -> None:
    assert set(CEL_CASES) == cel_rules()
    assert set(TRANSITION_CASES) == cel_rules(transition=True)


#: One refused update per transition rule (an immutable field): (kind, schema path, fieldPath) →
#: (spec stored, spec sent, field named).
TRANSITION_CASES: dict[tuple[str, str, str], tuple[dict[str, Any], dict[str, Any], str]] = {
    ("TrainingJob", ".spec", ".checkpoint.volume"): (
        {"checkpoint": {"volume": {"size": "1Gi"}}}, {"checkpoint": {"volume": {"size": "2Gi"}}},
        "spec.checkpoint.volume"),
    ("TrainingJob", ".spec", ".checkpoint.restoreFrom"): (
        {"checkpoint": {"volume": {"size": "1Gi"}, "restoreFrom": "a"}},
        {"checkpoint": {"volume": {"size": "1Gi"}, "restoreFrom": "b"}}, "spec.checkpoint.restoreFrom"),
    ("TrainingJob", ".spec", ".masterPort"): (
        {"masterPort": 29500}, {"masterPort": 29501}, "spec.masterPort"),
    ("TrainingJob", ".spec", ".queueName"): ({"queueName": "a"}, {"queueName": "b"}, "spec.queueName"),
}


@pytest.mark.parametrize("rule", list(TRANSITION_CASES), ids=lambda r: f"{r[0]}{r[1]}{r[2]}")
def test_transition_rule_refuses_the_update_naming_the_field(cluster: Cluster, capstan: Install,
                                                             namespace: str,
                                                             rule: tuple[str, str, str]) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    stored, sent, field = TRANSITION_CASES[rule]
    custom = client.CustomObjectsApi(cluster.client)
    name = "immutable-" + rule[2].strip(".").replace(".", "-").lower()
    # Suspended and pinned nowhere: the operator makes no pod while the update is tried.
    obj = body(rule[0], name, {**stored, "suspend": True})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[rule[0]], obj)
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[rule[0]], name,
                                              {"spec": sent}, dry_run="All")
    assert err.value.status == 422, err.value
    message = json.loads(err.value.body)["message"]
    assert f"{field}: Invalid value" in message, message
    assert _rule_message(*rule, transition=True) in message
    # Other fields still change (workers: a resize).
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[rule[0]], name,
                                          {"spec": {"workers": 2}}, dry_run="All")


def _rule_message(kind: str, path: str, field_path: str, transition: bool = False) -> str:
    crd = generated_crds()[f"{PLURALS[kind]}.{GROUP}"]
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in path.strip(".").split("."):
        name = part.rstrip("[]{}")
        node = node["properties"][name]
        for suffix in part[len(name):].replace("[]", "[").replace("{}", "{"):
            node = node["items"] if suffix == "[" else node["additionalProperties"]
    rules = node["x-kubernetes-validations"]
    return next(r["message"] for r in rules
                if r.get("fieldPath", "") == field_path and ("oldSelf" in r["rule"]) == transition)


@pytest.mark.parametrize("rule", list(CEL_CASES), ids=lambda r: f"{r[0]}{r[1]}{r[2]}")
def test_cel_rule_rejects_with_the_field_named(cluster: Cluster, capstan: Install,
                                               rule: tuple[str, str, str]) -> None:
    spec, field = CEL_CASES[rule]
    message = rejection(cluster, body(rule[0], "bad", spec))
    assert f"{field}: Invalid value" in message, message
    assert _rule_message(*rule) in message
    assert "denied the request" not in message  # the schema refused it before any webhook


#: One invalid object per check of capstan/admission/validation.py that the schema cannot state:
#: (kind, spec, field named). Not reachable here: tensorParallel wider than any NVLink domain (the
#: fake NVL72 rack is one 72-GPU domain, the schema's maximum of tensorParallel).
WEBHOOK_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    # everything pydantic says beyond the schema: a quantity's syntax
    "quantity": ("TrainingJob", {"resources": {"cpu": "lots"}}, "spec.resources.cpu"),
    # capstan.api.podtemplate: a pod template may not set what Capstan owns, nor a negative value
    "template-owned-field": (
        "TrainingJob",
        {"template": {"spec": {"containers": [{"name": "worker", "resources": {"limits": {
            "nvidia.com/gpu": 1}}}]}}},
        "spec.template.spec.containers[0].resources.limits['nvidia.com/gpu']",
    ),
    "template-negative-value": (
        "TrainingJob", {"template": {"spec": {"terminationGracePeriodSeconds": -1}}},
        "spec.template.spec.terminationGracePeriodSeconds",
    ),
    # pydantic beyond the schema: a failure rule's regular expression
    "invalid-message-pattern": (
        "TrainingJob", {"failurePolicy": {"rules": [{"action": "FailJob", "messagePattern": "NCCL (error"}]}},
        "spec.failurePolicy.rules[0].messagePattern",
    ),
    # _trainingjob_capacity: a worker larger than the largest node (8 GPUs)
    "worker-larger-than-any-node": ("TrainingJob", {"gpusPerWorker": 16}, "spec.gpusPerWorker"),
    # _trainingjob_capacity: a Required gang wider than the largest NVLink domain (72 GPUs)
    "gang-wider-than-max-domain": (
        "TrainingJob",
        {"workers": 10, "gpusPerWorker": 8, "topology": {"policy": "Required", "maxDomain": "nvlink"}},
        "spec.topology.maxDomain",
    ),
    # _rollout_weights
    "canary-weights-decrease": (
        "ModelServing",
        {"rollout": {"steps": [{"weight": 50}, {"weight": 10}]}},
        "spec.rollout.steps[1].weight",
    ),
    # args_template_errors
    "args-template-unknown-variable": (
        "ModelServing",
        {"runtime": "custom", "image": "registry.example/server:1",
         "argsTemplate": "--model={{ modle_path }}"},
        "spec.argsTemplate",
    ),
}


@pytest.mark.parametrize("case", list(WEBHOOK_CASES))
def test_webhook_rule_rejects_with_the_field_named(cluster: Cluster, capstan: Install, case: str) -> None:
    kind, spec, field = WEBHOOK_CASES[case]
    message = rejection(cluster, body(kind, "bad", spec))
    assert f'admission webhook "{PLURALS[kind]}.validate.capstan.dev" denied the request' in message, message
    assert f"{field}: " in message, message


def test_webhook_checks_updates_too(cluster: Cluster, capstan: Install, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(cluster.client)
    job = body("TrainingJob", "grows", {"gpusPerWorker": 4, "nodeSelector": {"capstan.dev/e2e": "none"}})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", job)
    bigger = copy.deepcopy(job["spec"]) | {"gpusPerWorker": 16}
    with pytest.raises(ApiException) as err:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", "grows",
                                              {"spec": bigger})
    message = json.loads(err.value.body)["message"]
    assert 'admission webhook "trainingjobs.validate.capstan.dev" denied the request' in message
    assert "spec.gpusPerWorker: 16 GPUs per worker" in message
