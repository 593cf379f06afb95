"""TrainingJob passes against the watch-fed caches (issue 16): with the caches synced a pass reads
its job, pods, Service and PVC from memory, not from the API server; and placement passes that run
at the same time never give two gangs the same GPUs, now that a gang's pods are created after the
placement lock is released."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import kopf
import pytest
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import set_pod_status, wait_for

from capstan.kube.cache import ClusterCache
from capstan.kube.client import USER_AGENT, ApiClient
from capstan.kube.placement import pinned_node
from capstan.kube.resources import TRAININGJOBS
from capstan.kube.trainingjob import init_state, reconcile

pytestmark = pytest.mark.timeout(120)

CACHED_KINDS = ("nodes", "pods", "trainingjobs", "services", "persistentvolumeclaims")


def _operator_requests(cluster: Cluster) -> list[Any]:
    return [r for r in cluster.emulator if r.headers.get("User-Agent", "").startswith(USER_AGENT)
            and r.action is not None and r.resource is not None]


def _reads_of_own_objects(cluster: Cluster, namespace: str) -> Counter[str]:
    """The operator's namespaced reads of TrainingJobs, pods, Services and PVCs, by kind and verb."""
    return Counter(
        f"{r.action.value} {r.resource.plural}"
        for r in _operator_requests(cluster)
        if r.namespace == namespace
        and r.action.value in ("FETCH", "LIST")
        and r.resource.plural in ("trainingjobs", "pods", "services", "persistentvolumeclaims")
    )


async def _caches_watching(cluster: Cluster) -> None:
    """Wait until the operator's caches have listed and watch every kind they hold."""

    async def probe() -> bool:
        watched = {r.resource.plural for r in _operator_requests(cluster)
                   if r.action.value == "WATCH" and r.namespace is None and "resourceVersion" in r.params
                   and r.params.get("resourceVersion")}
        return watched >= set(CACHED_KINDS)

    await wait_for(probe, sc.TIMEOUT, what="the caches watching")


