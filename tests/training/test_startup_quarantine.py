"""Startup timeout and node quarantine, driven through the lifecycle and the placement queue."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from tests.kube.conftest import gpu_node
from tests.training.test_lifecycle import T0, Cluster, job

from capstan.api.trainingjob import ExcludedNode, TrainingJob
from capstan.kube.placement import QueueState, queue_pass, queue_snapshot
from capstan.training.lifecycle import PlacementDecision
from capstan.training.quarantine import exclude, keep_off

PLACED = PlacementDecision(placed=True, nodes=["n0", "n1"], level="rack", domain="r1")
UNSCHEDULABLE = [
    {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 1 Insufficient nvidia.com/gpu.",
    }
]


def gpu_job(**spec: Any) -> TrainingJob:
    return job(gpusPerWorker=8, **spec)


def bind(c: Cluster, name: str, node: str) -> None:
    c.pods[name]["spec"] = {**c.pods[name]["spec"], "nodeName": node}


def test_pending_workers_show_the_schedulers_reason_in_the_running_condition() -> None:
    c = Cluster(gpu_job())
    c.reconcile(placement=PLACED)
    c.pods["gpt-1"]["status"] = {"phase": "Pending", "conditions": UNSCHEDULABLE}
    bind(c, "gpt-0", "n0")
    c.pods["gpt-0"]["status"] = {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "worker",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling"}},
            }
        ],
    }
    plan = c.reconcile(T0 + timedelta(seconds=30))
    cond = next(x for x in plan.status.conditions if x.type == "Running")
    assert (cond.status, cond.reason) == ("False", "WorkersPending")
    assert "worker 1 not scheduled: 0/3 nodes are available: 1 Insufficient nvidia.com/gpu." in cond.message
    assert "worker 0 ImagePullBackOff: Back-off pulling" in cond.message
    assert plan.status.phase == "Starting" and "0/3 nodes" in plan.status.message
    assert plan.requeue_after is not None and plan.requeue_after <= 900 - 30  # woken at the deadline


def test_a_gang_not_running_by_the_timeout_is_placed_again_off_the_unbound_nodes() -> None:
    c = Cluster(gpu_job(startupTimeoutSeconds=300, failurePolicy={"maxRestarts": 0}))
    plan = c.reconcile(placement=PLACED)
    assert plan.status.gang_created == "2026-01-01T00:00:00Z"
    bind(c, "gpt-0", "n0")
    c.set_phase("Running", names=["gpt-0"])
    c.pods["gpt-1"]["status"] = {"phase": "Pending", "conditions": UNSCHEDULABLE}
    assert c.reconcile(T0 + timedelta(seconds=299)).status.phase == "Starting"
    plan = c.reconcile(T0 + timedelta(seconds=300))
    st = plan.status
    assert st.phase == "Restarting" and sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]
    assert (st.startup_timeouts, st.restarts, st.attempt, st.placement) == (1, 0, 1, None)
    assert [(e.node, e.reason) for e in st.excluded_nodes] == [
        ("n1", "StartupTimeout")
    ]  # n0 bound: not blamed
    cond = next(x for x in st.conditions if x.type == "Running")
    assert cond.reason == "StartupTimeout" and "0/3 nodes are available" in cond.message
    assert "NodeQuarantined" in c.events and "GangRestart" in c.events
    c.finish_deletes()
    c.pods.clear()
    assert c.reconcile(T0 + timedelta(seconds=301)).needs_placement is False  # placed by the caller here
    # the next gang that runs resets the count: the bound is on gangs in a row
    c.reconcile(T0 + timedelta(seconds=302), placement=PlacementDecision(True, ["n0", "n2"], "rack", "r1"))
    c.set_phase("Running")
    assert c.reconcile(T0 + timedelta(seconds=303)).status.startup_timeouts == 0


def test_after_max_startup_attempts_the_job_fails_saying_why() -> None:
    c = Cluster(gpu_job(startupTimeoutSeconds=60, failurePolicy={"maxStartupAttempts": 2}))
    now = T0
    for _ in range(2):
        c.reconcile(now, placement=PLACED)
        for name in c.pods:
            c.pods[name]["status"] = {"phase": "Pending", "conditions": UNSCHEDULABLE}
        now += timedelta(seconds=61)
        plan = c.reconcile(now)
        c.finish_deletes()
        c.pods.clear()
    failed = next(x for x in plan.status.conditions if x.type == "Failed")
    assert plan.status.phase == "Failed" and failed.reason == "StartupAttemptsExceeded"
    assert "not all running 60s after it was created" in failed.message
    assert "0/3 nodes are available" in failed.message and "maxStartupAttempts: 2" in failed.message


def test_gangs_capstan_did_not_place_wait_for_the_default_scheduler_without_timeout() -> None:
    c = Cluster(job(startupTimeoutSeconds=60))  # CPU job: the default scheduler's queue
    c.reconcile()
    plan = c.reconcile(T0 + timedelta(hours=2))
    assert plan.status.phase == "Starting" and plan.delete_pods == []


def test_excluded_nodes_expire_and_a_renewed_node_is_listed_once() -> None:
    first, added = exclude([], [("n1", "NodeLost", "gone")], T0, 60)
    assert [e.node for e in added] == ["n1"]
    later, added = exclude(
        first, [("n2", "GPUError", "Xid 79"), ("n1", "NotReady", "x")], T0 + timedelta(seconds=30), 60
    )
    assert [(e.node, e.reason) for e in later] == [("n2", "GPUError"), ("n1", "NotReady")]
    expired, _ = exclude(later, [], T0 + timedelta(seconds=91), 60)
    assert expired == []


def test_unplaced_pods_are_kept_off_the_jobs_excluded_nodes() -> None:
    c = Cluster(job())  # CPU job: pods go to the default scheduler
    until = "2026-01-01T01:00:00Z"
    c.job.status.excluded_nodes = [ExcludedNode(node="bad", reason="NodeLost", until=until)]
    plan = c.reconcile()
    terms = plan.create[-1]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["bad"]}]}
    ]
    pinned = {
        "spec": {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                        ]
                    }
                }
            }
        }
    }
    kept = keep_off(pinned, ["bad"])["spec"]["affinity"]["nodeAffinity"]
    term = kept["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] and term["matchFields"][0]["values"] == ["bad"]


def test_placement_keeps_a_job_off_its_excluded_nodes_until_they_expire() -> None:
    nodes = [gpu_node("n0", clique="a", rack="r1"), gpu_node("n1", clique="a", rack="r1")]
    tj = job(workers=1, gpusPerWorker=8)
    tj.status.excluded_nodes = [ExcludedNode(node="n0", reason="GPUError", until="2026-01-01T01:00:00Z")]
    snapshot = queue_snapshot(nodes, [], [], now=T0.timestamp())
    assert snapshot is not None
    assert queue_pass(snapshot, tj, QueueState()).decision.nodes == ["n1"]
    other = job(workers=1, gpusPerWorker=8).model_copy(
        update={"metadata": tj.metadata.model_copy(update={"name": "other"})}
    )
    assert queue_pass(snapshot, other, QueueState()).decision.nodes == ["n0"]  # per job, not cluster-wide
    both = job(workers=2, gpusPerWorker=8)
    both.status.excluded_nodes = tj.status.excluded_nodes
    waiting = queue_pass(snapshot, both, QueueState()).decision
    assert not waiting.placed and "excluded for this job" in waiting.reason
    after = queue_snapshot(nodes, [], [], now=(T0 + timedelta(hours=2)).timestamp())
    assert after is not None and queue_pass(after, both, QueueState()).decision.placed


def test_a_gang_that_ran_is_never_timed_out_as_a_slow_start() -> None:
    c = Cluster(gpu_job(startupTimeoutSeconds=60))
    c.reconcile(placement=PLACED)
    c.set_phase("Running")
    assert c.reconcile(T0 + timedelta(seconds=10)).status.gang_created is None
    c.pods["gpt-1"]["status"] = {"phase": "Unknown"}  # its node stopped reporting
    plan = c.reconcile(T0 + timedelta(hours=1))
    assert plan.delete_pods == [] and plan.status.startup_timeouts == 0
