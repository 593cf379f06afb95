"""Failure rules, startup timeout and node quarantine: the real operator against the emulator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster

from capstan.kube.resources import PODS

AddNode = Callable[..., Awaitable[dict[str, Any]]]
XID = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus."


async def nodes(add_gpu_node: AddNode, count: int) -> None:
    for i in range(count):
        await add_gpu_node(f"n{i}", clique="a", rack="r1")


async def test_startup_timeout_places_the_gang_again_then_fails(env: sc.Env, add_gpu_node: AddNode) -> None:
    await nodes(add_gpu_node, 3)
    await sc.scenario_startup_timeout_replaces_then_fails(env, play_scheduler=True)


async def run(cluster: Cluster, env: sc.Env, pod: dict[str, Any]) -> None:
    """Play the scheduler and the kubelet: bind the pod where it was pinned, and run it."""
    await cluster.api.patch(
        PODS, env.namespace, pod["metadata"]["name"], {"spec": {"nodeName": sc.pinned(pod)}}
    )
    await sc.kubelet(env, pod, "Running")


async def test_gpu_error_quarantines_the_node_and_the_next_gang_avoids_it(
    cluster: Cluster, env: sc.Env, add_gpu_node: AddNode, operator: None
) -> None:
    await nodes(add_gpu_node, 3)
    await cluster.api.create(sc.job_body(env, "xid", workers=2, gpusPerWorker=8))
    pods = await sc.wait_pods(env, "xid", 2, attempt=0)
    for pod in pods:
        await run(cluster, env, pod)
    await sc.wait_job(env, "xid", sc.phase_is("Running"), "Running")
    broken = sc.pinned(pods[1])
    failed = {
        "phase": "Failed",
        "containerStatuses": [
            {
                "name": "worker",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": XID}},
            }
        ],
    }
    await cluster.api.patch_status(PODS, env.namespace, pods[1]["metadata"]["name"], failed)
    job = await sc.wait_job(env, "xid", lambda j: sc.status(j).get("attempt") == 1, "gang restarted")
    st = sc.status(job)
    assert (st["restarts"], st["preemptions"], st["hardwareRestarts"]) == (0, 0, 1)
    assert [(e["node"], e["reason"]) for e in st["excludedNodes"]] == [(broken, "GPUError")]
    assert sc.condition(job, "Running")["reason"] == "NodeFailure"
    new = await sc.wait_pods(env, "xid", 2, attempt=1)
    assert broken not in [sc.pinned(p) for p in new]  # the node is still there, and Ready: avoided
    await sc.wait_event(env, "xid", "NodeQuarantined")


async def test_fail_job_rule_fails_the_job(cluster: Cluster, env: sc.Env, operator: None) -> None:
    policy = {
        "maxRestarts": 3,
        "backoffSeconds": 0,
        "rules": [{"action": "FailJob", "exitCodes": [3], "messagePattern": "config"}],
    }
    await cluster.api.create(sc.job_body(env, "rule", failurePolicy=policy))
    pods = await sc.wait_pods(env, "rule", 2)
    failed = {
        "phase": "Failed",
        "containerStatuses": [
            {
                "name": "worker",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 3, "reason": "Error", "message": "bad config: lr"}},
            }
        ],
    }
    await cluster.api.patch_status(PODS, env.namespace, pods[0]["metadata"]["name"], failed)
    job = await sc.wait_job(env, "rule", sc.phase_is("Failed"), "Failed by the rule")
    assert sc.condition(job, "Failed")["reason"] == "FailureRule"
    assert "failurePolicy.rules[0]" in sc.condition(job, "Failed")["message"]
    assert sc.status(job)["restarts"] == 0
