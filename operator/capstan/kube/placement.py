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
    GangRequest,
    PlacementResult,
    QueuePolicy,
    Reservation,
    RunningGang,
    build_inventory,
    levels_from_env,
    schedule_queue,
)
from capstan.training.lifecycle import PlacementDecision, Placer


@dataclass
class QueueState:
    """Placement-queue memory shared by the reconcile loops of one operator run."""

    reservation: Reservation | None = None  # the current head's, carried to the next pass
    # uids of queued jobs the last pass found room for: their loops are woken to create gangs
    startable: list[str] = field(default_factory=list)


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
        result = PlacementResult(queue_key(job), True, list(st.placement.nodes), job.spec.gpus_per_worker,
                                 level=st.placement.level or None, domain=st.placement.domain or None)
        out.append(RunningGang(result, started, started + limit if limit is not None else None))
    return out


def make_placer(
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    queued: Sequence[TrainingJob] = (),
    state: QueueState | None = None,
    now: float | None = None,
    running: Sequence[RunningGang] = (),
    policy: QueuePolicy | None = None,
) -> Placer | None:
    """A :data:`Placer` over the cluster's Nodes and Pods and the queued gangs; None without Nodes.

    Pods pinned by node affinity but not yet bound by the scheduler count as using their node:
    a gang placed a moment ago holds its GPUs before kube-scheduler binds it. ``state`` carries the
    head's reservation from pass to pass and receives the queued jobs this pass could start.
    ``now`` (epoch seconds, default the clock) is the time the queue ages gangs against;
    ``running`` are the placed gangs (:func:`running_gangs`) and ``policy`` the queue's tunables
    (default :class:`QueuePolicy`).
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
    options = (policy or QueuePolicy()).queue_kwargs()

    def request(job: TrainingJob) -> GangRequest:
        spec = job.spec
        return GangRequest(
            name=queue_key(job),
            workers=spec.workers,
            gpus_per_worker=spec.gpus_per_worker,
            policy=spec.topology.policy,
            max_domain=spec.topology.max_domain,
            needs_rdma=spec.wants_rdma,
            tolerations=[t.wire() for t in spec.tolerations],
            priority=spec.priority,
            submitted=_submitted(job),
            gpu_product=spec.node_selector.get("nvidia.com/gpu.product"),
            expected_duration_s=spec.active_deadline_seconds,
        )

    def placer(job: TrainingJob) -> PlacementDecision:
        me = queue_key(job)
        others = {queue_key(j): j for j in queued if queue_key(j) != me}
        requests = [request(j) for j in others.values()] + [request(job)]
        decisions = schedule_queue(
            inventory, requests, running=running, now=at, reservation=state.reservation, **options
        )
        state.reservation = next((d.reservation for d in decisions if d.reservation is not None), None)
        state.startable = [others[d.name].metadata.uid for d in decisions if d.placed and d.name in others]
        mine = next(d for d in decisions if d.name == me)
        result = mine.result
        return PlacementDecision(
            placed=result.placed,
            nodes=list(result.nodes),
            level=result.level or "",
            domain=result.domain or "",
            reason=result.reason,
        )

    return placer


__all__ = [
    "QueueState", "make_placer", "pinned_node", "queue_key", "queued_jobs", "running_gangs", "wants_placement"
]
