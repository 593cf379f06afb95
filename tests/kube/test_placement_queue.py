"""The operator's placement adapter without a server: queued TrainingJobs form one queue."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from tests.api.bodies import make_trainingjob
from tests.kube.conftest import gpu_node

from capstan.api.loading import parse_object
from capstan.api.trainingjob import TrainingJob
from capstan.kube.placement import (
    MOVE_HOLD_S,
    NodeIndex,
    QueuePass,
    QueueSnapshot,
    QueueState,
    movable_gangs,
    queue_pass,
    queue_snapshot,
    queued_jobs,
    recorded_moves,
    running_gangs,
)
from capstan.topology import DEFAULT_LEVELS, QueuePolicy, TopologyLevels

NOW = 1_800_000_000.0
STRICT = QueuePolicy(reserve_after_s=0)  # reserve for the head at once
DEFRAG = QueuePolicy(defragment=True)  # moves for gangs blocked by scattered GPUs too


def body(
    name: str, workers: int, gpus: int, phase: str | None = "Queued", created: str = "2026-11-23T10:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    job = (
        make_trainingjob(name).namespace("ml").uid(f"uid-{name}").meta(creationTimestamp=created)
        .image("trainer:1", "python").workers(workers).gpus(gpus).spec(**spec)
    )
    return job.status(phase=phase).obj() if phase else job.obj()


def job(name: str, workers: int, gpus: int, **kw: Any) -> TrainingJob:
    parsed = parse_object(body(name, workers, gpus, phase=None, **kw))
    assert isinstance(parsed, TrainingJob)
    return parsed


def busy(node: str, gpus: int) -> dict[str, Any]:
    limits = {"nvidia.com/gpu": str(gpus)}
    return {"spec": {"nodeName": node, "containers": [{"resources": {"limits": limits}}]},
            "status": {"phase": "Running"}}


NODES = [gpu_node("n0", clique="a", rack="r1"), gpu_node("n1", clique="a", rack="r1")]


def place(snapshot: QueueSnapshot | None, asking: TrainingJob, state: QueueState) -> QueuePass:
    """One queue pass for ``asking``, applied to ``state`` as the operator applies it."""
    assert snapshot is not None
    result = queue_pass(snapshot, asking, state)
    state.apply(result)
    return result


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
    snapshot = queue_snapshot(NODES, [busy("n0", 4)], queued, now=NOW, policy=STRICT)
    decision = place(snapshot, job("small", 1, 8, created="2026-11-23T11:00:00Z"), state).decision
    assert not decision.placed
    assert "reserved for the queue head ml/big" in decision.reason
    assert state.reservation is not None and state.reservation.head == "ml/big"
    assert sorted(state.reservation.gpus_by_node()) == ["n0", "n1"]


def test_higher_priority_goes_first_and_an_older_gang_keeps_its_turn() -> None:
    # the queued gang is older, but the asking one has higher priority: it is placed first
    snapshot = queue_snapshot(NODES, [], queued_jobs([body("old", 2, 8)]), now=NOW)
    urgent = job("urgent", 1, 8, created="2026-11-23T11:00:00Z", priority=10)
    assert place(snapshot, urgent, QueueState()).decision.placed
    # same priority: the older queued gang is ahead, and with room for both both may start
    state = QueueState()
    result = place(queue_snapshot(NODES, [], queued_jobs([body("old", 1, 8)]), now=NOW),
                   job("young", 1, 8, created="2026-11-23T11:00:00Z"), state)
    decision = result.decision
    assert decision.placed and list(result.startable) == ["uid-old"]


def test_queued_head_asking_itself_is_placed_when_it_fits() -> None:
    state = QueueState()
    queued = queued_jobs([body("big", 2, 8), body("small", 1, 8, created="2026-11-23T11:00:00Z")])
    result = place(queue_snapshot(NODES, [], queued, now=NOW), queued[0], state)
    decision = result.decision
    assert decision.placed and sorted(decision.nodes) == ["n0", "n1"]
    # small no longer fits: it is the new head, and nobody else can start
    assert list(result.startable) == []
    assert state.reservation is not None and state.reservation.head == "ml/small"


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
    early = queue_snapshot(NODES, [busy("n0", 4)], queued, now=epoch("2026-11-23T12:00:00Z"),
                           policy=guard)
    assert early is not None and place(early, small, QueueState()).decision.placed
    # 7 h after: big is reserved for, small waits and says for whom
    late = queue_snapshot(NODES, [busy("n0", 4)], queued, now=epoch("2026-11-23T17:00:00Z"), policy=guard)
    assert late is not None
    decision = place(late, small, QueueState()).decision
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
        snapshot = queue_snapshot(NODES, pods, queued_jobs(jobs), now=now,
                                  running=running_gangs(jobs, now), policy=STRICT)
        asking = job("short", 1, 8, created="2026-11-23T11:30:00Z", activeDeadlineSeconds=limit)
        return place(snapshot, asking, QueueState()).decision.placed

    assert ask(1800)  # ends 12:30, before big can start at 13:00
    assert not ask(7200)  # would still hold n1 when big needs it


def running_one(
    name: str, gpus: int, node: str, since: str = "2026-11-23T09:00:00Z", **spec: Any
) -> dict[str, Any]:
    """A Running one-worker job on ``node`` whose Running condition dates from ``since``."""
    obj = body(name, 1, gpus, phase="Running", **spec)
    obj["status"].update({
        "placement": {"level": "nvlink", "domain": "a", "nodes": [node]},
        "conditions": [{"type": "Running", "status": "True", "reason": "AllWorkersRunning",
                        "message": "1 workers running", "lastTransitionTime": since}],
    })
    return obj


CHECKPOINTED = {"checkpoint": {"volume": {"size": "1Gi"}}}


def test_only_checkpointed_running_gangs_that_allow_it_are_movable() -> None:
    bodies = [
        running_one("ckpt", 4, "n0", **CHECKPOINTED),
        running_one("no-volume", 4, "n0"),
        running_one("pinned", 4, "n0", topology={"migration": "Never"}, **CHECKPOINTED),
        running_one("no-resume", 4, "n0", checkpoint={"volume": {"size": "1Gi"}, "resume": "None"}),
        body("queued", 1, 4, **CHECKPOINTED),
    ]
    (gang, uid), = movable_gangs(bodies)
    assert gang.request.name == "ml/ckpt" and uid == "uid-ckpt" and gang.result.nodes == ["n0"]
    assert gang.running_since == 1_795_424_400.0  # 2026-11-23T09:00:00Z


def test_defragmentation_move_is_held_for_the_mover_and_then_frees_room() -> None:
    # n0: a movable 4-GPU gang; n1: 4 GPUs used by someone else. An 8-GPU gang fits by count only.
    bodies = [running_one("mover", 4, "n0", **CHECKPOINTED)]
    pods = [busy("n0", 4), busy("n1", 4)]
    state = QueueState()
    snapshot = queue_snapshot(NODES, pods, [], now=NOW, movable=movable_gangs(bodies), policy=DEFRAG)
    whole = job("whole", 1, 8, created="2026-11-23T11:00:00Z")
    result = place(snapshot, whole, state)
    assert not result.decision.placed
    assert list(state.moves) == ["ml/mover"] and [m.uid for m in result.moving] == ["uid-mover"]
    pending = state.moves["ml/mover"]
    assert pending.move.to.nodes == ["n1"] and pending.move.for_gang == "ml/whole"
    assert state.move_for("ml/mover", "Running") == pending.move.reason

    # the mover's pods are gone (n0 idle); n1's free GPUs are held for the mover, not for others
    snapshot = queue_snapshot(NODES, [busy("n1", 4)], queued_jobs([body("whole", 1, 8)]), now=NOW + 5)
    result = place(snapshot, job("four", 1, 4, created="2026-11-23T12:00:00Z"), state)
    four = result.decision
    assert not four.placed  # n0 goes to the older 8-GPU gang, n1's idle half to the mover
    assert list(result.startable) == ["uid-whole"]
    back = place(snapshot, job("mover", 1, 4, **CHECKPOINTED), state).decision
    assert back.placed and back.nodes == ["n1"] and "ml/mover" not in state.moves


def test_a_recorded_move_survives_an_operator_restart() -> None:
    bodies = [running_one("mover", 4, "n0", **CHECKPOINTED)]
    before = QueueState()
    snapshot = queue_snapshot(NODES, [busy("n0", 4), busy("n1", 4)], [], now=NOW,
                              movable=movable_gangs(bodies), policy=DEFRAG)
    place(snapshot, job("whole", 1, 8, created="2026-11-23T11:00:00Z"), before)
    decided = before.moves["ml/mover"]
    # the shell writes the move into the mover's status; then the operator restarts (memory empty)
    restarting = running_one("mover", 4, "n0", **CHECKPOINTED)
    restarting["status"].update(phase="Restarting", pendingMove=decided.status())
    after = QueueState()
    after.adopt(recorded_moves([restarting, body("whole", 1, 8)]), NOW + 5)
    adopted = after.moves["ml/mover"]
    assert (adopted.move.to.nodes, adopted.move.reason, adopted.move.for_gang, adopted.uid) == (
        ["n1"], decided.move.reason, "ml/whole", "uid-mover")
    assert abs(adopted.since - decided.since) < 1
    # so n1's idle half is still held for the mover, and the mover gets it when it asks
    snapshot = queue_snapshot(NODES, [busy("n1", 4)], queued_jobs([body("whole", 1, 8)]), now=NOW + 10)
    assert not place(snapshot, job("four", 1, 4, created="2026-11-23T12:00:00Z"), after).decision.placed
    back = place(snapshot, job("mover", 1, 4, **CHECKPOINTED), after).decision
    assert back.placed and back.nodes == ["n1"] and "ml/mover" not in after.moves


def test_recorded_moves_that_are_over_are_not_taken_up() -> None:
    record = {"nodes": ["n1"], "reason": "making room", "decided": "2026-11-23T12:00:00Z"}
    late = running_one("late", 4, "n0", **CHECKPOINTED)
    late["status"]["pendingMove"] = record
    ended = running_one("ended", 4, "n0", **CHECKPOINTED)
    ended["status"].update(phase="Succeeded", pendingMove=record)
    state = QueueState()
    decided = 1_795_435_200.0  # 2026-11-23T12:00:00Z
    state.adopt(recorded_moves([late, ended]), decided + MOVE_HOLD_S + 1)
    assert state.moves == {}  # past the hold, or the gang ended
    state.adopt(recorded_moves([late, ended]), decided + 1)
    assert list(state.moves) == ["ml/late"]


def test_a_move_that_cannot_happen_is_dropped() -> None:
    bodies = [running_one("mover", 4, "n0", **CHECKPOINTED)]
    state = QueueState()
    snapshot = queue_snapshot(NODES, [busy("n0", 4), busy("n1", 4)], [], now=NOW,
                              movable=movable_gangs(bodies), policy=DEFRAG)
    place(snapshot, job("whole", 1, 8), state)
    assert "ml/mover" in state.moves
    assert state.move_for("ml/mover", "Succeeded") is None and state.moves == {}  # it ended first
    place(snapshot, job("whole", 1, 8), state)
    assert "ml/mover" in state.moves
    # never carried out: the next pass after the hold drops it
    place(queue_snapshot(NODES, [], [], now=NOW + MOVE_HOLD_S + 1), job("other", 1, 4), state)
    assert state.moves == {}
    # migration off, or only defragmentation off (the default): the queue moves nothing
    for policy in (QueuePolicy(migration=False, defragment=True), QueuePolicy()):
        off = QueueState()
        snapshot = queue_snapshot(NODES, [busy("n0", 4), busy("n1", 4)], [], now=NOW,
                                  policy=policy, movable=movable_gangs(bodies))
        result = place(snapshot, job("whole", 1, 8), off)
        assert off.moves == {} and list(result.moving) == []


def test_a_pass_is_a_value_and_the_queue_state_changes_only_when_it_is_applied() -> None:
    assert queue_snapshot([], [busy("n0", 4)]) is None  # no Nodes: nothing to place on
    bodies = [running_one("mover", 4, "n0", **CHECKPOINTED)]
    snapshot = queue_snapshot(NODES, [busy("n0", 4), busy("n1", 4)], queued_jobs([body("big", 2, 8)]),
                              now=NOW, policy=replace(STRICT, defragment=True), movable=movable_gangs(bodies))
    assert snapshot is not None
    state = QueueState()
    result = queue_pass(snapshot, job("whole", 1, 8, created="2026-11-23T11:00:00Z"), state)
    assert not result.decision.placed and result.reservation is not None
    assert list(result.moves) == ["ml/mover"]
    assert state == QueueState()  # deciding changed nothing
    assert queue_pass(snapshot, job("whole", 1, 8, created="2026-11-23T11:00:00Z"), state) == result
    state.apply(result)
    assert state.reservation == result.reservation and state.moves == dict(result.moves)


def test_a_gang_about_to_start_spread_waits_for_the_moves_that_make_room_in_one_domain() -> None:
    # cliques a (n0, n1) and b (n2, n3): the 2 x 8-GPU gang fits now only over n1 + n2; moving the
    # 1-GPU gang off n0 onto n3 gives it clique a, and an hour spread would cost it more than that
    nodes = [gpu_node("n0", clique="a", rack="r1"), gpu_node("n1", clique="a", rack="r1"),
             gpu_node("n2", clique="b", rack="r2"), gpu_node("n3", clique="b", rack="r2")]
    bodies = [running_one("mover", 1, "n0", **CHECKPOINTED)]
    state = QueueState()
    pods = [busy("n0", 1), busy("n3", 7)]
    snapshot = queue_snapshot(nodes, pods, [], now=NOW, movable=movable_gangs(bodies))
    pair = job("pair", 2, 8, created="2026-11-23T11:00:00Z", activeDeadlineSeconds=3600)
    result = place(snapshot, pair, state)
    assert not result.decision.placed and "NVLink domain" in result.decision.reason
    pending = state.moves["ml/mover"]
    assert pending.move.to.nodes == ["n3"] and pending.move.for_gang == "ml/pair"
    assert pending.move.for_level == "nvlink"
    # while the mover is still on n0 the gang keeps waiting for clique a rather than spreading
    snapshot = queue_snapshot(nodes, pods, [], now=NOW + 5)
    assert not place(snapshot, pair, state).decision.placed
    # the mover restarted on n3: the gang starts in clique a
    back = place(snapshot, job("mover", 1, 1, **CHECKPOINTED), state).decision
    assert back.placed and back.nodes == ["n3"]
    snapshot = queue_snapshot(nodes, [busy("n3", 8)], [], now=NOW + 10)
    placed = place(snapshot, pair, state).decision
    assert placed.placed and sorted(placed.nodes) == ["n0", "n1"]
    # switched off, the same gang starts spread at once
    snapshot = queue_snapshot(nodes, pods, [], now=NOW, movable=movable_gangs(bodies),
                              policy=QueuePolicy(locality_moves=False))
    spread = place(snapshot, pair, QueueState()).decision
    assert spread.placed and sorted(spread.nodes) == ["n1", "n2"]


def test_a_locality_hold_survives_an_operator_restart() -> None:
    # as above: the move off n0 makes room in clique a for pair, which is held to it meanwhile
    nodes = [gpu_node("n0", clique="a", rack="r1"), gpu_node("n1", clique="a", rack="r1"),
             gpu_node("n2", clique="b", rack="r2"), gpu_node("n3", clique="b", rack="r2")]
    bodies = [running_one("mover", 1, "n0", **CHECKPOINTED)]
    pods = [busy("n0", 1), busy("n3", 7)]
    before = QueueState()
    pair = job("pair", 2, 8, created="2026-11-23T11:00:00Z", activeDeadlineSeconds=3600)
    place(queue_snapshot(nodes, pods, [], now=NOW, movable=movable_gangs(bodies)), pair, before)
    decided = before.moves["ml/mover"]
    assert decided.move.for_level == "nvlink" and decided.status()["forLevel"] == "nvlink"
    # the shell writes the move into the mover's status; the operator restarts (memory empty)
    restarting = running_one("mover", 1, "n0", **CHECKPOINTED)
    restarting["status"].update(phase="Restarting", pendingMove=decided.status())
    after = QueueState()
    after.adopt(recorded_moves([restarting]), NOW + 5)
    adopted = after.moves["ml/mover"].move
    assert (adopted.for_gang, adopted.for_level) == ("ml/pair", "nvlink")
    # the mover is still on n0: pair keeps waiting for clique a instead of starting over n1 + n2
    waiting = place(queue_snapshot(nodes, pods, [], now=NOW + 5), pair, after).decision
    assert not waiting.placed and "NVLink domain" in waiting.reason
    # a record without forLevel (a defragmentation move) holds nobody
    plain = dict(decided.status())
    del plain["forLevel"]
    restarting["status"]["pendingMove"] = plain
    other = QueueState()
    other.adopt(recorded_moves([restarting]), NOW + 5)
    assert other.moves["ml/mover"].move.for_level is None


def test_a_pass_over_the_same_node_objects_reuses_their_index_and_counts_pods_afresh() -> None:
    index = NodeIndex()
    first = queue_snapshot(NODES, [busy("n0", 4)], (), now=NOW, node_index=index)
    assert first is not None and [first.inventory.free(n) for n in ("n0", "n1")] == [4, 8]
    # the same objects (as the watch-fed cache hands them out until a Node changes): the index is
    # the same, the pods are counted again
    later = queue_snapshot(list(NODES), [busy("n1", 8), busy("n0", 2)], (), now=NOW, node_index=index)
    fresh = queue_snapshot(NODES, [busy("n1", 8), busy("n0", 2)], (), now=NOW)
    assert later is not None and fresh is not None
    assert later.inventory.nodes is first.inventory.nodes
    assert fresh.inventory.nodes is not first.inventory.nodes
    free = [later.inventory.free(n) for n in ("n0", "n1")]
    assert free == [fresh.inventory.free(n) for n in ("n0", "n1")] == [6, 0]
    # an equal but new object (a Node that changed and came back), fewer Nodes or other levels:
    # indexed again (the first by a patch: it keeps its name and domains)
    for nodes, levels in (([NODES[0], {**NODES[1]}], DEFAULT_LEVELS), (NODES[:1], DEFAULT_LEVELS),
                          (NODES, TopologyLevels(DEFAULT_LEVELS.levels[:2]))):
        kept = index.inventory
        assert kept is not None
        again = index.build(nodes, [], levels)
        assert again.nodes is not kept.nodes


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per node index built from scratch by the placement adapter."""
    import capstan.kube.placement as placement

    built: list[int] = []
    real = placement.build_inventory

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(placement, "build_inventory", counting)
    return built