@pytest.mark.parametrize("cache", ["on", "off"])
async def test_passes_read_job_pods_service_and_pvc_from_the_synced_cache(
    cluster: Cluster, env: sc.Env, add_gpu_node: Any, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    monkeypatch.setenv("CAPSTAN_PLACEMENT_CACHE", cache)
    await add_gpu_node("n0", gpus=8, clique="c0")
    async with cluster.operator():
        if cache == "on":
            await _caches_watching(cluster)
        await env.api.create(sc.job_body(env, "mem", workers=2, gpusPerWorker=2,
                                         checkpoint={"volume": {"size": "1Gi"}}))
        pods = await sc.wait_pods(env, "mem", 2)
        for pod in pods:  # each pod change wakes the job: a pass that must see it
            await set_pod_status(env.api, env.namespace, pod["metadata"]["name"], "Running")
        await sc.wait_job(env, "mem", sc.phase_is("Running"), "Running")
        # a change to the job itself wakes one more pass
        await env.api.patch(TRAININGJOBS, env.namespace, "mem", {"metadata": {"labels": {"poke": "1"}}})
        await asyncio.sleep(1.0)
    reads = _reads_of_own_objects(cluster, env.namespace)
    if cache == "on":
        # every pass read memory: no GET of the job, no list of its pods, no GET of its children
        assert reads == Counter(), reads
    else:  # the baseline reads them each pass (and shows this count sees them)
        assert reads["FETCH trainingjobs"] >= 3 and reads["LIST pods"] >= 3, reads
        assert reads["FETCH services"] >= 1 and reads["FETCH persistentvolumeclaims"] >= 1, reads


class SlowPodCreates(ApiClient):
    """An API client whose pod creates and TrainingJob status writes take ``delay_s`` (a loaded API
    server), counting how many of each are in flight at once."""

    def __init__(self, url: str, delay_s: float) -> None:
        super().__init__(url)
        self.delay_s = delay_s
        self.in_flight = 0
        self.most_in_flight = 0
        self.status_in_flight = 0
        self.most_status_in_flight = 0

    async def patch_status(self, res: Any, namespace: str | None, name: str, status: Any) -> dict[str, Any]:
        self.status_in_flight += 1
        self.most_status_in_flight = max(self.most_status_in_flight, self.status_in_flight)
        try:
            await asyncio.sleep(self.delay_s / 2)
            return await super().patch_status(res, namespace, name, status)
        finally:
            self.status_in_flight -= 1

    async def create(self, obj: Any) -> dict[str, Any]:
        if obj.get("kind") != "Pod":
            return await super().create(obj)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return await super().create(obj)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("cache", ["on", "off"])
async def test_concurrent_placement_passes_never_double_book_gpus(
    cluster: Cluster, env: sc.Env, add_gpu_node: Any, cache: str
) -> None:
    for i in range(3):
        await add_gpu_node(f"n{i}", gpus=8, clique=f"c{i}")
    uids = {}
    for i in range(6):  # 6 gangs of 2 workers x 4 GPUs on 3 nodes of 8: room for 3
        created = await env.api.create(sc.job_body(env, f"g{i}", workers=2, gpusPerWorker=4))
        uids[f"g{i}"] = created["metadata"]["uid"]
    api = SlowPodCreates(cluster.url, delay_s=1.0)
    memo = kopf.Memo()
    memo["api"], memo["wakeups"] = api, {}
    init_state(memo)
    clusters = ClusterCache.for_client(api) if cache == "on" else None
    if clusters is not None:
        clusters.start()
        assert await clusters.wait_synced(10)
        memo["cache"] = clusters
    logger = logging.getLogger("test")
    try:
        # every gang's first pass at once: each decides under the lock, then creates its pods
        await asyncio.gather(*(reconcile(api, env.namespace, name, uid, memo, logger)  # type: ignore[arg-type]
                               for name, uid in uids.items()))
    finally:
        if clusters is not None:
            await clusters.stop()
        await api.close()
    jobs = {name: await sc.get_job(env, name) for name in uids}
    phases = Counter(sc.status(j)["phase"] for j in jobs.values() if j is not None)
    assert phases == Counter({"Starting": 3, "Queued": 3}), phases
    booked: Counter[str] = Counter()
    for name, job in jobs.items():
        assert job is not None
        for node in sc.status(job).get("placement", {}).get("nodes", []):
            booked[node] += 4
        for pod in await sc.pods_of(env, name):
            assert pinned_node(pod) in sc.status(job)["placement"]["nodes"]
    assert booked == Counter({"n0": 8, "n1": 8, "n2": 8}), booked  # no node given more than it has
    # the gangs' pods were created side by side, not one gang at a time under the lock
    assert api.most_in_flight > 2
    # reading memory, the lock covers the decision only: the placed gangs' status writes overlapped
    # (their claims were held in memory meanwhile); listing, each write is made under the lock
    if cache == "on":
        assert api.most_status_in_flight > 1
    else:
        assert api.most_status_in_flight == 1


async def test_a_pod_memory_kept_after_its_deletion_does_not_hold_the_restart_back() -> None:
    """Memory shows a pod of the previous gang that the API server no longer has (a deletion the
    cache missed): the restart waits on that pod's going, so the pass asks the API server, which
    has none, rather than wait for an event that will never come."""
    from tests.api.bodies import make_trainingjob

    from capstan.api.loading import parse_object
    from capstan.api.trainingjob import TrainingJob
    from capstan.kube.trainingjob import _observe
    from capstan.labels import LABEL_ATTEMPT, LABEL_JOB_UID, LABEL_RANK

    body = make_trainingjob("j").namespace("ml").uid("u1").image("trainer:1", "python").workers(1).gpus(1)
    job = parse_object(body.status(phase="Restarting", attempt=1).obj())
    assert isinstance(job, TrainingJob)
    ghost = {"metadata": {"name": "j-0", "namespace": "ml",
                          "labels": {LABEL_JOB_UID: "u1", LABEL_ATTEMPT: "0", LABEL_RANK: "0"}},
             "spec": {}, "status": {"phase": "Failed"}}

    class Memory:
        def pods_of(self, uid: str) -> list[dict[str, Any]]:
            return [ghost]

        def node_known(self, name: str) -> bool | None:
            return None

        def children(self, res: Any) -> None:
            return None

    class Server:
        listed = 0

        async def list_pods(self, namespace: str, labels: Any) -> list[dict[str, Any]]:
            self.listed += 1
            return []

        async def get(self, res: Any, namespace: str, name: str) -> dict[str, Any] | None:
            return None  # the Service: not there yet

    server = Server()
    seen = await _observe(server, job, set(), {}, Memory())  # type: ignore[arg-type]
    assert seen.pods == [] and server.listed == 1
    # the current gang's own pods, as memory holds them: no read
    current = {**ghost, "metadata": {**ghost["metadata"], "labels": {**ghost["metadata"]["labels"],
                                                                      LABEL_ATTEMPT: "1"}},
               "status": {"phase": "Running"}}
    Memory.pods_of = lambda self, uid: [current]  # type: ignore[method-assign]
    seen = await _observe(server, job, set(), {}, Memory())  # type: ignore[arg-type]
    assert [p["metadata"]["name"] for p in seen.pods] == ["j-0"] and server.listed == 1
