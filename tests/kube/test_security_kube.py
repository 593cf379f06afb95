"""The real operator against the emulated API server: NetworkPolicies and the non-root refusal."""

from __future__ import annotations

from typing import Any

import pytest
from tests.api.bodies import make_modelserving
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import wait_for

from capstan.kube.resources import DEPLOYMENTS, MODELSERVINGS, NETWORK_POLICIES, PODS
from capstan.labels import LABEL_JOB_UID, LABEL_SERVING
from capstan.security import operator_peer

pytestmark = pytest.mark.timeout(120)

# What the kubelet reports when runAsNonRoot meets an image whose USER is root
# (k8s.io/kubernetes pkg/kubelet/kuberuntime verifyRunAsNonRoot).
ROOT_IMAGE = 'container has runAsNonRoot and image will run as root (pod: "default/{pod}", container: worker)'


async def test_gang_network_policy_created_with_the_gang(
    cluster: Cluster, env: sc.Env, operator: None
) -> None:
    await cluster.api.create(sc.job_body(env, "np", networkPolicy={}))
    pods = await sc.wait_pods(env, "np", 2)
    policy = await wait_for(lambda: cluster.api.get(NETWORK_POLICIES, env.namespace, "np-workers"),
                            what="the gang's NetworkPolicy")
    job = await sc.get_job(env, "np")
    assert job is not None
    uid = job["metadata"]["uid"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == uid
    assert policy["spec"]["podSelector"] == {"matchLabels": {LABEL_JOB_UID: uid}}
    gang, metrics = policy["spec"]["ingress"]
    assert gang == {"from": [{"podSelector": {"matchLabels": {LABEL_JOB_UID: uid}}}]}
    assert metrics["ports"] == [{"protocol": "TCP", "port": 9400}]
    # the operator reads rank 0's checkpoint progress there (issue: save before stop)
    assert operator_peer() in metrics["from"]
    # Every worker is selected by the policy and carries the secure defaults.
    for pod in pods:
        assert pod["metadata"]["labels"][LABEL_JOB_UID] == uid
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


async def test_no_network_policy_unless_asked(cluster: Cluster, env: sc.Env, operator: None) -> None:
    await cluster.api.create(sc.job_body(env, "open"))
    await sc.wait_pods(env, "open", 2)
    assert await cluster.api.list_objects(NETWORK_POLICIES, env.namespace) == []


async def test_image_running_as_root_fails_the_job_with_the_fix(
    cluster: Cluster, env: sc.Env, operator: None
) -> None:
    await cluster.api.create(sc.job_body(env, "rooted"))
    pods = await sc.wait_pods(env, "rooted", 2)
    name = pods[1]["metadata"]["name"]
    waiting = {"reason": "CreateContainerConfigError", "message": ROOT_IMAGE.format(pod=name)}
    container = {"name": "worker", "ready": False, "restartCount": 0, "state": {"waiting": waiting}}
    await cluster.api.patch_status(
        PODS, env.namespace, name, {"phase": "Pending", "containerStatuses": [container]}
    )
    job = await sc.wait_job(env, "rooted", sc.phase_is("Failed"), "Failed")
    failed = sc.condition(job, "Failed")
    assert failed["reason"] == "RunAsNonRoot"
    assert f"refused to start worker {name}" in failed["message"]
    assert "image will run as root" in failed["message"]
    assert "spec.securityContext.runAsUser" in failed["message"]


    async def warned() -> bool:  # the pass posts its Events after writing the status
        return "RunAsNonRoot" in await sc.event_reasons(env, "rooted")

    await wait_for(warned, what="a RunAsNonRoot Event")
    # The waiting pods are removed (they hold their GPUs while they wait), and no restart follows.
    await wait_for(lambda: _none_left(cluster, env, "rooted"), what="worker pods deleted")
    assert sc.status(job)["restarts"] == 0


async def _none_left(cluster: Cluster, env: sc.Env, name: str) -> bool:
    pods = await sc.pods_of(env, name)
    return all(p["metadata"].get("deletionTimestamp") for p in pods)


def _serving(**spec: Any) -> dict[str, Any]:
    return make_modelserving("gpt").namespace("default").pvc("models").spec(gpu=False, **spec).obj()


async def test_serving_network_policy_follows_the_spec(cluster: Cluster, operator: None) -> None:
    api = cluster.api
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}}}
    await api.create(_serving(networkPolicy={"clientsFrom": [gateway]}))
    policy = await wait_for(lambda: api.get(NETWORK_POLICIES, "default", "gpt"), what="NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {LABEL_SERVING: "gpt"}}
    clients, operator_rule, metrics = policy["spec"]["ingress"]
    assert clients == {"from": [gateway], "ports": [{"protocol": "TCP", "port": "http"}]}
    operator_pods = {"matchLabels": {"app.kubernetes.io/component": "operator"}}
    assert operator_rule["from"][0]["podSelector"] == operator_pods
    assert metrics["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    # The policy is created before the servers: wait for the Deployment too.
    (before,) = await wait_for(lambda: api.list_objects(DEPLOYMENTS, "default", {LABEL_SERVING: "gpt"}),
                               what="the revision Deployment")

    # Dropping spec.networkPolicy deletes the policy; the servers are not rolled out again for it.
    await api.patch(MODELSERVINGS, "default", "gpt", {"spec": {"networkPolicy": None}})

    async def gone() -> bool:
        return await api.get(NETWORK_POLICIES, "default", "gpt") is None

    await wait_for(gone, what="NetworkPolicy deleted")
    (after,) = await api.list_objects(DEPLOYMENTS, "default", {LABEL_SERVING: "gpt"})
    assert after["metadata"]["name"] == before["metadata"]["name"]