def test_a_node_cordoned_or_moved_is_seen_by_the_next_pass_patched_or_indexed_again(
        builds: list[int]) -> None:
    nodes = [gpu_node(f"n{i}", clique="a", rack="r1") for i in range(4)]
    index = NodeIndex()
    index.build(nodes, [busy("n0", 8)], DEFAULT_LEVELS)
    assert len(builds) == 1
    # n1 is cordoned (a new object for it alone): patched, and no pass may place on n1
    cordoned = {**nodes[1], "spec": {"unschedulable": True}}
    inv = index.build([nodes[0], cordoned, *nodes[2:]], [busy("n0", 8)], DEFAULT_LEVELS)
    assert len(builds) == 1 and inv.node("n1").cordoned and inv.free("n0") == 0
    snapshot = queue_snapshot([nodes[0], cordoned, *nodes[2:]], [busy("n0", 8)],
                              queued_jobs([body("pair", 2, 8)]), now=NOW, node_index=index)
    assert snapshot is not None and len(builds) == 1
    assert sorted(place(snapshot, snapshot.queued[0], QueueState()).decision.nodes) == ["n2", "n3"]
    # n3 moves to another rack: its domains changed, so the index is built again
    moved = gpu_node("n3", clique="b", rack="r2")
    inv = index.build([nodes[0], cordoned, nodes[2], moved], [], DEFAULT_LEVELS)
    assert len(builds) == 2 and inv.domain_of("n3", "rack") != inv.domain_of("n2", "rack")


