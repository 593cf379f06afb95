"""The real TrainingJob operator against an emulated API server over HTTP."""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.kube.rbac_calls import rbac_calls
from tests.support.kube import wait_for

from capstan.kube.operator import start_metrics_server
from capstan.kube.resources import NODES, PODS, TRAININGJOBS
from capstan.labels import LABEL_ATTEMPT

AddNode = Callable[..., Awaitable[dict[str, Any]]]


@pytest.mark.parametrize("scenario", sc.CORE_SCENARIOS, ids=lambda f: f.__name__.removeprefix("scenario_"))
async def test_core_scenario(env: sc.Env, scenario: Callable[[sc.Env], Awaitable[None]]) -> None:
    await scenario(env)


def _pinned(pod: dict[str, Any]) -> str:
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return str(terms["nodeSelectorTerms"][0]["matchFields"][0]["values"][0])


async def test_gang_placed_in_one_nvlink_domain_or_queued(
    cluster: Cluster, env: sc.Env, add_gpu_node: AddNode, operator: None
) -> None:
    # clique a: 2 x 8 GPUs; clique b: 3 x 8 GPUs. A 2x8 gang best-fits clique a.
    for i in range(2):
        await add_gpu_node(f"a{i}", clique="a", rack="r1")
    for i in range(3):
        await add_gpu_node(f"b{i}", clique="b", rack="r1")
    policy = {"policy": "Required", "maxDomain": "nvlink"}
    await cluster.api.create(sc.job_body(env, "fits", workers=2, gpusPerWorker=8, topology=policy))
    pods = await sc.wait_pods(env, "fits", 2)
    job = await sc.wait_job(env, "fits", lambda j: sc.status(j).get("placement"), "placement")
    placement = sc.status(job)["placement"]
    assert placement["level"] == "nvlink" and placement["domain"] == "a"
    assert placement["nodes"] == ["a0", "a1"]
    assert [_pinned(p) for p in pods] == ["a0", "a1"]
    assert sc.condition(job, "Placed")["status"] == "True"
    assert pods[0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"

    # 4 x 8 GPUs fit no NVLink domain (b has 3 nodes left): Required waits, with the reason.
    await cluster.api.create(sc.job_body(env, "big", workers=4, gpusPerWorker=8, topology=policy))
    job = await sc.wait_job(env, "big", sc.phase_is("Queued"), "Queued")
    placed = sc.condition(job, "Placed")
    assert placed["status"] == "False" and placed["reason"] == "WaitingForCapacity" and placed["message"]
    assert await sc.pods_of(env, "big") == []

    # A second 2x8 gang must not reuse clique a's GPUs (its pods are pinned, not yet bound).
    await cluster.api.create(sc.job_body(env, "second", workers=2, gpusPerWorker=8, topology=policy))
    job = await sc.wait_job(env, "second", lambda j: sc.status(j).get("placement"), "placement")
    assert sc.status(job)["placement"]["domain"] == "b"


async def test_queue_head_reserved_small_gang_cannot_starve_it(
    cluster: Cluster, env: sc.Env, add_gpu_node: AddNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the starvation guard at once (default: after 24 h of waiting), read by the operator at startup
    monkeypatch.setenv("CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS", "0")
    async with cluster.operator():
        await _head_reserved_scenario(cluster, env, add_gpu_node)


async def _head_reserved_scenario(cluster: Cluster, env: sc.Env, add_gpu_node: AddNode) -> None:
    # one NVLink domain of 2 x 8 GPUs; a 4-GPU job holds half of one node
    for i in range(2):
        await add_gpu_node(f"n{i}", clique="a", rack="r1")
    await cluster.api.create(sc.job_body(env, "filler", workers=1, gpusPerWorker=4))
    (filler_pod,) = await sc.wait_pods(env, "filler", 1)
    await sc.kubelet(env, filler_pod, "Running")

    # the 2x8 gang cannot fit until the filler ends: it queues and heads the queue
    await cluster.api.create(sc.job_body(env, "big", workers=2, gpusPerWorker=8))
    await sc.wait_job(env, "big", sc.phase_is("Queued"), "Queued")

    # an 8-GPU gang would fit on the idle node right now, but that node is reserved for the head
    await cluster.api.create(sc.job_body(env, "small", workers=1, gpusPerWorker=8))
    small = await sc.wait_job(env, "small", sc.phase_is("Queued"), "Queued")
    placed = sc.condition(small, "Placed")
    assert placed["reason"] == "WaitingForCapacity"
    assert "reserved for the queue head default/big" in placed["message"]
    assert await sc.pods_of(env, "small") == []

    # the filler ends: the head starts (its GPUs are whole now); small still waits behind it
    await sc.kubelet(env, filler_pod, "Succeeded")
    big = await sc.wait_job(env, "big", lambda j: sc.status(j).get("placement"), "placement")
    assert sorted(sc.status(big)["placement"]["nodes"]) == ["n0", "n1"]
    assert len(await sc.wait_pods(env, "big", 2)) == 2
    small = await sc.wait_job(env, "small", sc.phase_is("Queued"), "Queued")
    assert await sc.pods_of(env, "small") == []


async def test_defragmentation_moves_a_checkpointed_gang_to_make_a_whole_node(
    cluster: Cluster, env: sc.Env, add_gpu_node: AddNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a gang may be moved right after it starts running (default: after 10 min of running)
    monkeypatch.setenv("CAPSTAN_MIGRATION_MIN_RUN_SECONDS", "0")
    monkeypatch.setenv("CAPSTAN_MIGRATION_DEFRAGMENT", "on")  # off by default
    async with cluster.operator():
        # "mover" (4 GPUs, checkpointed, so movable) runs on n0
        await add_gpu_node("n0", clique="a", rack="r1")
        volume = {"volume": {"size": "1Gi"}}
        await cluster.api.create(sc.job_body(env, "mover", workers=1, gpusPerWorker=4, checkpoint=volume))
        (first,) = await sc.wait_pods(env, "mover", 1, attempt=0)
        assert _pinned(first) == "n0"
        await sc.kubelet(env, first, "Running")
        await sc.wait_job(env, "mover", sc.phase_is("Running"), "Running")
        # n1 joins with half its GPUs taken by a pod Capstan does not manage: 4 + 4 GPUs idle
        await add_gpu_node("n1", clique="a", rack="r1")
        await cluster.api.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "other-team", "namespace": env.namespace},
            "spec": {"nodeName": "n1", "containers": [{
                "name": "main", "image": "registry.example/other:1",
                "resources": {"limits": {"nvidia.com/gpu": "4"}}}]},
            "status": {"phase": "Running"},
        })

        # an 8-GPU gang fits by count but on no node: the mover goes to n1, the gang gets n0
        await cluster.api.create(sc.job_body(env, "whole", workers=1, gpusPerWorker=8))
        moved = await sc.wait_job(env, "mover", lambda j: sc.status(j).get("moves") == 1, "moved")
        st = sc.status(moved)
        assert st["restarts"] == 0 and st["preemptions"] == 0 and st["movingSince"]
        assert sc.condition(moved, "Running")["reason"] == "Moved"
        assert "making room for default/whole" in sc.condition(moved, "Running")["message"]
        (second,) = await sc.wait_pods(env, "mover", 1, attempt=1)
        assert _pinned(second) == "n1"
        whole = await sc.wait_job(env, "whole", lambda j: sc.status(j).get("placement"), "placement")
        assert sc.status(whole)["placement"]["nodes"] == ["n0"]
        assert "Moved" in await sc.event_reasons(env, "mover")

        # the moved gang runs again: the move's downtime is credited, and it is not moved twice
        await sc.kubelet(env, second, "Running")
        moved = await sc.wait_job(env, "mover", lambda j: sc.status(j).get("phase") == "Running"
                                  and not sc.status(j).get("movingSince"), "running again")
        assert sc.status(moved)["moves"] == 1 and sc.status(moved)["movedSeconds"] >= 0
        # the move was recorded in the mover's status while pending, and cleared once carried out
        recorded = [(r.data.get("status") or {}).get("pendingMove") for r in cluster.emulator
                    if r.name == "mover" and r.subresource == "status" and isinstance(r.data, dict)
                    and "pendingMove" in (r.data.get("status") or {})]
        assert recorded[0]["nodes"] == ["n1"] and recorded[0]["forJob"] == "default/whole"
        await sc.wait_job(env, "mover", lambda j: "pendingMove" not in sc.status(j), "pendingMove cleared")


