"""The placement adapter of the TrainingJob controller: cluster objects in, one gang's decision out.

Gangs are not placed one by one in whatever order their reconcile loops happen to run. Every
placement is one pass of :func:`capstan.topology.schedule_queue` over the gangs Capstan has queued
(TrainingJobs in phase ``Queued`` that Capstan places) plus the gang asking now, in queue order:
priority, then age. The first gang that does not fit is the head; it gets a reservation (the
GPUs it waits for), and a gang behind it may start only outside those GPUs, so a stream of small
gangs cannot starve a big one. The reservation is kept between passes in :class:`QueueState`
(operator memory: after a restart the next pass simply computes it again).

How the queue runs is the operator's :class:`~capstan.topology.QueuePolicy` (environment, checked
at startup): by default a blocked gang gets its reservation after 24 h (before that anything
behind it that fits starts), and gangs that declare ``activeDeadlineSeconds`` get EASY backfill
(a gang whose limit ends before the head's expected start may use reserved GPUs) and the
cost-based locality wait, judged from running gangs' declared ends. This is the policy
``bench/placement.py`` measures as "capstan".

Defragmentation moves (``QueuePolicy.migration``, on by default): when a queued gang waits only
because the idle GPUs are scattered over partly used nodes, the pass may pick one-worker gangs
that allow moving (``spec.topology.migration: IfCheckpointed`` with a checkpoint to resume from)
and move them to other partly used nodes. The pass records each move in :class:`QueueState` and
holds its destination; the moving job's loop stops its pods, and when it asks for placement again
it gets that destination. One defragmentation is in flight at a time; a move not carried out
within ``MOVE_HOLD_S`` is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from capstan.api.conditions import parse_time
from capstan.api.loading import InvalidResource, parse_resource
from capstan.api.trainingjob import TERMINAL_PHASES, TrainingJob
from capstan.topology import (
    Decision,
    GangRequest,
    Inventory,
    MovableGang,
    Move,
    PlacementResult,
    QueuePolicy,
    Reservation,
    RunningGang,
    build_inventory,
    levels_from_env,
    plan_defragmentation,
    schedule_queue,
)
from capstan.training.lifecycle import PlacementDecision, Placer

MOVE_HOLD_S = 600.0  # a planned move not carried out by then is dropped (its job ended, or stalled)


@dataclass(frozen=True)
class PendingMove:
    """A move a pass decided: the job (by uid) restarts on ``move.to``; planned at ``since``."""

    move: Move
    uid: str
    since: float


@dataclass
class QueueState:
    """Placement-queue memory shared by the reconcile loops of one operator run."""

    reservation: Reservation | None = None  # the current head's, carried to the next pass
    # uids of queued jobs the last pass found room for: their loops are woken to create gangs
    startable: list[str] = field(default_factory=list)
    # moves decided and not yet placed, by queue key of the gang that moves
    moves: dict[str, PendingMove] = field(default_factory=dict)
    # uids of running jobs the last pass decided to move: their loops are woken to stop the gang
    to_move: list[str] = field(default_factory=list)

    def move_for(self, key: str, phase: str) -> str | None:
        """Why job ``key`` in ``phase`` should move now, or None; drops a move it can no longer make."""
        pending = self.moves.get(key)
        if pending is None:
            return None
        if phase == "Running":
            return pending.move.reason
        if phase != "Restarting":  # it ended or was suspended: nothing to move, release the hold
            del self.moves[key]
        return None


def pinned_node(pod: Mapping[str, Any]) -> str | None:
    """The node a pod is bound to, or pinned to by a single-node ``metadata.name`` affinity."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    terms = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", {}
    ).get("nodeSelectorTerms") or []
    for term in terms:
        for field_ in term.get("matchFields") or []:
            if field_.get("key") == "metadata.name" and field_.get("operator") == "In":
                values = field_.get("values") or []
                if len(values) == 1:
                    return str(values[0])
    return None


def wants_placement(job: TrainingJob) -> bool:
    """GPU gangs are placed by Capstan; CPU jobs and Kueue-managed jobs are not."""
    return job.spec.gpus_per_worker > 0 and not job.spec.queue_name