def test_nodes_added_deleted_or_flipping_ready_are_patched_into_the_kept_index(builds: list[int]) -> None:
    nodes = [gpu_node(f"n{i:02d}", clique="a" if i < 4 else "b", rack="r1") for i in range(16)]
    index = NodeIndex()
    index.build(nodes, [busy("n00", 8)], DEFAULT_LEVELS)
    pair = queued_jobs([body("pair", 2, 8, topology={"policy": "Required", "maxDomain": "nvlink"})])[0]

    def placed(nodes: list[dict[str, Any]]) -> list[str]:
        """Where a pass on the kept index puts the pair, checked against a pass on a new index."""
        kept = queue_snapshot(nodes, [busy("n00", 8)], [pair], now=NOW, node_index=index)
        anew = queue_snapshot(nodes, [busy("n00", 8)], [pair], now=NOW)
        assert kept is not None and anew is not None
        there = sorted(place(kept, pair, QueueState()).decision.nodes)
        assert there == sorted(place(anew, pair, QueueState()).decision.nodes)
        return there

    assert placed(nodes) == ["n01", "n02"]  # the fullest NVLink domain with room: a
    # n01 deleted and n02 NotReady: a has room for one worker left, so the pair goes to b
    down = [nodes[0], gpu_node("n02", clique="a", rack="r1", ready=False), *nodes[3:]]
    assert placed(down) == ["n04", "n05"]
    assert index.inventory is not None and index.inventory.not_ready == ("n02",)
    # n02 Ready again and a new node in a: back to a, with the new node
    up = [nodes[0], gpu_node("n02", clique="a", rack="r1"), *nodes[3:],
          gpu_node("n03b", clique="a", rack="r1")]
    assert placed(up) == ["n02", "n03"]
    assert placed([*up[:2], *up[3:]]) == ["n02", "n03b"]  # and without n03
    assert len(builds) == 5  # the passes on new indexes only: every change was patched in
    # a node in a rack that did not exist: the kept index is built again too
    assert placed([*up, gpu_node("n99", clique="c", rack="r2")]) == ["n02", "n03"]
    assert len(builds) == 7


def test_the_pass_decides_with_the_cyclic_collector_paused_and_turns_it_back_on(
        monkeypatch: Any) -> None:
    import gc

    import capstan.kube.placement as placement

    seen: list[bool] = []
    real = placement.schedule_queue

    def spying(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(placement, "schedule_queue", spying)
    assert gc.isenabled()
    queued = queued_jobs([body("big", 2, 8)])
    result = place(queue_snapshot(NODES, [], queued, now=NOW), queued[0], QueueState())
    assert result.decision.placed
    assert seen == [False] and gc.isenabled()
