"""The operator's placement adapter without a server: queued TrainingJobs form one queue."""

from __future__ import annotations

from typing import Any

from tests.kube.conftest import gpu_node

from capstan.api.loading import parse_resource
from capstan.api.trainingjob import TrainingJob
from capstan.kube.placement import QueueState, make_placer, queued_jobs

NOW = 1_800_000_000.0


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
    placer = make_placer(NODES, [busy("n0", 4)], queued_jobs([body("big", 2, 8)]), state, now=NOW)
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