async def test_cpu_and_kueue_jobs_are_not_placed(
    cluster: Cluster, env: sc.Env, add_gpu_node: AddNode, operator: None
) -> None:
    await add_gpu_node("n0", clique="a")
    await cluster.api.create(sc.job_body(env, "cpu", workers=2))
    await cluster.api.create(sc.job_body(env, "kq", workers=2, gpusPerWorker=8, queueName="team-a"))
    for name in ("cpu", "kq"):
        pods = await sc.wait_pods(env, name, 2)
        assert all("affinity" not in p["spec"] for p in pods)
    kq = await sc.wait_job(env, "kq", lambda j: sc.condition(j, "Placed"), "Placed condition")
    assert sc.condition(kq, "Placed")["reason"] == "DeferredToKueue"
    assert (await sc.pods_of(env, "kq"))[0]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


async def test_node_lost_restarts_gang_uncounted(
    cluster: Cluster, env: sc.Env, add_gpu_node: AddNode, operator: None
) -> None:
    for i in range(3):
        await add_gpu_node(f"n{i}", clique=f"c{i}")
    await cluster.api.create(sc.job_body(env, "lost", workers=2, gpusPerWorker=8))
    pods = await sc.wait_pods(env, "lost", 2, attempt=0)
    for pod in pods:  # the scheduler binds them where they were pinned; they run
        await cluster.api.patch(
            PODS, env.namespace, pod["metadata"]["name"], {"spec": {"nodeName": _pinned(pod)}}
        )
        await sc.kubelet(env, pod, "Running")
    await sc.wait_job(env, "lost", sc.phase_is("Running"), "Running")
    victim = _pinned(pods[1])
    await cluster.api.delete(NODES, None, victim)
    job = await sc.wait_job(env, "lost", lambda j: sc.status(j).get("attempt") == 1, "gang restarted")
    st = sc.status(job)
    # blamed on the node: counted apart, and the node is quarantined for this job with an Event
    assert (st["restarts"], st["preemptions"], st["hardwareRestarts"]) == (0, 0, 1)
    assert [(e["node"], e["reason"]) for e in st["excludedNodes"]] == [(victim, "NodeLost")]
    assert sc.condition(job, "Running")["reason"] == "NodeFailure"
    new = await sc.wait_pods(env, "lost", 2, attempt=1)
    assert victim not in [_pinned(p) for p in new]
    assert "NodeQuarantined" in await sc.event_reasons(env, "lost")
    assert all(p["metadata"]["labels"][LABEL_ATTEMPT] == "1" for p in new)