def queue_key(job: TrainingJob) -> str:
    """The job's name in the placement queue (and in reasons naming the queue head)."""
    return f"{job.metadata.namespace}/{job.metadata.name}"


def _submitted(job: TrainingJob) -> float:
    """Queue age: creation time in epoch seconds (0 when the server did not say)."""
    created = parse_time((job.metadata.model_extra or {}).get("creationTimestamp"))
    return created.timestamp() if created else 0.0


def _placed_by_capstan(bodies: Sequence[Mapping[str, Any]]) -> list[TrainingJob]:
    """Valid TrainingJobs that Capstan places (invalid ones: their own status says why)."""
    out = []
    for body in bodies:
        try:
            job = parse_resource(dict(body))
        except InvalidResource:
            continue
        if isinstance(job, TrainingJob) and wants_placement(job):
            out.append(job)
    return out


def queued_jobs(bodies: Sequence[Mapping[str, Any]]) -> list[TrainingJob]:
    """The TrainingJobs waiting in Capstan's placement queue: phase Queued, placed by Capstan.

    Jobs never reconciled yet (no phase) are left out: they join the queue on their first pass,
    so a job a scoped-out operator never looks at cannot hold anyone back.
    """
    waiting = [b for b in bodies if (b.get("status") or {}).get("phase") == "Queued"]
    return [j for j in _placed_by_capstan(waiting) if not j.spec.suspend]


def running_gangs(bodies: Sequence[Mapping[str, Any]], now: float) -> list[RunningGang]:
    """Placed Capstan gangs still holding GPUs, with their declared end where they declare one.

    The end is ``startTime + activeDeadlineSeconds`` (``now +`` the limit while the gang is still
    starting): an upper bound, since the lifecycle stops the gang there. Without a limit it is
    unknown, and the queue falls back to reservations that need no run times.
    """
    out = []
    for job in _placed_by_capstan([b for b in bodies if (b.get("status") or {}).get("placement")]):
        st = job.status
        if st.placement is None or not st.placement.nodes or st.phase in TERMINAL_PHASES:
            continue
        started_at = parse_time(st.start_time)
        started = started_at.timestamp() if started_at else now
        limit = job.spec.active_deadline_seconds
        end = started + limit + st.moved_seconds if limit is not None else None  # moves extend the limit
        out.append(RunningGang(_current(job), started, end))
    return out


def _current(job: TrainingJob) -> PlacementResult:
    st = job.status
    assert st.placement is not None
    return PlacementResult(queue_key(job), True, list(st.placement.nodes), job.spec.gpus_per_worker,
                           level=st.placement.level or None, domain=st.placement.domain or None)


def movable_gangs(bodies: Sequence[Mapping[str, Any]]) -> list[tuple[MovableGang, str]]:
    """Running Capstan gangs the queue may move, with their uids.

    A job qualifies when ``spec.movable`` (migration allowed and a checkpoint to resume from), it is
    ``Running`` with a placement, and its ``Running`` condition says since when (the move rule
    counts ``min_run_s`` from there).
    """
    out = []
    running_now = [b for b in bodies if (b.get("status") or {}).get("phase") == "Running"]  # parse only these
    for job in _placed_by_capstan(running_now):
        st = job.status
        if not job.spec.movable or st.placement is None or not st.placement.nodes:
            continue
        running = next((c for c in st.conditions if c.type == "Running" and c.status == "True"), None)
        since = parse_time(running.last_transition_time if running else None)
        if since is None:
            continue
        out.append((MovableGang(gang_request(job), _current(job), since.timestamp()), job.metadata.uid or ""))
    return out


def gang_request(job: TrainingJob) -> GangRequest:
    """The job's gang as the placement queue sees it."""
    spec = job.spec
    return GangRequest(
        name=queue_key(job),
        workers=spec.workers,
        gpus_per_worker=spec.gpus_per_worker,
        policy=spec.topology.policy,
        max_domain=spec.topology.max_domain,
        needs_rdma=spec.wants_rdma,
        tolerations=spec.pod_tolerations(),
        priority=spec.priority,
        submitted=_submitted(job),
        gpu_product=spec.node_selector.get("nvidia.com/gpu.product"),
        expected_duration_s=spec.active_deadline_seconds,
    )


