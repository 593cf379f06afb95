"""Scale-out through the scale subresource, then a zero-surge rollout on a GPU pool with nothing
spare, on the real control plane.

The ModelServing runs on four nodes of the fake GB200 rack only (4 GPUs each,
manifests/dev/topology.yaml; labelled for this test and chosen by spec.nodeSelector), one 4-GPU
replica per node. ``kubectl scale`` takes it to all four: no GPU of those nodes is left. A new
revision then rolls out with ``rollout.maxSurge: 0``: each step first stops stable replicas, then
starts canary ones in the freed GPUs, so the revisions never hold more than 4 pods and never wait
for GPUs that do not exist (with the default surge the canary's pod could never be scheduled, and
the rollout would be rolled back at its deadline).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests.api.bodies import make_modelserving
from tests.kube import scenarios as sc
from tests.support.kube import wait_object

from capstan.kube.client import ApiClient
from capstan.kube.resources import MODELSERVINGS
from capstan.labels import LABEL_SERVING

pytestmark = pytest.mark.e2e

NODES = [f"gb200-nvl72-{i}" for i in range(1, 5)]
POOL = "capstan.dev/e2e-pool"
WAIT = 4 * sc.TIMEOUT


async def test_scale_out_then_a_zero_surge_rollout_on_full_nodes(
    env: sc.Env, api: ApiClient, cluster: Any
) -> None:
    await asyncio.to_thread(cluster.kubectl, "label", "node", *NODES, f"{POOL}=full", "--overwrite")
    try:
        await _scale_out_then_roll_out(env, api, cluster)
    finally:
        await asyncio.to_thread(cluster.kubectl, "label", "node", *NODES, f"{POOL}-")


async def _scale_out_then_roll_out(env: sc.Env, api: ApiClient, cluster: Any) -> None:
    ns = env.namespace
    await api.create(
        make_modelserving("llm")
        .namespace(ns)
        .uri("hf://org/model")
        .replicas(2)
        .spec(
            gpu=True,
            tensorParallel=4,
            nodeSelector={POOL: "full"},
            rollout={"maxSurge": 0, "steps": [{"weight": 50, "pause": "2s"}]},
        )
        .obj()
    )

    async def status(check: Any, what: str) -> dict[str, Any]:
        def holds(obj: dict[str, Any]) -> Any:
            return check(obj.get("status") or {})

        obj = await wait_object(api, MODELSERVINGS, ns, "llm", holds, WAIT, what)
        return dict(obj["status"])

    first = await status(lambda s: s.get("phase") == "Ready" and s.get("replicas") == 2, "2 replicas Ready")
    stable = first["stableRevision"]
    # kubectl scale: the ModelServing's scale subresource, as an HPA or a user would use it
    await asyncio.to_thread(cluster.kubectl, "scale", "modelserving/llm", "-n", ns, "--replicas=4")
    await status(lambda s: s.get("replicas") == 4 and s.get("phase") == "Ready", "4 replicas Ready")

    live: list[int] = []

    async def count_pods() -> None:
        while True:
            pods = await api.list_pods(ns, {LABEL_SERVING: "llm"})
            live.append(
                sum(
                    1
                    for p in pods
                    if (p.get("spec") or {}).get("nodeName")
                    and (p.get("status") or {}).get("phase") in ("Pending", "Running")
                    and not p["metadata"].get("deletionTimestamp")
                )
            )
            await asyncio.sleep(0.5)

    counter = asyncio.create_task(count_pods())
    try:
        await api.patch(MODELSERVINGS, ns, "llm", {"spec": {"env": [{"name": "V", "value": "2"}]}})
        done = await status(
            lambda s: (
                s.get("stableRevision") not in (None, stable)
                and not s.get("canaryRevision")
                and s.get("replicas") == 4
                and s.get("phase") == "Ready"
            ),
            "the new revision promoted",
        )
    finally:
        counter.cancel()
    assert done["revisions"] == [
        {
            "name": done["stableRevision"],
            "weight": 100,
            "replicas": 4,
            "ready": 4,
            "model": done["revisions"][0]["model"],
        }
    ]
    assert live and max(live) <= 4  # bound GPU pods never beyond the four nodes