async def test_node_deleted_while_the_operator_is_down_still_restarts_the_gang(
    cluster: Cluster, env: sc.Env, add_gpu_node: AddNode
) -> None:
    """Node loss is read from the cluster (pods bound to a Node that no longer exists), not from a
    deletion event only a running operator would have seen."""
    for i in range(3):
        await add_gpu_node(f"n{i}", clique=f"c{i}")
    async with cluster.operator():
        await cluster.api.create(sc.job_body(env, "gone", workers=2, gpusPerWorker=8))
        pods = await sc.wait_pods(env, "gone", 2, attempt=0)
        for pod in pods:
            await cluster.api.patch(
                PODS, env.namespace, pod["metadata"]["name"], {"spec": {"nodeName": _pinned(pod)}}
            )
            await sc.kubelet(env, pod, "Running")
        await sc.wait_job(env, "gone", sc.phase_is("Running"), "Running")
    victim = _pinned(pods[0])
    await cluster.api.delete(NODES, None, victim)  # no operator watching
    async with cluster.operator():
        job = await sc.wait_job(env, "gone", lambda j: sc.status(j).get("attempt") == 1, "gang restarted")
        assert [(e["node"], e["reason"]) for e in sc.status(job)["excludedNodes"]] == [(victim, "NodeLost")]
        new = await sc.wait_pods(env, "gone", 2, attempt=1)
        assert victim not in [_pinned(p) for p in new]