def make_placer(
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    queued: Sequence[TrainingJob] = (),
    state: QueueState | None = None,
    now: float | None = None,
    running: Sequence[RunningGang] = (),
    policy: QueuePolicy | None = None,
    movable: Sequence[tuple[MovableGang, str]] = (),
) -> Placer | None:
    """A :data:`Placer` over the cluster's Nodes and Pods and the queued gangs; None without Nodes.

    Pods pinned by node affinity but not yet bound by the scheduler count as using their node:
    a gang placed a moment ago holds its GPUs before kube-scheduler binds it. ``state`` carries the
    head's reservation from pass to pass and receives the queued jobs this pass could start.
    ``now`` (epoch seconds, default the clock) is the time the queue ages gangs against;
    ``running`` are the placed gangs (:func:`running_gangs`) and ``policy`` the queue's tunables
    (default :class:`QueuePolicy`); ``movable`` (:func:`movable_gangs`) are the gangs a
    defragmentation may move. Decided moves go to ``state.moves`` and ``state.to_move``.
    """
    if not nodes:
        return None
    bound = []
    for pod in pods:
        node = pinned_node(pod)
        if node and not (pod.get("spec") or {}).get("nodeName"):
            pod = {**pod, "spec": {**(pod.get("spec") or {}), "nodeName": node}}
        bound.append(pod)
    inventory = build_inventory(nodes, bound, levels_from_env())
    state = state if state is not None else QueueState()
    at = time.time() if now is None else now
    queue_policy = policy or QueuePolicy()
    options = queue_policy.queue_kwargs()
    for key, pending in list(state.moves.items()):
        if at - pending.since > MOVE_HOLD_S:
            del state.moves[key]

    def placer(job: TrainingJob) -> PlacementDecision:
        me = queue_key(job)
        mine = state.moves.pop(me, None)
        held: dict[str, int] = {}  # other moves' destinations, kept for the gangs that move there
        for pending in state.moves.values():
            for node, gpus in pending.move.to.gpus_by_node().items():
                held[node] = held.get(node, 0) + gpus
        inv = inventory.add_usage(held)
        if mine is not None and all(inv.free(n) >= g for n, g in mine.move.to.gpus_by_node().items()):
            return _decision(mine.move.to)  # the moving gang goes where its move planned
        others = {queue_key(j): j for j in queued if queue_key(j) != me}
        requests = [gang_request(j) for j in others.values()] + [gang_request(job)]
        decisions = schedule_queue(
            inv, requests, running=running, now=at, reservation=state.reservation, **options
        )
        state.reservation = next((d.reservation for d in decisions if d.reservation is not None), None)
        state.startable = [others[d.name].metadata.uid for d in decisions if d.placed and d.name in others]
        if queue_policy.migration and not state.moves:  # one defragmentation in flight at a time
            _plan_moves(inv, decisions, movable, at, queue_policy, state)
        return _decision(next(d for d in decisions if d.name == me).result)

    return placer


def _decision(result: PlacementResult) -> PlacementDecision:
    return PlacementDecision(
        placed=result.placed,
        nodes=list(result.nodes),
        level=result.level or "",
        domain=result.domain or "",
        reason=result.reason,
    )


def _plan_moves(inv: Inventory, decisions: Sequence[Decision], movable: Sequence[tuple[MovableGang, str]],
                now: float, policy: QueuePolicy, state: QueueState) -> None:
    """Defragmentation for the gangs this pass left waiting; records the moves in ``state``."""
    waiting = [d.request for d in decisions if not d.placed]
    if not waiting or not movable:
        return
    for d in decisions:
        if d.placed:
            inv = inv.allocate(d.result)  # gangs starting from this pass hold their GPUs already
    uids = {m.request.name: uid for m, uid in movable}
    moves = plan_defragmentation(inv, waiting, [m for m, _ in movable], now, policy.moves)
    for mv in moves:
        state.moves[mv.gang] = PendingMove(mv, uids[mv.gang], now)
        state.to_move.append(uids[mv.gang])


__all__ = [
    "MOVE_HOLD_S", "PendingMove", "QueueState", "gang_request", "make_placer", "movable_gangs", "pinned_node",
    "queue_key", "queued_jobs", "running_gangs", "wants_placement",
]
