"""A placed gang holds the GPUs of ranks whose pods do not exist yet (found by the API-fault tests
of tests/faults/test_faults.py: a gang placed on the GPUs of another gang's missing rank left that
rank Pending for good, its job Starting for ever)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster, gpu_node

from capstan.api.loading import parse_object
from capstan.api.trainingjob import TrainingJob
from capstan.kube.client import USER_AGENT
from capstan.kube.placement import (
    ParsedJobs,
    PlacedJobs,
    QueueState,
    placed_without_pods,
    queue_pass,
    queue_snapshot,
)
from capstan.labels import LABEL_ATTEMPT, LABEL_JOB_UID, LABEL_RANK

NOW = 1_800_000_000.0
NODES = [gpu_node("n0", gpus=4, clique="a", rack="r1"), gpu_node("n1", gpus=4, clique="b", rack="r1")]


def body(name: str, workers: int, gpus: int, phase: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "capstan.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}",
                     "creationTimestamp": "2026-11-23T10:00:00Z"},
        "spec": {"image": "trainer:1", "command": ["python"], "workers": workers, "gpusPerWorker": gpus,
                 **spec},
        "status": {"phase": phase},
    }


def job(name: str, workers: int, gpus: int) -> TrainingJob:
    parsed = parse_object({k: v for k, v in body(name, workers, gpus, "Pending").items() if k != "status"})
    assert isinstance(parsed, TrainingJob)
    return parsed


def placed(name: str, nodes: list[str], gpus: int = 4, phase: str = "Starting", attempt: int = 0,
           **spec: Any) -> dict[str, Any]:
    obj = body(name, len(nodes), gpus, phase=phase, **spec)
    obj["status"].update({"attempt": attempt, "placement": {"level": "rack", "domain": "r1", "nodes": nodes}})
    return obj


def worker(job_name: str, rank: int, node: str, attempt: int = 0, gpus: int = 4) -> dict[str, Any]:
    labels = {LABEL_JOB_UID: f"uid-{job_name}", LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt)}
    limits = {"nvidia.com/gpu": str(gpus)}
    return {"metadata": {"name": f"{job_name}-{rank}", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"resources": {"limits": limits}}]},
            "status": {"phase": "Running"}}


def test_ranks_without_pods_are_claimed_on_their_placed_nodes() -> None:
    bodies = [
        placed("half", ["n0", "n1"]),  # rank 0 exists, rank 1 does not
        placed("whole", ["n0", "n1"], phase="Running"),  # both ranks exist
        placed("stale", ["n0", "n1"], attempt=1),  # pods of attempt 0 only: attempt 1 still to come
        placed("paused", ["n0", "n1"], suspend=True),
        placed("done", ["n0", "n1"], phase="Succeeded"),
    ]
    pods = [worker("half", 0, "n0"), worker("whole", 0, "n0"), worker("whole", 1, "n1"),
            worker("stale", 0, "n0"), worker("stale", 1, "n1")]
    assert placed_without_pods(bodies, pods) == {"ml/half": {"n1": 4}, "ml/stale": {"n0": 4, "n1": 4}}


def test_a_gang_is_not_placed_on_the_gpus_of_another_gangs_missing_rank() -> None:
    bodies = [placed("first", ["n0", "n1"])]
    pods = [worker("first", 0, "n0")]  # rank 1 on n1: its create has not landed yet
    claimed = placed_without_pods(bodies, pods)
    snapshot = queue_snapshot(NODES, pods, [], now=NOW, claimed=claimed)
    assert snapshot is not None
    decision = queue_pass(snapshot, job("second", 1, 4), QueueState()).decision
    assert not decision.placed, decision  # before: placed on n1, where first's rank 1 must go
    # the gang's own claim does not count against itself (its pods are gone, it asks again)
    again = queue_snapshot(NODES, [], [], now=NOW, claimed=placed_without_pods(bodies, []))
    assert again is not None
    assert queue_pass(again, job("first", 2, 4), QueueState()).decision.nodes == ["n0", "n1"]


async def test_a_rank_whose_create_did_not_land_keeps_its_gpus_from_the_next_gang(
    cluster: Cluster, env: sc.Env, add_gpu_node: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    for name in ("n0", "n1"):
        await add_gpu_node(name, gpus=4, clique=name, rack="r1")

    def first_rank_1(req: Any) -> bool:  # a namesake of rank 1 is still terminating: 409, nothing made
        return (req.headers.get("User-Agent", "").startswith(USER_AGENT) and str(req.method.value) == "POST"
                and req.resource is not None and req.resource.plural == "pods"
                and '"first-1"' in req.text)

    cluster.emulator.refuse(first_rank_1, 409, "AlreadyExists", 'pods "first-1" already exists')
    async with env.operator():
        await env.api.create(sc.job_body(env, "first", workers=2, gpusPerWorker=4))
        await sc.wait_pods(env, "first", 1)
        first = await sc.wait_job(env, "first", lambda j: bool(sc.status(j).get("placement")), "placement")
        await env.api.create(sc.job_body(env, "second", workers=1, gpusPerWorker=4))
        second = await sc.wait_job(env, "second", sc.phase_is("Queued"), "queued behind first's claim")
        assert "placement" not in sc.status(second)
        cluster.emulator.clear_faults()  # the namesake is gone: first's rank 1 lands where it was placed
        pods = await sc.wait_pods(env, "first", 2)
    nodes = sc.status(first)["placement"]["nodes"]
    pinned = [p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
              ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0] for p in pods]
    assert pinned == nodes


def test_parsed_jobs_reads_each_version_once_and_a_new_version_again() -> None:
    """A burst's placement passes parse each job once per resourceVersion, and what they read is
    the version they were given: a job placed since its last parse claims its new nodes."""
    parsed = ParsedJobs(kept=2)
    first = {**placed("g", ["n0"]), "status": {"phase": "Queued"}}
    first["metadata"] = {**first["metadata"], "resourceVersion": "10"}
    assert placed_without_pods([first], [], parsed) == {}
    assert parsed.get(first) is parsed.get(dict(first))  # same (uid, version): the same model
    moved = placed("g", ["n1"])
    moved["metadata"] = {**moved["metadata"], "resourceVersion": "11"}
    assert placed_without_pods([moved], [], parsed) == {"ml/g": {"n1": 4}}
    # an object without a version (built in memory) is parsed as it is, never looked up
    unversioned = placed("g", ["n0"])
    assert placed_without_pods([unversioned], [], parsed) == {"ml/g": {"n0": 4}}
    # one entry per job, whatever its versions; an invalid body is remembered as such
    assert len(parsed) == 1
    broken = {**placed("h", ["n0"]), "spec": {"workers": "many"}}
    broken["metadata"] = {**broken["metadata"], "resourceVersion": "12"}
    assert parsed.get(broken) is None and len(parsed) == 2
    # past ``kept`` jobs, the one written longest ago goes (here g, last written at version 11)
    other = placed("i", ["n0"])
    other["metadata"] = {**other["metadata"], "resourceVersion": "13"}
    parsed.get(other)
    assert "uid-g" not in parsed and "uid-h" in parsed and "uid-i" in parsed
    parsed.forget("uid-h")  # a deleted job
    assert "uid-h" not in parsed and len(parsed) == 1


def test_a_pass_derives_each_job_version_once_and_every_new_version_afresh(monkeypatch: Any) -> None:
    """What the queue reads of a job (its running gang, its move, its claim) is derived once per
    resourceVersion and kept with the parsed job; what depends on the clock stays the pass's:
    a gang still starting ends a limit from now, a quarantine expires."""
    import capstan.kube.placement as placement

    parses: list[str] = []
    real = placement._parse_job

    def counting(raw: Any) -> Any:
        parses.append(raw["metadata"]["name"])
        return real(raw)

    monkeypatch.setattr(placement, "_parse_job", counting)
    parsed = ParsedJobs()

    def version(obj: dict[str, Any], rv: str) -> dict[str, Any]:
        obj["metadata"] = {**obj["metadata"], "resourceVersion": rv}
        return obj

    starting = version(placed("g", ["n0"], activeDeadlineSeconds=100), "1")
    first = PlacedJobs([starting], parsed)
    assert [r.expected_end for r in first.running(NOW)] == [NOW + 100]
    assert [r.expected_end for r in PlacedJobs([starting], parsed).running(NOW + 50)] == [NOW + 150]
    assert first.without_pods([]) == {"ml/g": {"n0": 4}}
    assert first.without_pods([worker("g", 0, "n0")]) == {}
    # running since its startTime, moved once (the move took 30 s, which extends its limit) to n1,
    # checkpointed so that it may move again; n0 quarantined for it until NOW + 60
    running = version(placed("g", ["n1"], phase="Running", activeDeadlineSeconds=100,
                             checkpoint={"volume": {"size": "1Gi"}}), "2")
    running["status"].update({
        "startTime": "2027-01-15T08:00:00Z", "movedSeconds": 30,
        "conditions": [{"type": "Running", "status": "True", "reason": "AllWorkersRunning",
                        "message": "", "lastTransitionTime": "2027-01-15T08:00:00Z"}],
        "excludedNodes": [{"node": "n0", "reason": "GPUError", "until": "2027-01-15T08:01:00Z"}]})
    start = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    later = PlacedJobs([running], parsed)
    (gang,) = later.running(NOW + 999)
    assert (gang.result.nodes, gang.started, gang.expected_end) == (["n1"], start, start + 130)
    (soon, _), = later.movable(start + 59)
    (expired, _), = later.movable(start + 61)
    assert (soon.request.avoid_nodes, expired.request.avoid_nodes) == (frozenset({"n0"}), frozenset())
    assert soon.running_since == start
    # each version was parsed once, however many passes read it
    for _ in range(3):
        PlacedJobs([running], parsed).running(NOW)
    assert parses == ["g", "g"]


def test_claims_follow_pods_that_appear_change_or_go_between_passes() -> None:
    """The worker pods a pass finds are remembered by object (the watch cache keeps an unchanged
    pod's object): a pod created, replaced by one of another attempt, or deleted is seen."""
    parsed = ParsedJobs()
    gang = placed("g", ["n0", "n1"], phase="Running")
    gang["metadata"] = {**gang["metadata"], "resourceVersion": "5"}
    rank0, rank1 = worker("g", 0, "n0"), worker("g", 1, "n1")
    assert PlacedJobs([gang], parsed).without_pods([rank0]) == {"ml/g": {"n1": 4}}
    assert PlacedJobs([gang], parsed).without_pods([rank0, rank1]) == {}
    # rank 1 replaced by a pod of attempt 1 (the gang's status still says attempt 0), then deleted
    stale = worker("g", 1, "n1", attempt=1)
    assert PlacedJobs([gang], parsed).without_pods([rank0, stale]) == {"ml/g": {"n1": 4}}
    assert PlacedJobs([gang], parsed).without_pods([rank1]) == {"ml/g": {"n0": 4}}
