"""The watch-fed placement caches against the emulated API server: listed once, kept current by
watch events, fed by the operator's own writes, and placement passes that no longer list the cluster."""

from __future__ import annotations

from typing import Any

from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import test_client as client_for
from tests.support.kube import wait_for

from capstan.kube.cache import ClusterCache
from capstan.kube.resources import NODES, PODS
from capstan.labels import LABEL_JOB_UID


async def until(check: Any, what: str) -> None:
    """Wait up to 10 s for the plain predicate ``check``."""

    async def probe() -> bool:
        return bool(check())

    await wait_for(probe, 10, what=what)


def pod(
    name: str, gpus: int = 0, node: str | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "c",
                "image": "busybox",
                "resources": resources,
                "env": [{"name": "BIG", "value": "x" * 1000}],
            }
        ]
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": spec,
    }


async def test_reflectors_list_then_follow_watch_events_and_keep_only_gpu_or_job_pods(
    cluster: Cluster, add_gpu_node: Any
) -> None:
    await add_gpu_node("n1", gpus=8, clique="c1")
    await cluster.api.create(pod("gpu-a", gpus=2, node="n1"))
    await cluster.api.create(pod("plain"))  # no GPUs, no TrainingJob: not kept
    api = client_for(cluster.url)
    cache = ClusterCache.for_client(api)
    cache.start()
    try:
        assert await cache.wait_synced(10)
        assert set(cache.nodes.objects) == {"n1"}
        assert set(cache.pods.objects) == {"default/gpu-a"}
        kept = cache.pods.objects["default/gpu-a"]
        assert kept["spec"]["nodeName"] == "n1" and "env" not in kept["spec"]["containers"][0]  # slim
        # changes arrive by watch: a new GPU pod, a worker pod without GPUs, a deleted node
        await cluster.api.create(pod("gpu-b", gpus=4, node="n1"))
        await cluster.api.create(pod("worker", labels={LABEL_JOB_UID: "u1"}))
        await cluster.api.delete(NODES, None, "n1")
        await until(
            lambda: (
                set(cache.pods.objects) == {"default/gpu-a", "default/gpu-b", "default/worker"}
                and not cache.nodes.objects
            ),
            "watch events applied",
        )
        assert cache.node_known("n1") is False
        await cluster.api.delete(PODS, "default", "gpu-a")
        await until(lambda: "default/gpu-a" not in cache.pods.objects, "pod deletion seen")
        assert cache.pods.lists == 1 and cache.pods.events >= 3  # one list, then events only
    finally:
        await cache.stop()
        await api.close()


async def test_writes_are_assumed_at_once_and_older_events_do_not_undo_them(cluster: Cluster) -> None:
    api = client_for(cluster.url)
    cache = ClusterCache.for_client(api)
    cache.start()
    try:
        assert await cache.wait_synced(10)
        created = await api.create(pod("gpu-c", gpus=8, node="n9"))
        # in the cache straight from the create's answer, whatever the watch has delivered yet
        assert cache.pods.get("default/gpu-c") is not None
        older = {
            **created,
            "metadata": {
                **created["metadata"],
                "resourceVersion": str(int(created["metadata"]["resourceVersion"]) - 1),
            },
        }
        cache.pods.apply({"type": "DELETED", "object": older})  # a stale event for an older namesake
        assert cache.pods.get("default/gpu-c") is not None
    finally:
        await cache.stop()
        await api.close()


async def test_placement_passes_read_the_cache_not_cluster_wide_lists(
    cluster: Cluster, env: sc.Env, add_gpu_node: Any
) -> None:
    for i in range(4):
        await add_gpu_node(f"n{i}", gpus=8, clique=f"c{i // 2}")
    async with cluster.operator():
        for i in range(6):
            await env.api.create(sc.job_body(env, f"job-{i}", workers=2, gpusPerWorker=4))
        for i in range(4):
            await sc.wait_pods(env, f"job-{i}", 2)
        for i in (4, 5):
            await sc.wait_job(env, f"job-{i}", sc.phase_is("Queued"), "queued: the four nodes are full")
    cluster_wide = [
        r
        for r in cluster.emulator
        if r.action is not None
        and r.action.value == "LIST"
        and r.namespace is None
        and r.resource is not None
        and r.resource.plural in ("pods", "nodes", "trainingjobs")
        and r.headers.get("User-Agent", "").startswith("capstan/")
    ]
    # one list per kind when the caches start (six gangs asked, and queued ones ask again)
    assert sorted(r.resource.plural for r in cluster_wide) == ["nodes", "pods", "trainingjobs"]
