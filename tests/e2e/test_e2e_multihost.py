"""Multi-host ModelServing replicas on the real control plane.

Without LeaderWorkerSet: Capstan's groups. The operator writes a ControllerRevision per revision,
places each group with the topology placer inside one NVLink clique of the fake GB200 rack
(manifests/dev/topology.yaml: 18 nodes of 4 GPUs, one clique), creates its pods pinned there;
kube-scheduler binds them, kwok runs them. A group whose pod goes away is replaced whole, and the
garbage collector removes the pods with their ControllerRevision when the ModelServing goes.

With LeaderWorkerSet's CRD (v0.7.0, pinned in hack/controlplane/crds): the LeaderWorkerSet Capstan
renders passes the API server's validation of upstream's schema (no LWS controller runs here).
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.api.bodies import make_modelserving
from tests.kube import scenarios as sc
from tests.support.kube import wait_for

from capstan.api.modelserving import ModelServing
from capstan.kube.client import ApiClient
from capstan.kube.modelserving import served
from capstan.kube.resources import MODELSERVINGS, ApiResource
from capstan.kube.servinggroups import CONTROLLERREVISIONS, LEADERWORKERSETS
from capstan.labels import LABEL_GROUP, LABEL_GROUP_OF, LABEL_GROUP_RANK
from capstan.serving.plan import Observed, plan_modelserving

pytestmark = pytest.mark.e2e

NAME = "big"
NODES = ApiResource("", "v1", "nodes", "Node", namespaced=False)
# TP=16 over pods of 4 GPUs: groups of 4 pods that must share an NVLink clique.
SPEC = {"runtime": "sglang", "tensorParallel": 16, "gpusPerPod": 4}


async def group_pods(api: ApiClient, ns: str) -> list[dict[str, Any]]:
    pods = await api.list_pods(ns, {LABEL_GROUP_OF: NAME})
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def by_group(pods: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """group -> rank -> pod uid."""
    out: dict[str, dict[str, str]] = {}
    for p in pods:
        labels = p["metadata"]["labels"]
        out.setdefault(labels[LABEL_GROUP], {})[labels[LABEL_GROUP_RANK]] = p["metadata"]["uid"]
    return out


async def running_groups(api: ApiClient, ns: str, groups: int) -> list[dict[str, Any]]:
    async def probe() -> tuple[list[dict[str, Any]]] | None:
        pods = await group_pods(api, ns)
        up = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        return (pods,) if len(pods) == len(up) == groups * 4 else None

    (pods,) = await wait_for(probe, sc.TIMEOUT, what=f"{groups} running groups of 4 pods")
    return pods


async def test_groups_are_placed_in_one_clique_restarted_whole_and_collected(
    env: sc.Env, api: ApiClient
) -> None:
    ns = env.namespace
    await api.create(
        make_modelserving(NAME).namespace(ns).uri("hf://org/model").replicas(2).spec(**SPEC).obj()
    )
    pods = await running_groups(api, ns, 2)
    (cr,) = await api.list_objects(CONTROLLERREVISIONS, ns, {"capstan.dev/modelserving": NAME})
    assert cr["data"]["size"] == 4 and cr["data"]["policy"] == "Required"
    cliques: dict[str, set[str]] = {}
    for p in pods:
        # bound by kube-scheduler to the node Capstan's placer pinned it to, owned by the revision
        node = await api.get(NODES, None, p["spec"]["nodeName"])
        assert node is not None and node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-GB200"
        cliques.setdefault(p["metadata"]["labels"][LABEL_GROUP], set()).add(
            node["metadata"]["labels"]["nvidia.com/gpu.clique"]
        )
        assert [(o["kind"], o["name"]) for o in p["metadata"]["ownerReferences"]] == [
            ("ControllerRevision", cr["metadata"]["name"])
        ]
        assert p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert all(len(c) == 1 for c in cliques.values())

    def ready(st: dict[str, Any]) -> bool:
        return st.get("phase") == "Ready" and st.get("replicas") == 2

    async def status() -> dict[str, Any] | None:
        obj = await api.get(MODELSERVINGS, ns, NAME)
        st = (obj or {}).get("status") or {}
        return st if ready(st) else None

    await wait_for(status, sc.TIMEOUT, what="Ready with 2 groups")

    # A worker of group 1 goes away: group 1 is made again, whole; group 0 is untouched.
    before = by_group(pods)
    worker = next(
        p
        for p in pods
        if p["metadata"]["labels"][LABEL_GROUP] == "1" and p["metadata"]["labels"][LABEL_GROUP_RANK] == "2"
    )
    await api.delete_pod(ns, worker["metadata"]["name"])

    async def remade() -> dict[str, dict[str, str]] | None:
        now = by_group(await running_groups(api, ns, 2))
        fresh = set(now.get("1", {}).values()).isdisjoint(before["1"].values())
        return now if fresh and len(now.get("1", {})) == 4 else None

    after = await wait_for(remade, sc.TIMEOUT, what="group 1 restarted as a unit")
    assert after["0"] == before["0"]
    events = [e for e in await api.list_objects(sc.EVENTS, ns) if e.get("reason") == "GroupRestarted"]
    assert events and "group 1 restarted as a unit" in events[0]["message"]

    # Deleting the ModelServing collects the ControllerRevision, and through it the pods.
    await api.delete(MODELSERVINGS, ns, NAME)

    async def gone() -> bool:
        left = await api.list_pods(ns, {LABEL_GROUP_OF: NAME})
        return not left and not await api.list_objects(
            CONTROLLERREVISIONS, ns, {"capstan.dev/modelserving": NAME}
        )

    await wait_for(gone, sc.TIMEOUT, what="the groups collected with the ModelServing")


async def test_the_rendered_leaderworkerset_passes_upstreams_schema(
    env: sc.Env, api: ApiClient, cluster: Any
) -> None:
    from scripts.cluster import module_dir

    crd = (
        module_dir("crds", "sigs.k8s.io/lws")
        / "config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml"
    )
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    # served once the CRD is established (kubectl wait may look before the CRD has any condition)
    await wait_for(lambda: served(api, LEADERWORKERSETS), sc.TIMEOUT, what="LeaderWorkerSet served")
    try:
        body = make_modelserving(NAME).namespace(env.namespace).uri("hf://org/model").replicas(2)
        ms = ModelServing.model_validate(
            {
                **body.spec(**SPEC).obj(),
                "metadata": {
                    "name": NAME,
                    "namespace": env.namespace,
                    "uid": "00000000-0000-0000-0000-000000000001",
                    "generation": 1,
                },
            }
        )
        plan = plan_modelserving(ms, Observed(), datetime.now(UTC), lws=True)
        (lws,) = [o for o in plan.objects if o["kind"] == "LeaderWorkerSet"]
        path = LEADERWORKERSETS.path(env.namespace)
        made = await api.request("POST", path, body=json.loads(json.dumps(lws)), params={"dryRun": "All"})
        tpl = made["spec"]["leaderWorkerTemplate"]
        assert tpl["size"] == 4 and tpl["restartPolicy"] == "RecreateGroupOnPodRestart"
        affinity = tpl["workerTemplate"]["spec"]["affinity"]["podAffinity"]
        assert affinity["requiredDuringSchedulingIgnoredDuringExecution"][0]["matchLabelKeys"] == [
            "leaderworkerset.sigs.k8s.io/group-key"
        ]
        # upstream's schema keeps every field Capstan sets (nothing pruned)
        assert (
            tpl["leaderTemplate"]["spec"]["containers"][0]["args"]
            == lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["args"]
        )
    finally:
        with contextlib.suppress(Exception):
            cluster.kubectl("delete", "crd", "leaderworkersets.leaderworkerset.x-k8s.io", "--wait=true")


def test_lws_crd_is_pinned_beside_the_others() -> None:
    go_mod = (Path(__file__).parents[2] / "hack/controlplane/crds/go.mod").read_text()
    assert "sigs.k8s.io/lws v0.7.0" in go_mod
