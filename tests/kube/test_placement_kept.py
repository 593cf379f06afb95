"""A pass reads the cluster's TrainingJobs and worker pods from what the last pass summed, by what
changed since (capstan.kube.placement.ParsedJobs): after any edits of the watch cache's lists it
reads what a pass reading every job and pod afresh reads."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.kube.conftest import gpu_node
from tests.kube.test_placement_claims import placed, worker

from capstan.kube.placement import ParsedJobs, PlacedJobs, QueueState, queue_pass, queue_snapshot

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
NODES = ["n0", "n1", "n2", "n3"]
# what the watches may bring between two passes
EDITS = ["update", "same", "delete", "create", "pod+", "pod-", "pod=", "pod twice", "relist"]


def a_job(rng: random.Random, name: str, version: int) -> dict[str, Any]:
    """A TrainingJob body in one of the states the queue reads differently."""
    nodes = rng.sample(NODES, rng.randint(1, 3))
    kind = rng.choice(["queued", "starting", "running", "movable", "quarantined", "done", "suspended",
                       "moving", "unplaced"])
    spec: dict[str, Any] = {"activeDeadlineSeconds": rng.choice([100, 3600])} if rng.random() < 0.7 else {}
    if kind in ("movable", "quarantined"):
        spec["checkpoint"] = {"volume": {"size": "1Gi"}}
    phase = {"queued": "Queued", "starting": "Starting", "done": "Succeeded", "suspended": "Running",
             "unplaced": "Pending"}.get(kind, "Running")
    out = placed(name, nodes, phase=phase, attempt=rng.randint(0, 1), suspend=kind == "suspended", **spec)
    status = out["status"]
    if kind in ("queued", "unplaced"):
        del status["placement"]
    if phase == "Running":
        status.update({"startTime": "2027-01-15T07:00:00Z", "movedSeconds": rng.choice([0, 30]),
                       "conditions": [{"type": "Running", "status": "True", "reason": "AllWorkersRunning",
                                       "message": "", "lastTransitionTime": "2027-01-15T07:00:00Z"}]})
    if kind == "quarantined":
        status["excludedNodes"] = [{"node": "n3", "reason": "GPUError", "until": "2027-01-15T08:00:30Z"}]
    if kind == "moving":
        status["pendingMove"] = {"nodes": nodes, "reason": "making room", "decided": "2027-01-15T07:59:00Z"}
    out["metadata"] = {**out["metadata"], "resourceVersion": str(version)}
    return out


def pods_of(rng: random.Random, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Some of a job's worker pods, of its attempt or an older one."""
    placement = body["status"].get("placement") or {"nodes": []}
    attempt = body["status"].get("attempt", 0)
    return [worker(body["metadata"]["name"], rank, node, attempt=rng.choice([attempt, attempt, 0]))
            for rank, node in enumerate(placement["nodes"]) if rng.random() < 0.7]


def read(placed_jobs: PlacedJobs, pods: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """All a pass reads, in an order of its own (the parts come in no order that means anything)."""
    return {
        "queued": sorted(j.metadata.name for j in placed_jobs.queued()),
        "moves": sorted(j.metadata.name for j in placed_jobs.recorded_moves()),
        "running": sorted((g.result.name, g.result.nodes, g.started, g.expected_end)
                          for g in placed_jobs.running(now)),
        "movable": sorted((g.request.name, sorted(g.request.avoid_nodes), g.result.nodes, g.running_since,
                           uid) for g, uid in placed_jobs.movable(now)),
        "claims": placed_jobs.without_pods(pods),
    }


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**9), passes=st.integers(1, 8))
def test_a_pass_reads_what_a_pass_reading_everything_afresh_reads(seed: int, passes: int) -> None:
    rng = random.Random(seed)
    version = 1
    bodies = [a_job(rng, f"j{k}", version) for k in range(rng.randint(0, 12))]
    pods = [p for b in bodies for p in pods_of(rng, b)]
    parsed = ParsedJobs()
    for turn in range(passes):
        now = NOW + rng.choice([0, 60])  # a quarantine expires at NOW + 30
        assert read(PlacedJobs(bodies, parsed), pods, now) == read(PlacedJobs(bodies), pods, now), turn
        for _ in range(rng.randint(0, 4)):  # what the watches bring before the next pass
            kind, version = rng.choice(EDITS), version + 1
            k = rng.randrange(len(bodies)) if bodies else -1
            if kind == "update" and bodies:
                bodies[k] = a_job(rng, bodies[k]["metadata"]["name"], version)  # a new version in its place
            elif kind == "same" and bodies:
                bodies[k] = dict(bodies[k])  # a new object of the same version (a relist's)
            elif kind == "delete" and bodies:
                del bodies[k]
            elif kind == "create":
                bodies.append(a_job(rng, f"new{version}", version))
            elif kind == "pod+" and bodies:
                pods.extend(pods_of(rng, bodies[k]))
            elif kind == "pod-" and pods:
                del pods[rng.randrange(len(pods))]
            elif kind == "pod=" and pods:
                j = rng.randrange(len(pods))
                pods[j] = dict(pods[j])
            elif kind == "pod twice" and pods:  # never from a cache: every pod is read again
                pods.append(pods[rng.randrange(len(pods))])
            elif kind == "relist":
                rng.shuffle(bodies)
                rng.shuffle(pods)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**9))
def test_the_queue_decides_the_same_whatever_order_the_cache_lists_jobs_and_pods_in(seed: int) -> None:
    """The kept parts come in the order jobs changed, not the cache's: the queue's decisions,
    moves and reservations must not depend on it."""
    rng = random.Random(seed)
    bodies = [a_job(rng, f"j{k}", 1) for k in range(rng.randint(1, 14))]
    pods = [p for b in bodies for p in pods_of(rng, b)]
    nodes = [gpu_node(n, gpus=8, clique=f"c{k // 2}", rack="r1") for k, n in enumerate(NODES)]

    def decide(bodies: list[dict[str, Any]], pods: list[dict[str, Any]]) -> list[str]:
        jobs = PlacedJobs(bodies)
        snapshot = queue_snapshot(nodes, pods, jobs.queued(), now=NOW, running=jobs.running(NOW),
                                  movable=jobs.movable(NOW), claimed=jobs.without_pods(pods))
        assert snapshot is not None
        out = []
        for job in sorted(snapshot.queued, key=lambda j: j.metadata.name):
            state = QueueState()
            done = queue_pass(snapshot, job, state)
            state.apply(done)
            out.append(repr((done.decision, done.reservation, sorted(done.startable), sorted(state.moves))))
        return out

    first = decide(bodies, pods)
    rng.shuffle(bodies)
    rng.shuffle(pods)
    assert decide(bodies, pods) == first