async def test_rbac_calls_of_core_scenario(cluster: Cluster, env: sc.Env) -> None:
    await sc.scenario_create(env)
    await sc.scenario_delete_cleans_up(env)
    calls = rbac_calls(cluster.emulator)
    # what the operator itself needs (kopf's watches and patches included)
    assert {
        ("watch", "capstan.dev", "trainingjobs", ""),
        ("list", "capstan.dev", "trainingjobs", ""),  # its passes read it from the watch-fed cache
        ("patch", "capstan.dev", "trainingjobs", ""),
        ("patch", "capstan.dev", "trainingjobs", "status"),
        ("list", "", "pods", ""),
        ("watch", "", "pods", ""),
        ("create", "", "pods", ""),
        ("delete", "", "pods", ""),
        ("create", "", "services", ""),
        ("create", "", "events", ""),
    } <= calls
    # and nothing that a namespaced Role for workloads would not cover, besides nodes and CRDs
    groups = {(g, r) for _, g, r, _ in calls}
    assert groups <= {
        ("capstan.dev", "trainingjobs"),
        ("capstan.dev", "modelservings"),
        ("", "pods"),
        ("", "services"),
        ("", "persistentvolumeclaims"),
        ("", "events"),
        ("", "nodes"),
        ("", "namespaces"),
        ("apps", "deployments"),
        ("autoscaling", "horizontalpodautoscalers"),  # ModelServing's watches
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    }, groups


async def test_operator_scoped_to_namespace_ignores_others(cluster: Cluster, env: sc.Env) -> None:
    for ns in ("team-a", "default"):
        await cluster.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    async with cluster.operator(namespaces=["team-a"]):
        other = sc.Env(api=cluster.api, namespace="team-a", operator=env.operator)
        await cluster.api.create(sc.job_body(other, "mine"))
        await cluster.api.create(sc.job_body(env, "not-mine"))
        await sc.wait_pods(other, "mine", 2)
        job = await sc.get_job(env, "not-mine")
        assert job is not None and not job.get("status")
        assert await sc.pods_of(env, "not-mine") == []


async def test_status_only_written_by_status_subresource(
    cluster: Cluster, env: sc.Env, operator: None
) -> None:
    await cluster.api.create(sc.job_body(env, "gitops"))
    await sc.wait_pods(env, "gitops", 2)
    await sc.wait_job(env, "gitops", sc.phase_is("Starting"), "Starting")
    spec_before = (await sc.get_job(env, "gitops") or {})["spec"]
    patches = [
        r
        for r in cluster.emulator
        if r.method == "PATCH"
        and r.resource == TRAININGJOBS_RES
        and r.headers.get("User-Agent") != "capstan-tests"
    ]
    for req in patches:
        if req.subresource == "status":
            assert set(req.data) - {"metadata"} == {"status"}
            assert set(req.data.get("metadata", {})) <= {"resourceVersion"}  # the emulator's bookkeeping
        else:  # kopf: finalizer and annotations only (JSON patch ops or merge patch on metadata)
            paths = [op["path"] for op in req.data] if isinstance(req.data, list) else list(req.data)
            assert all(p.startswith("/metadata") or p == "metadata" for p in paths), paths
    assert spec_before == sc.job_body(env, "gitops")["spec"]


TRAININGJOBS_RES = f"{TRAININGJOBS.group}/{TRAININGJOBS.version}/{TRAININGJOBS.plural}"


async def test_metrics_endpoint(cluster: Cluster, env: sc.Env, operator: None) -> None:
    await cluster.api.create(sc.job_body(env, "metered"))
    await sc.wait_job(env, "metered", sc.phase_is("Starting"), "Starting")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = await start_metrics_server(port, host="127.0.0.1")
    try:
        async with aiohttp.ClientSession() as http:

            async def scrape() -> str | None:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                gauge = re.search(
                    r'capstan_trainingjobs\{namespace="default",phase="Starting"\} ([0-9.]+)', text
                )
                return text if gauge and float(gauge.group(1)) >= 1 else None

            text = await wait_for(scrape, 10, what="phase gauge")
        assert 'capstan_reconcile_total{kind="TrainingJob",outcome="requeue"}' in text
        assert "capstan_reconcile_duration_seconds_bucket" in text
    finally:
        await runner.cleanup()


def test_replicas_get_distinct_peering_priorities() -> None:
    # Kopf freezes every replica when the top priority is shared: HA needs distinct ones.
    from capstan.config import OperatorConfig
    from capstan.kube.activities import peering_priority

    assert peering_priority(OperatorConfig.from_env({"CAPSTAN_PEERING_PRIORITY": "100"})) == 100
    assert len({peering_priority(OperatorConfig.from_env({})) for _ in range(20)}) > 1
