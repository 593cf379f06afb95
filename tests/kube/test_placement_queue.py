"""The operator's placement adapter without a server: queued TrainingJobs form one queue."""

from __future__ import annotations

from typing import Any

from tests.kube.conftest import gpu_node

from capstan.api.loading import parse_resource
from capstan.api.trainingjob import TrainingJob
from capstan.kube.placement import QueueState, make_placer, queued_jobs, running_gangs
from capstan.topology import QueuePolicy

NOW = 1_800_000_000.0
STRICT = QueuePolicy(reserve_after_s=0)  # reserve for the head at once


def body(
    name: str, workers: int, gpus: int, phase: str | None = "Queued", created: str = "2026-11-23T10:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "capstan.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "creationTimestamp": created},
        "spec": {"image": "trainer:1", "command": ["python"], "workers": workers, "gpusPerWorker": gpus,
                 **spec},
    }
    if phase:
        obj["status"] = {"phase": phase}
    return obj


def job(name: str, workers: int, gpus: int, **kw: Any) -> TrainingJob:
    parsed = parse_resource(body(name, workers, gpus, phase=None, **kw))
    assert isinstance(parsed, TrainingJob)
    return parsed


def busy(node: str, gpus: int) -> dict[str, Any]:
    limits = {"nvidia.com/gpu": str(gpus)}
    return {"spec": {"nodeName": node, "containers": [{"resources": {"limits": limits}}]},
            "status": {"phase": "Running"}}


NODES = [gpu_node("n0", clique="a", rack="r1"), gpu_node("n1", clique="a", rack="r1")]


def test_only_queued_gpu_gangs_placed_by_capstan_join_the_queue() -> None:
    bodies = [
        body("waiting", 2, 8),
        body("new", 2, 8, phase=None),  # never reconciled: joins on its own first pass
        body("running", 2, 8, phase="Running"),
        body("cpu", 2, 0),
        body("kueue", 2, 8, queueName="team-a"),
        body("paused", 2, 8, suspend=True),
        body("broken", 0, 8),  # invalid: its own status says why
    ]
    assert [j.metadata.name for j in queued_jobs(bodies)] == ["waiting"]


def test_gang_behind_the_head_waits_off_its_reserved_gpus_and_says_so() -> None:
    state = QueueState()
    queued = queued_jobs([body("big", 2, 8)])
    placer = make_placer(NODES, [busy("n0", 4)], queued, state, now=NOW, policy=STRICT)
    assert placer is not None
    decision = placer(job("small", 1, 8, created="2026-11-23T11:00:00Z"))
    assert not decision.placed
    assert "reserved for the queue head ml/big" in decision.reason
    assert state.reservation is not None and state.reservation.head == "ml/big"
    assert sorted(state.reservation.gpus_by_node()) == ["n0", "n1"]


def test_higher_priority_goes_first_and_an_older_gang_keeps_its_turn() -> None:
    # the queued gang is older, but the asking one has higher priority: it is placed first
    placer = make_placer(NODES, [], queued_jobs([body("old", 2, 8)]), QueueState(), now=NOW)
    assert placer is not None
    assert placer(job("urgent", 1, 8, created="2026-11-23T11:00:00Z", priority=10)).placed
    # same priority: the older queued gang is ahead, and with room for both both may start
    state = QueueState()
    placer = make_placer(NODES, [], queued_jobs([body("old", 1, 8)]), state, now=NOW)
    assert placer is not None
    decision = placer(job("young", 1, 8, created="2026-11-23T11:00:00Z"))
    assert decision.placed and state.startable == ["uid-old"]


def test_queued_head_asking_itself_is_placed_when_it_fits() -> None:
    state = QueueState()
    queued = queued_jobs([body("big", 2, 8), body("small", 1, 8, created="2026-11-23T11:00:00Z")])
    placer = make_placer(NODES, [], queued, state, now=NOW)
    assert placer is not None
    decision = placer(queued[0])
    assert decision.placed and sorted(decision.nodes) == ["n0", "n1"]
    # small no longer fits: it is the new head, and nobody else can start
    assert state.startable == [] and state.reservation is not None and state.reservation.head == "ml/small"


def epoch(text: str) -> float:
    from capstan.api.conditions import parse_time

    parsed = parse_time(text)
    assert parsed is not None
    return parsed.timestamp()


def test_starvation_guard_reserves_only_after_the_head_waited_long_enough() -> None:
    queued = queued_jobs([body("big", 2, 8, created="2026-11-23T10:00:00Z")])
    small = job("small", 1, 8, created="2026-11-23T11:00:00Z")
    guard = QueuePolicy(reserve_after_s=6 * 3600)
    # 2 h after big was created: nothing is reserved yet, so small starts on the idle node
    early = make_placer(NODES, [busy("n0", 4)], queued, QueueState(), now=epoch("2026-11-23T12:00:00Z"),
                        policy=guard)
    assert early is not None and early(small).placed
    # 7 h after: big is reserved for, small waits and says for whom
    late = make_placer(NODES, [busy("n0", 4)], queued, QueueState(), now=epoch("2026-11-23T17:00:00Z"),
                       policy=guard)
    assert late is not None
    decision = late(small)
    assert not decision.placed and "queue head ml/big" in decision.reason


def running_body(name: str, nodes: list[str], gpus: int, start: str | None, **spec: Any) -> dict[str, Any]:
    obj = body(name, len(nodes), gpus, phase="Running" if start else "Starting", **spec)
    obj["status"]["placement"] = {"level": "nvlink", "domain": "a", "nodes": nodes}
    if start:
        obj["status"]["startTime"] = start
    return obj


def test_running_gangs_end_at_their_declared_deadline() -> None:
    now = epoch("2026-11-23T12:00:00Z")
    gangs = running_gangs([
        running_body("timed", ["n0"], 4, "2026-11-23T11:00:00Z", activeDeadlineSeconds=7200),
        running_body("starting", ["n1"], 4, None, activeDeadlineSeconds=600),
        running_body("open", ["n1"], 2, "2026-11-23T11:00:00Z"),
        {**running_body("done", ["n1"], 2, "2026-11-23T11:00:00Z"), "status": {"phase": "Succeeded",
                                                                             "placement": {"nodes": ["n1"]}}},
        body("queued", 1, 8),
    ], now)
    ends = {g.result.name: g.expected_end for g in gangs}
    assert ends == {"ml/timed": epoch("2026-11-23T13:00:00Z"), "ml/starting": now + 600, "ml/open": None}
    assert gangs[0].result.gpus_by_node() == {"n0": 4}


def test_declared_limits_let_a_short_gang_backfill_onto_reserved_gpus() -> None:
    # n0 is half busy until 13:00 (declared); big (2 x 8) is reserved n0 + n1 from then on
    now = epoch("2026-11-23T12:00:00Z")
    jobs = [running_body("holder", ["n0"], 4, "2026-11-23T11:00:00Z", activeDeadlineSeconds=7200),
            body("big", 2, 8)]
    pods = [busy("n0", 4)]

    def ask(limit: int) -> bool:
        placer = make_placer(NODES, pods, queued_jobs(jobs), QueueState(), now=now,
                             running=running_gangs(jobs, now), policy=STRICT)
        assert placer is not None
        return placer(job("short", 1, 8, created="2026-11-23T11:30:00Z", activeDeadlineSeconds=limit)).placed

    assert ask(1800)  # ends 12:30, before big can start at 13:00
    assert not ask(7200)  # would still hold n1 when big needs it
