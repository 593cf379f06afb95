"""Smoke test of the local control plane of ``make cluster`` (scripts/cluster.py).

A real kube-apiserver 1.37 with RBAC, the real scheduler and controller-manager, and kwok faking
the kubelets of the GPU nodes of manifests/dev/topology.yaml. Uses ``$KUBECONFIG``, else
``.capstan/cluster/kubeconfig``. Skipped when no cluster answers, unless ``CI`` or
``CAPSTAN_E2E`` (not ``0``) is set: then a missing cluster fails every test with the reason.

How a test sets a pod's final state on a fake node (kwok's stages from sigs.k8s.io/kwok):
  * Failed with an exit code: create the pod with the label
    ``pod-container-running-failed.stage.kwok.x-k8s.io: "true"`` and the annotation
    ``pod-container-running-failed.stage.kwok.x-k8s.io/exit-code``; kwok fails it about a second
    after it is Running (kwok's chaos stage).
  * Succeeded: once the pod is Running, patch its status (phase and terminated container
    states) as the test identity. kwok's stages leave Succeeded/Failed pods alone. Pods owned by a
    Job are completed by kwok itself (Succeeded, exit code 0).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from tests.e2e.conftest import admin_client
from tests.e2e.conftest import wait_until as wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "manifests" / "dev" / "topology.yaml"
FAIL_LABEL = "pod-container-running-failed.stage.kwok.x-k8s.io"
T = TypeVar("T")




@pytest.fixture(scope="module")
def kube() -> Any:
    """An ApiClient for the cluster (admin identity of the kubeconfig); skip or fail without one."""
    return admin_client()


@pytest.fixture(scope="module")
def namespace(kube: Any) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount (pods need it), deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    name = f"capstan-cp-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), what="default ServiceAccount")
    yield name
    core.delete_namespace(name)


def gone(call: Callable[[], Any]) -> Callable[[], bool]:
    """A probe that is True once ``call`` raises 404."""
    from kubernetes.client.exceptions import ApiException

    def probe() -> bool:
        try:
            call()
        except ApiException as exc:
            return exc.status == 404
        return False

    return probe


def pod_manifest(name: str, node: str, **meta: Any) -> dict[str, Any]:
    """A one-container pod pinned to ``node`` asking for one GPU."""
    return {
        "metadata": {"name": name, **meta},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [{"name": "main", "image": "registry.invalid/never-pulled:1",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }


def running_pod(core: Any, namespace: str, name: str) -> Any:
    """Wait until the pod is Running and return it."""
    return wait_for(lambda: core.read_namespaced_pod(name, namespace),
                    lambda p: p.status.phase == "Running", what=f"pod {name} Running")


def test_api_server_is_kubernetes_1_37(kube: Any) -> None:
    from kubernetes import client

    version = client.VersionApi(kube).get_code()
    assert version.git_version.startswith("v1.37."), version.git_version
    assert (version.major, version.minor) == ("1", "37")


def test_fake_gpu_nodes_match_the_topology_file(kube: Any) -> None:
    from kubernetes import client

    pools = yaml.safe_load(TOPOLOGY.read_text())["pools"]
    nodes = {n.metadata.name: n for n in client.CoreV1Api(kube).list_node().items}
    cliques: dict[str, set[str]] = {}
    for pool in pools:
        for rack in pool["racks"]:
            for i in range(1, pool["nodesPerRack"] + 1):
                name = f"{pool['name']}-{rack['name']}-{i}"
                assert name in nodes, f"node {name} missing; nodes: {sorted(nodes)}"
                node = nodes[name]
                labels = node.metadata.labels
                assert node.metadata.annotations["kwok.x-k8s.io/node"] == "fake"
                assert node.status.allocatable["nvidia.com/gpu"] == str(pool["gpusPerNode"])
                assert labels["capstan.dev/rack"] == rack["name"]
                assert labels["capstan.dev/block"] == rack["block"]
                assert labels["topology.kubernetes.io/zone"] == rack["zone"]
                assert labels["nvidia.com/gpu.product"] == pool["product"]
                ready = {c.type: c.status for c in node.status.conditions}["Ready"]
                assert ready == "True", f"{name} is not Ready (kwok manages it)"
                cliques.setdefault(pool["nvlink"], set()).add(labels["nvidia.com/gpu.clique"])
    hgx = sum(p["nodesPerRack"] * len(p["racks"]) for p in pools if p["nvlink"] == "node")
    assert len(cliques["node"]) == hgx, "every HGX node is its own NVLink domain"
    assert len(cliques["rack"]) == sum(len(p["racks"]) for p in pools if p["nvlink"] == "rack")


def test_third_party_crds_are_established(kube: Any) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(kube)
    for crd in ("volumesnapshots.snapshot.storage.k8s.io", "volumesnapshotclasses.snapshot.storage.k8s.io",
                "httproutes.gateway.networking.k8s.io", "gateways.gateway.networking.k8s.io"):
        conditions = {c.type: c.status for c in ext.read_custom_resource_definition(crd).status.conditions}
        assert conditions.get("Established") == "True", crd


def test_pod_is_scheduled_runs_and_is_garbage_collected_with_its_owner(kube: Any, namespace: str) -> None:
    from kubernetes import client

    core = client.CoreV1Api(kube)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_pod(namespace, pod_manifest("pinned", "hgx-r2-3", ownerReferences=[ref]))

    pod = running_pod(core, namespace, "pinned")
    assert pod.spec.node_name == "hgx-r2-3"
    scheduled = {c.type: c.status for c in pod.status.conditions}.get("PodScheduled")
    assert scheduled == "True"
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=pinned").items
    scheduled_by = {e.reporting_component or e.source.component for e in events if e.reason == "Scheduled"}
    assert scheduled_by == {"default-scheduler"}, [(e.reason, e.reporting_component) for e in events]

    core.delete_namespaced_config_map("owner", namespace)
    wait_for(gone(lambda: core.read_namespaced_pod("pinned", namespace)), what="the pod's garbage collection")


def test_deployment_makes_a_replicaset_and_running_pods(kube: Any, namespace: str) -> None:
    from kubernetes import client

    apps, core = client.AppsV1Api(kube), client.CoreV1Api(kube)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"nodeSelector": {"capstan.dev/rack": "nvl72"},
                                  "containers": [{"name": "web", "image": "registry.invalid/web:1"}]}},
        },
    })
    wait_for(lambda: apps.read_namespaced_deployment("web", namespace),
             lambda d: (d.status.available_replicas or 0) == 2, what="2 available replicas")
    (rs,) = apps.list_namespaced_replica_set(namespace, label_selector="app=web").items
    assert rs.metadata.owner_references[0].kind == "Deployment"
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2
    assert all(p.status.phase == "Running" and p.metadata.owner_references[0].name == rs.metadata.name
               for p in pods)
    assert all(p.spec.node_name.startswith("gb200-nvl72-") for p in pods)


def test_serviceaccount_token_authenticates_and_rbac_is_enforced(kube: Any, namespace: str) -> None:
    import kubernetes
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, rbac = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    })
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token

    config = client.Configuration()
    config.host = kube.configuration.host
    config.ssl_ca_cert = kube.configuration.ssl_ca_cert
    config.api_key = {"authorization": f"Bearer {token}"}
    with kubernetes.client.ApiClient(config) as as_sa:
        review = client.AuthenticationV1Api(as_sa).create_self_subject_review({})
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:reader"
        # RBAC: listing pods is granted (the role binding is picked up within moments) ...
        wait_for(lambda: client.CoreV1Api(as_sa).list_namespaced_pod(namespace), lambda _: True,
                 what="the Role to take effect")
        # ... deleting them and reading secrets is not.
        sa_core = client.CoreV1Api(as_sa)
        for forbidden in (lambda: sa_core.delete_collection_namespaced_pod(namespace),
                          lambda: sa_core.list_namespaced_secret(namespace)):
            with pytest.raises(ApiException) as err:
                forbidden()
            assert err.value.status == 403, err.value


def test_validating_admission_webhooks_are_called(kube: Any, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    admission, core = client.AdmissionregistrationV1Api(kube), client.CoreV1Api(kube)
    name = f"capstan-cp-{namespace}"
    # No server listens on port 1: a called webhook with failurePolicy Fail rejects the request.
    admission.create_validating_webhook_configuration({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "deny.capstan.dev",
            "clientConfig": {"url": "https://127.0.0.1:1/validate"},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 2,
        }],
    })
    try:
        def rejected() -> str:
            try:
                core.create_namespaced_config_map(namespace, {"metadata": {"generateName": "probe-"}})
            except ApiException as exc:
                return str(exc.body)
            return ""

        body = wait_for(rejected, lambda b: "deny.capstan.dev" in b, what="the webhook to be called")
        assert "failed calling webhook" in body
    finally:
        admission.delete_validating_webhook_configuration(name)


def test_pod_final_states_set_by_kwok_and_by_the_test(kube: Any, namespace: str) -> None:
    from kubernetes import client

    core = client.CoreV1Api(kube)
    annotations = {f"{FAIL_LABEL}/exit-code": "137", f"{FAIL_LABEL}/delay": "100"}
    core.create_namespaced_pod(namespace, pod_manifest(
        "fails", "hgx-r1-1", labels={FAIL_LABEL: "true"}, annotations=annotations))
    core.create_namespaced_pod(namespace, pod_manifest("succeeds", "hgx-r1-2"))

    failed = wait_for(lambda: core.read_namespaced_pod("fails", namespace),
                      lambda p: p.status.phase == "Failed", what="kwok to fail the labelled pod")
    assert failed.status.container_statuses[0].state.terminated.exit_code == 137

    running_pod(core, namespace, "succeeds")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.patch_namespaced_pod_status("succeeds", namespace, {"status": {
        "phase": "Succeeded",
        "containerStatuses": [{"name": "main", "image": "registry.invalid/never-pulled:1", "imageID": "",
                               "ready": False, "restartCount": 0,
                               "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                        "startedAt": now, "finishedAt": now}}}],
    }})
    time.sleep(2)  # kwok would have acted by now had a stage matched the Succeeded pod
    pod = core.read_namespaced_pod("succeeds", namespace)
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_job_pods_are_completed_by_kwok(kube: Any, namespace: str) -> None:
    from kubernetes import client

    batch = client.BatchV1Api(kube)
    batch.create_namespaced_job(namespace, {
        "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"capstan.dev/rack": "r1"},
            "containers": [{"name": "main", "image": "registry.invalid/job:1"}],
        }}},
    })
    job = wait_for(lambda: batch.read_namespaced_job("once", namespace),
                   lambda j: (j.status.succeeded or 0) == 1, what="the Job to succeed")
    complete = {c.type: c.status for c in job.status.conditions}
    assert complete.get("Complete") == "True"
