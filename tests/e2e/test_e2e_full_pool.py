"""Scale-out through the scale subresource, then a zero-surge rollout on a GPU pool with nothing
spare, on the real control plane.

The ModelServing runs on the fake GB200 rack only (18 nodes of 4 GPUs, manifests/dev/topology.yaml),
one 4-GPU replica per node. ``kubectl scale`` takes it to all 18 nodes: no GPU of the rack is left.
A new revision then rolls out with ``rollout.maxSurge: 0``: each step first stops stable replicas,
then starts canary ones in the freed GPUs, so the revisions never hold more than 18 pods and never
wait for GPUs that do not exist.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests.api.bodies import make_modelserving
from tests.kube import scenarios as sc
from tests.support.kube import wait_for

from capstan.kube.client import ApiClient
from capstan.kube.resources import MODELSERVINGS
from capstan.labels import LABEL_SERVING

pytestmark = pytest.mark.e2e

GB200 = {"nvidia.com/gpu.product": "NVIDIA-GB200"}
WAIT = 4 * sc.TIMEOUT


async def test_scale_out_then_a_zero_surge_rollout_on_a_full_rack(
    env: sc.Env, api: ApiClient, cluster: Any
) -> None:
    ns = env.namespace
    await api.create(
        make_modelserving("llm")
        .namespace(ns)
        .uri("hf://org/model")
        .replicas(2)
        .spec(
            gpu=True,
            tensorParallel=4,
            nodeSelector=GB200,
            rollout={"maxSurge": 0, "steps": [{"weight": 50, "pause": "2s"}]},
        )
        .obj()
    )

    async def status(check: Any, what: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            obj = await api.get(MODELSERVINGS, ns, "llm")
            st = (obj or {}).get("status") or {}
            return st if check(st) else None

        return await wait_for(probe, WAIT, what=what)

    first = await status(lambda s: s.get("phase") == "Ready" and s.get("replicas") == 2, "2 replicas Ready")
    stable = first["stableRevision"]
    # kubectl scale: the ModelServing's scale subresource, as an HPA or a user would use it
    await asyncio.to_thread(cluster.kubectl, "scale", "modelserving/llm", "-n", ns, "--replicas=18")
    await status(lambda s: s.get("replicas") == 18 and s.get("phase") == "Ready", "18 replicas Ready")

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
                and s.get("replicas") == 18
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
            "replicas": 18,
            "ready": 18,
            "model": done["revisions"][0]["model"],
        }
    ]
    assert live and max(live) <= 18  # bound GPU pods never beyond the rack's 18 nodes
