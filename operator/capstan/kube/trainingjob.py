"""kopf handlers for TrainingJob: read the world, call the pure gang lifecycle, apply its plan.

Triggering. Each TrainingJob gets one kopf *daemon*: a reconcile loop that runs, then sleeps until
``plan.requeue_after`` (or a resync period) or until something wakes it. Pod events (pods carrying
the job-uid label) and TrainingJob events only set the job's wake-up flag. So:

* reconciles of one job never overlap (one loop per job), yet different jobs run in parallel;
* a burst of 128 pod events collapses into one or two reconciles (the flag coalesces them);
* a requeue is an exact sleep, with no retry bookkeeping written to the object (a
  ``kopf.TemporaryError`` or a timer would fire late or persist progress; a kopf index would hold
  possibly stale pods right after we created them — the loop reads the caches below instead, which
  store what the operator wrote from the write's answer).

Each reconcile is observe → plan → apply. Observe: the job (the freshest status: status is the
lifecycle's memory), its pods, whether its Service and checkpoint PVC exist (and its VolumeSnapshots
when it keeps them). With the watch-fed caches synced (:mod:`capstan.kube.cache`) these come from
memory: the operator's own writes are stored there from their answers, and every watch event about
the job or its children wakes its loop, so a pass never ends on a view older than what woke it.
Without them (caches off, not yet synced, or refused by RBAC), or for an object memory lacks, the
pass GETs and lists as before. Plan, pure: the gang lifecycle with the snapshots folded in; a gang
that Capstan's queue places first gets a plan that only says so, and is planned again, under the
placement lock, with a queue pass's decision (:mod:`capstan.kube.placement`). The lock covers the
decision only: reading memory, the next pass counts the GPUs just given as held from
:attr:`TrainingState.inflight` until the status write lands in the cache (listing, it covers the
write too, as the next pass could list before it lands). Apply in order: status patch, snapshots,
creates, pod deletes, Events, requeue, TTL delete. Every step is idempotent (deterministic names,
create-if-absent, delete-if-present, merge patches), so a crash or an operator restart at any point
converges to the same result.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import kopf

from capstan import GROUP, VERSION
from capstan.api.condition_types import ConditionType
from capstan.api.conditions import CREATE_FAILED, parse_time, rfc3339
from capstan.api.loading import InvalidObject, parse_object
from capstan.api.trainingjob import TERMINAL_PHASES, TrainingJob, TrainingJobStatus
from capstan.checkpoints.snapshots import SnapshotPlan, SnapshotsSeen, snapshots_in_use, with_snapshots
from capstan.fields import dig
from capstan.kube.activities import operator_config, shared_state
from capstan.kube.cache import ClusterCache
from capstan.kube.client import ApiClient, ApiError, gather_bounded, owner_of
from capstan.kube.placement import (
    NodeIndex,
    ParsedJobs,
    PendingMove,
    PlacedJobs,
    QueuePass,
    QueueSnapshot,
    QueueState,
    pinned_node,
    placed_without_pods,
    queue_key,
    queue_pass,
    queue_snapshot,
    wants_placement,
)
from capstan.kube.reconciler import Reported, reconcile_loop, refused_by_server, wake, wake_all
from capstan.kube.resources import (
    MODELSERVINGS,
    NODES,
    PODS,
    PVCS,
    SERVICES,
    TRAININGJOBS,
    VOLUME_SNAPSHOTS,
    ApiResource,
)
from capstan.kube.scrape import metrics_url, scrape_progress
from capstan.kube.status import fetch_live, reconcile_live, status_merge_patch
from capstan.labels import LABEL_ATTEMPT, LABEL_JOB, LABEL_JOB_UID, LABEL_RANK, LABEL_SNAPSHOT_REASON
from capstan.metrics import (
    GANG_RESTARTS,
    GANG_WAITING_SECONDS,
    GPUS_ALLOCATED,
    QUEUE_WAIT_SECONDS,
    PhaseGauge,
)
from capstan.metrics import (
    TRAININGJOBS as TRAININGJOBS_GAUGE,
)
from capstan.naming import label_value
from capstan.security import DEFAULT_OPERATOR_NAMESPACE
from capstan.topology import DEFAULT_LEVELS, TopologyLevels
from capstan.training.lifecycle import PlacementDecision, Plan, plan_trainingjob, refused
from capstan.training.pods import (
    METRICS_PORT,
    checkpoint_claim_name,
    checkpoint_pvc,
    needs_service,
    selector,
    service_name,
)
from capstan.training.progress import PROGRESS_RECHECK_S, Progress

KIND = "TrainingJob"
CACHE_ARRIVAL_S = 2.0  # how long a pass waits for a job the cache has not seen yet before a GET
CLEANUP_RETRY_S = 2.0  # the deletion handler's retry after a transient API failure (kopf's: 60 s)
PHASES = (
    "Pending", "Queued", "Starting", "Running", "Restarting", "Succeeded", "Failed", "Suspended", "Lent",
)


# -- placement adapter ---------------------------------------------------------------------------


def _node_lost(pods: list[dict[str, Any]], gone: set[str]) -> list[dict[str, Any]]:
    """Pods on (or pinned to) a deleted Node, shown to the lifecycle as Failed/NodeLost."""
    if not gone:
        return pods
    out = []
    for pod in pods:
        phase = dig(pod, "status", "phase")
        if pinned_node(pod) in gone and phase not in ("Succeeded", "Failed"):
            pod = {**pod, "status": {**(pod.get("status") or {}), "phase": "Failed", "reason": "NodeLost"}}
        out.append(pod)
    return out


# -- metrics -------------------------------------------------------------------------------------


class JobMetrics:
    """Keeps the per-namespace phase gauge and the GPU-allocation gauge consistent."""

    def __init__(self) -> None:
        self.phases = PhaseGauge(TRAININGJOBS_GAUGE, PHASES)
        self.gpus: dict[tuple[str, str], tuple[str, str, int]] = {}
        self.domains: set[tuple[str, str]] = set()

    def observe(
        self, job: TrainingJob, old: TrainingJobStatus, new: TrainingJobStatus, now: datetime
    ) -> None:
        """Export what changed from status ``old`` to ``new`` (phase, restarts, waiting, GPUs)."""
        ns, name = job.metadata.namespace, job.metadata.name
        self.phases.set(ns, name, new.phase)
        counters = ("restarts", "preemptions", "moves", "hardware_restarts", "startup_timeouts")
        if any(getattr(new, c) > getattr(old, c) for c in counters):
            running = next((c for c in new.conditions if c.type == "Running"), None)
            GANG_RESTARTS.labels(ns, running.reason if running else "Unknown").inc()
        placed = next((c for c in new.conditions if c.type == ConditionType.PLACED), None)
        if new.phase == "Queued" and placed is not None and placed.status == "False":
            queued_at = parse_time(placed.last_transition_time) or now
            GANG_WAITING_SECONDS.labels(ns, name).set(max((now - queued_at).total_seconds(), 0.0))
        else:
            GANG_WAITING_SECONDS.labels(ns, name).set(0)
        if old.phase == "Queued" and new.placement is not None and old.placement is None:
            old_placed = next((c for c in old.conditions if c.type == ConditionType.PLACED), None)
            since = parse_time(old_placed.last_transition_time if old_placed else None)
            if since is not None:
                QUEUE_WAIT_SECONDS.observe(max((now - since).total_seconds(), 0.0))
        if new.placement is not None and new.phase in ("Starting", "Running"):
            self.gpus[(ns, name)] = (new.placement.level, new.placement.domain, job.spec.total_gpus)
        else:
            self.gpus.pop((ns, name), None)
        self._gpu_gauge()

    def forget(self, namespace: str, name: str) -> None:
        """The job ``namespace/name`` is gone: drop its series."""
        self.phases.forget(namespace, name)
        self.gpus.pop((namespace, name), None)
        self._gpu_gauge()
        with contextlib.suppress(KeyError):
            GANG_WAITING_SECONDS.remove(namespace, name)

    def _gpu_gauge(self) -> None:
        sums: dict[tuple[str, str], int] = {}
        for level, domain, gpus in self.gpus.values():
            sums[(level, domain)] = sums.get((level, domain), 0) + gpus
        for key in self.domains - set(sums):
            GPUS_ALLOCATED.labels(*key).set(0)
        for key, gpus in sums.items():
            GPUS_ALLOCATED.labels(*key).set(gpus)
        self.domains |= set(sums)


# -- shared state --------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """What the TrainingJob handlers share across objects in one operator run."""

    queue: QueueState = field(default_factory=QueueState)  # placement-queue memory between passes
    # serialises "decide a gang's placement, then record it in its status", so no two gangs see the
    # same free GPUs (a placed gang's status claims its GPUs until its pods exist)
    placement_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # decisions made under the lock whose status write is still on its way (by queue key,
    # ``{node: GPUs}``): passes reading memory count them as held meanwhile (see _reconcile_job)
    inflight: dict[str, dict[str, int]] = field(default_factory=dict)
    gone_nodes: set[str] = field(default_factory=set)  # Nodes seen deleted: pods there are lost
    parsed: ParsedJobs = field(default_factory=ParsedJobs)  # the cluster's jobs, as placement reads them
    nodes: NodeIndex = field(default_factory=NodeIndex)  # the last pass's node index, reused while valid
    metrics: JobMetrics = field(default_factory=JobMetrics)
    # rank 0's last scrape per job uid: (monotonic time, gang attempt, what it reported)
    progress: dict[str, tuple[float, int, Progress | None]] = field(default_factory=dict)


@kopf.on.startup(id="training-state")
def init_state(memo: kopf.Memo, **_: Any) -> None:
    """Create the shared state on the operator memo (objects' memos are shallow copies of it)."""
    memo["training"] = TrainingState()


def _state(memo: kopf.Memo) -> TrainingState:
    return shared_state(memo, "training", TrainingState)


# -- reconcile -----------------------------------------------------------------------------------


async def reconcile(
    api: ApiClient,
    namespace: str,
    name: str,
    uid: str | None,
    memo: kopf.Memo,
    logger: kopf.Logger,
) -> float | None:
    """One level-based pass over TrainingJob ``namespace/name``; returns seconds until the next.

    None means "nothing scheduled": only an event (pod, spec change) or the resync wakes it.
    """

    def invalid(body: Mapping[str, Any]) -> None:
        _state(memo).metrics.phases.set(namespace, name, dig(body, "status", "phase") or "Pending")

    async def step(body: dict[str, Any], job: Any, now: datetime) -> float | None:
        assert isinstance(job, TrainingJob)
        return await _reconcile_job(api, body, job, now, memo, logger)

    async def read() -> dict[str, Any] | None:
        return await _read_job(api, memo.get("cache"), namespace, name, uid)

    return await reconcile_live(
        KIND,
        api,
        TRAININGJOBS,
        namespace=namespace,
        name=name,
        uid=uid,
        logger=logger,
        step=step,
        condition=ConditionType.ADMITTED,
        phase=None,
        on_invalid=invalid,
        read=read,
    )


async def _read_job(
    api: ApiClient, cluster: ClusterCache | None, namespace: str, name: str, uid: str | None
) -> dict[str, Any] | None:
    """The job to reconcile from the synced cache (a copy: the pass may change it), or from the API
    server when memory lacks it or holds another incarnation of the name; None when it is gone or
    being deleted.

    A job kopf has just told its loop about may reach the cache's own watch a moment later: the read
    waits for it up to :data:`CACHE_ARRIVAL_S` rather than GET it at once.
    """
    cached = await cluster.job(namespace, name, CACHE_ARRIVAL_S) if cluster is not None else None
    if cached is None or (uid and dig(cached, "metadata", "uid") != uid):
        return await fetch_live(api, TRAININGJOBS, namespace, name, uid)
    if dig(cached, "metadata", "deletionTimestamp"):
        return None
    return copy.deepcopy(cached)


async def _reconcile_job(
    api: ApiClient,
    body: dict[str, Any],
    job: TrainingJob,
    now: datetime,
    memo: kopf.Memo,
    logger: kopf.Logger,
) -> float | None:
    """Observe, plan and apply for the valid, live ``job`` (see the module docstring).

    A gang that Capstan's queue places is planned twice: the first plan only says it needs
    placement; then, under the placement lock, a queue pass decides over a snapshot of the
    cluster, the shell keeps what the pass leaves for the next one, and the plan made with its
    decision is applied before the lock is released (no two gangs get the same GPUs).
    """
    state = _state(memo)
    seen = await _observe(api, job, state.gone_nodes, state.progress, memo.get("cache"))
    placed_by_queue = wants_placement(job)
    if placed_by_queue:
        state.queue.adopt([job], time.time())  # a move decided before an operator restart
    move = state.queue.move_for(queue_key(job), job.status.phase) if placed_by_queue else None
    config = operator_config(memo)
    levels, namespace = config.topology_levels, config.operator_namespace
    plan, snaps = _plan(job, seen, now, move=move, placed_by_queue=placed_by_queue, levels=levels,
                        operator_namespace=namespace)
    if not plan.needs_placement:
        await _write_status(api, job, body, plan, now=now, metrics=state.metrics, logger=logger)
        refusal = await _apply_children(api, body, plan, snaps=snaps, logger=logger)
        await _record_moves(api, job, state.queue, ())
    else:
        key, claim = queue_key(job), None
        async with state.placement_lock:
            cluster: ClusterCache | None = memo.get("cache")
            from_memory = cluster is not None and cluster.ready
            snapshot = await _queue_snapshot(api, memo, job.metadata.namespace, logger)
            result = queue_pass(snapshot, job, state.queue) if snapshot is not None else None
            if result is not None:
                state.queue.apply(result)
            plan, snaps = _plan(job, seen, now, result.decision if result else None, move=move, levels=levels,
                                operator_namespace=namespace)
            if from_memory and not (result and result.moving) and job.status.pending_move is None:
                # The next pass builds its snapshot from memory without awaiting, so a claim kept
                # in memory until the status write has landed (and fed the cache) is as good as
                # the write: the lock goes now, and other gangs are decided while it travels.
                claim = placed_without_pods([_with_status(body, plan)], seen.pods).get(key, {})
                state.inflight[key] = claim
            else:
                # The decision is recorded before the lock goes: the status names the gang's nodes,
                # and the next pass, listing after it, counts those GPUs as held until the pods exist.
                await _write_status(api, job, body, plan, now=now, metrics=state.metrics, logger=logger)
                # the next pass must not take up a move this one carried out
                await _record_moves(api, job, state.queue, result.moving if result else ())
        if claim is not None:
            try:
                # (no move to record: a pass that decided or cleared one wrote under the lock)
                await _write_status(api, job, body, plan, now=now, metrics=state.metrics, logger=logger)
            finally:
                state.inflight.pop(key, None)  # the cache holds the status now (or it was not written)
        if result is not None:
            _wake_queue(memo, result, logger)
        # the gang's objects are created outside the lock: other gangs are placed meanwhile
        refusal = await _apply_children(api, body, plan, snaps=snaps, logger=logger)
    return await _finish(api, job, body, plan, refusal=refusal, now=now, memo=memo, logger=logger)


# -- observe -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Observed:
    """What one pass reads about a job before planning."""

    pods: list[dict[str, Any]]  # its worker pods, those on deleted Nodes shown as lost
    snapshots: SnapshotsSeen | None  # None: the job keeps no snapshots
    service_exists: bool | None = None  # its headless Service (None: not looked at)
    pvc_exists: bool | None = None  # the checkpoint PVC the operator creates (None: not looked at)
    rank0: Progress | None = None  # what the current gang's rank 0 reports on its metrics endpoint


def _rank0_url(job: TrainingJob, pods: list[dict[str, Any]]) -> str | None:
    """The metrics URL of the current gang's rank 0, while it runs."""
    for pod in pods:
        labels = dig(pod, "metadata", "labels") or {}
        if labels.get(LABEL_RANK) == "0" and labels.get(LABEL_ATTEMPT) == str(job.status.attempt):
            return metrics_url(pod, METRICS_PORT)
    return None


async def _rank0_progress(
    job: TrainingJob, pods: list[dict[str, Any]], cache: dict[str, tuple[float, int, Progress | None]]
) -> Progress | None:
    """Rank 0's progress, scraped at most every PROGRESS_RECHECK_S per gang (an unreachable
    endpoint costs a timeout), and at every pass while a checkpoint request waits for its answer."""
    url = _rank0_url(job, pods) if job.status.phase not in TERMINAL_PHASES else None
    uid, attempt = job.metadata.uid, job.status.attempt
    if url is None:
        cache.pop(uid, None)
        return None
    request = job.status.checkpoint_request
    waiting = request is not None and request.outcome == "Pending"
    cached = cache.get(uid)
    now = time.monotonic()
    if cached is not None and cached[1] == attempt and now - cached[0] < PROGRESS_RECHECK_S and not waiting:
        return cached[2]
    rank0 = await scrape_progress(url)
    cache[uid] = (now, attempt, rank0)
    return rank0


async def _observe(
    api: ApiClient,
    job: TrainingJob,
    gone_nodes: set[str],
    cache: dict[str, tuple[float, int, Progress | None]] | None = None,
    cluster: ClusterCache | None = None,
) -> _Observed:
    """The job's pods, whether its Service and checkpoint PVC are there (while it has pods), rank 0's
    progress (a scrape of its metrics while it runs) and, when it keeps snapshots, its
    VolumeSnapshots and those in use. Pods, Service and PVC come from ``cluster`` when it is synced."""
    ns, name = job.metadata.namespace, job.metadata.name
    cached = cluster.pods_of(job.metadata.uid or "") if cluster is not None else None
    if cached is not None and _would_wait_on(job, cached):
        cached = None
    listed = cached if cached is not None else await api.list_pods(ns, selector(job))
    service_exists, pvc_exists = await _children_exist(api, job, cluster) if listed else (None, None)
    rank0 = await _rank0_progress(job, listed, {} if cache is None else cache)
    pods = _node_lost(listed, gone_nodes | await _missing_nodes(api, listed, cluster))
    if job.spec.checkpoint.snapshots is None or job.spec.checkpoint.volume is None:
        return _Observed(pods, None, service_exists, pvc_exists, rank0)
    try:
        snapshots = await api.list_objects(VOLUME_SNAPSHOTS, ns, {LABEL_JOB: label_value(name)})
        available = True
    except ApiError as exc:
        if not exc.not_found:  # 404: the cluster has no snapshot CRDs; the plan says so and goes on
            raise
        snapshots, available = [], False
    try:
        in_use = snapshots_in_use(await api.list_objects(MODELSERVINGS, ns), name)
    except ApiError as exc:
        if not exc.not_found:
            raise
        in_use = set()
    return _Observed(pods, SnapshotsSeen(snapshots, in_use, available), service_exists, pvc_exists, rank0)


def _would_wait_on(job: TrainingJob, pods: list[dict[str, Any]]) -> bool:
    """Whether memory shows pods the gang's next step waits to see gone: a previous attempt's, or
    terminating ones. Then the pass reads its pods from the API server: a cache that missed a
    deletion would otherwise keep the gang waiting for a pod that no longer exists, with no event
    ever coming to end the wait. Such pods show up only around a restart, so the reads are few."""
    attempt = str(job.status.attempt)
    return any(dig(p, "metadata", "labels", LABEL_ATTEMPT) != attempt
               or dig(p, "metadata", "deletionTimestamp") for p in pods)


async def _missing_nodes(
    api: ApiClient, pods: list[dict[str, Any]], cluster: ClusterCache | None
) -> set[str]:
    """Nodes the pods are bound or pinned to that do not exist: the synced node cache lacks them and
    a read of each confirms it (a Node created a moment ago may not be in the cache yet).

    This is what makes node loss survive an operator restart: the Node's deletion event is gone by
    then, but the pods' nodes are still missing.
    """
    if cluster is None:
        return set()
    missing = set()
    for node in {n for pod in pods if (n := pinned_node(pod))}:
        if cluster.node_known(node) is False and await api.get(NODES, None, node) is None:
            missing.add(node)
    return missing


async def _children_exist(
    api: ApiClient, job: TrainingJob, cluster: ClusterCache | None = None
) -> tuple[bool | None, bool | None]:
    """Whether the job's headless Service and the checkpoint PVC the operator creates are there
    (None: not looked at — the job is finished or suspended, or has no such Service or PVC). Looked at only
    while the job has pods: creating a gang creates them anyway.

    A namesake that is being deleted, or that a previous TrainingJob of the same name owns (the
    garbage collector is about to remove it), does not count: the plan creates the job's own once
    it is gone. A create that met such a namesake answered 409 and created nothing.
    """
    if job.status.phase in TERMINAL_PHASES or job.spec.suspend:
        return None, None
    uid = job.metadata.uid or ""
    ns, claim = job.metadata.namespace, checkpoint_pvc(job)
    service = None
    if needs_service(job):
        service = _ours(await _child(api, cluster, SERVICES, ns, service_name(job)), uid)
    if claim is None:
        return service, None
    return service, _ours(await _child(api, cluster, PVCS, ns, claim["metadata"]["name"]), uid)


async def _child(
    api: ApiClient, cluster: ClusterCache | None, res: ApiResource, namespace: str, name: str
) -> dict[str, Any] | None:
    """A child of a TrainingJob from the synced cache, else (not there: gone, or never labelled
    as a child) from the API server."""
    children = cluster.children(res) if cluster is not None else None
    found = children.get(f"{namespace}/{name}") if children is not None else None
    return found if found is not None else await api.get(res, namespace, name)


def _ours(obj: Mapping[str, Any] | None, uid: str) -> bool:
    """Present, not being deleted, and not left by another TrainingJob of the same name."""
    if obj is None or dig(obj, "metadata", "deletionTimestamp"):
        return False
    owner = owner_of(obj, KIND)
    return owner is None or owner[1] == uid


async def _queue_snapshot(
    api: ApiClient, memo: kopf.Memo, namespace: str, logger: kopf.Logger
) -> QueueSnapshot | None:
    """Read what a queue pass decides over; None without readable Nodes (the gang goes unplaced)."""
    view = await cluster_view(api, memo, namespace, logger)
    return _snapshot_of(memo, *view) if view is not None else None


async def cluster_view(
    api: ApiClient, memo: kopf.Memo, namespace: str, logger: kopf.Logger
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]] | None:
    """(Nodes, Pods, TrainingJobs) that placement decides over; None without readable Nodes.

    From the watch-fed caches once they are synced (:mod:`capstan.kube.cache`); by listing the
    cluster otherwise (caches off, still listing, or not allowed to watch cluster-wide).
    """
    cluster: ClusterCache | None = memo.get("cache")
    if cluster is not None and cluster.ready:
        return cluster.nodes.items(), cluster.pods.items(), cluster.jobs.items()
    try:
        nodes, pods = await gather_bounded([api.list_objects(NODES), api.list_objects(PODS)])
    except ApiError as exc:
        if exc.status != 403:
            raise
        logger.warning("cannot list nodes/pods cluster-wide (%s): nothing is placed", exc.reason)
        return None
    try:
        jobs = await api.list_objects(TRAININGJOBS)
    except ApiError as exc:
        if exc.status != 403:
            raise
        # an operator scoped to namespaces queues the gangs of the namespace it can see
        logger.warning("cannot list TrainingJobs cluster-wide (%s): queue of %s only", exc.reason, namespace)
        jobs = await api.list_objects(TRAININGJOBS, namespace)
    return nodes, pods, jobs


def _snapshot_of(
    memo: kopf.Memo, nodes: list[dict[str, Any]], pods: list[dict[str, Any]], jobs: list[dict[str, Any]]
) -> QueueSnapshot | None:
    now = time.time()
    config = operator_config(memo)
    # moves recorded in statuses that memory lacks (an operator restart): their destinations stay held
    state = _state(memo)
    placed = PlacedJobs(jobs, state.parsed)  # each job read once for every part of the snapshot
    state.queue.adopt(placed.recorded_moves(), now)
    return queue_snapshot(
        nodes,
        pods,
        placed.queued(),
        now=now,
        running=placed.running(now),
        policy=config.queue,
        movable=placed.movable(now),
        claimed=held_by_placed_gangs(memo, jobs, pods, placed),
        levels=config.topology_levels,
        node_index=state.nodes,
    )


def held_by_placed_gangs(
    memo: kopf.Memo, jobs: list[dict[str, Any]], pods: list[dict[str, Any]], placed: PlacedJobs | None = None
) -> dict[str, dict[str, int]]:
    """GPUs placed gangs hold where their pods do not exist yet, by queue key: what their statuses
    say (:meth:`PlacedJobs.without_pods`; ``placed``: ``jobs`` read already), and the decisions
    whose status write is still on its way."""
    state = _state(memo)
    placed = placed if placed is not None else PlacedJobs(jobs, state.parsed)
    return {**placed.without_pods(pods), **state.inflight}


def _with_status(body: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    """``body`` with the plan's status, as the cache will hold it once the write lands."""
    return {**body, "status": plan.status.wire()}


# -- plan ----------------------------------------------------------------------------------------


def _plan(
    job: TrainingJob,
    seen: _Observed,
    now: datetime,
    placement: PlacementDecision | None = None,
    *,
    move: str | None,
    placed_by_queue: bool = False,
    levels: TopologyLevels = DEFAULT_LEVELS,
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
) -> tuple[Plan, SnapshotPlan | None]:
    """The gang lifecycle's plan with the snapshots folded in (pure)."""
    plan = plan_trainingjob(
        job, seen.pods, now, placement, service_exists=seen.service_exists, pvc_exists=seen.pvc_exists,
        move=move, placed_by_queue=placed_by_queue, levels=levels, rank0=seen.rank0,
        operator_namespace=operator_namespace,
    )
    if plan.needs_placement or seen.snapshots is None:
        return plan, None
    return with_snapshots(job, plan, seen.pods, seen.snapshots, now)


# -- apply ---------------------------------------------------------------------------------------


async def _write_status(
    api: ApiClient,
    job: TrainingJob,
    body: Mapping[str, Any],
    plan: Plan,
    *,
    now: datetime,
    metrics: JobMetrics,
    logger: kopf.Logger,
) -> None:
    """Write the plan's status (a merge patch of what changed) and export what changed."""
    old, new = job.status, plan.status
    patch = status_merge_patch(body.get("status"), new)
    if patch:
        await api.patch_status(TRAININGJOBS, job.metadata.namespace, job.metadata.name, patch)
        if old.phase != new.phase:
            logger.info("phase %s -> %s: %s", old.phase, new.phase, new.message)
    metrics.observe(job, old, new, now)


async def _apply_children(
    api: ApiClient, body: Mapping[str, Any], plan: Plan, *, snaps: SnapshotPlan | None, logger: kopf.Logger
) -> ApiError | None:
    """After the status: snapshots, then the gang's objects; the server's refusal, if any."""
    await _apply_snapshots(api, body, snaps, logger)
    return await _create(api, plan.create)


async def _record_moves(
    api: ApiClient, job: TrainingJob, queue: QueueState, decided: Sequence[PendingMove]
) -> None:
    """Keep the queue's moves in the movers' statuses (``status.pendingMove``): write the moves a
    pass ``decided``, and clear ``job``'s own once the queue no longer holds it (carried out or
    dropped). Failures are left to the next pass: memory still holds the move meanwhile."""
    writes: list[tuple[str, str, dict[str, Any] | None]] = []
    for pending in decided:
        namespace, _, name = pending.move.gang.partition("/")
        writes.append((namespace, name, pending.status()))
    if job.status.pending_move is not None and queue_key(job) not in queue.moves:
        writes.append((job.metadata.namespace, job.metadata.name, None))
    for namespace, name, record in writes:
        try:
            await api.patch_status(TRAININGJOBS, namespace, name, {"pendingMove": record})
        except ApiError as exc:
            if exc.status == 0 or exc.status >= 500 or exc.not_found:
                continue
            raise


def _wake_queue(memo: kopf.Memo, result: QueuePass, logger: kopf.Logger) -> None:
    """Wake the jobs a queue pass names: queued gangs it found room for, and gangs it moves."""
    for uid in result.startable:
        wake(memo, uid)
    for pending in result.moving:
        move = pending.move
        logger.info("moving %s to %s: %s", move.gang, ",".join(move.to.nodes), move.reason)
        wake(memo, pending.uid)


async def _finish(
    api: ApiClient,
    job: TrainingJob,
    body: Mapping[str, Any],
    plan: Plan,
    *,
    refusal: ApiError | None,
    now: datetime,
    memo: kopf.Memo,
    logger: kopf.Logger,
) -> float | None:
    """After the creates: settle them, annotate and delete pods, post Events, delete the job at its TTL."""
    if refusal is not None or (plan.create and plan.on_created is not None):
        await _settle_creates(
            api, job, body, plan, refusal=refusal, now=now, metrics=_state(memo).metrics, logger=logger
        )
    for pod, wanted in plan.annotate_pods.items():  # a checkpoint request to rank 0
        await _annotate_pod(api, job.metadata.namespace, pod, wanted)
    if plan.delete_pods:
        await api.delete_pods(job.metadata.namespace, plan.delete_pods)
    if _frees_gpus(job, plan):
        wake_all(memo)  # queued gangs may fit now, rather than at their next recheck
    if plan.events:
        await asyncio.gather(*(api.post_event(body, e.reason, e.message, e.type) for e in plan.events))
    if plan.delete_job:
        logger.info("ttlSecondsAfterFinished passed: deleting the TrainingJob")
        await api.delete(TRAININGJOBS, job.metadata.namespace, job.metadata.name)
        return None
    return plan.requeue_after


async def _annotate_pod(api: ApiClient, namespace: str, pod: str, annotations: dict[str, str]) -> None:
    """Merge ``annotations`` into worker ``pod``; a pod already gone is no error (the next pass sees it)."""
    try:
        await api.patch(PODS, namespace, pod, {"metadata": {"annotations": annotations}})
    except ApiError as exc:
        if not exc.not_found:
            raise


async def _apply_snapshots(
    api: ApiClient, body: Mapping[str, Any], snaps: SnapshotPlan | None, logger: kopf.Logger
) -> None:
    """Create planned snapshots (idempotent names) and delete the ones retention let go."""
    if snaps is None:
        return
    created = await api.create_many(snaps.create) if snaps.create else []
    for obj, new in zip(snaps.create, created, strict=True):
        if new:
            reason = obj["metadata"]["labels"].get(LABEL_SNAPSHOT_REASON, "Scheduled")
            message = f"VolumeSnapshot {obj['metadata']['name']} of the checkpoint volume ({reason})"
            logger.info("snapshot %s created (%s)", obj["metadata"]["name"], reason)
            await api.post_event(body, "SnapshotCreated", message, "Normal")
    ns = dig(body, "metadata", "namespace")
    for name in snaps.delete:
        await api.delete(VOLUME_SNAPSHOTS, ns, name)
        await api.post_event(body, "SnapshotDeleted", f"VolumeSnapshot {name} removed by retention", "Normal")


def _frees_gpus(job: TrainingJob, plan: Plan) -> bool:
    """Whether applying ``plan`` gives GPUs back (pods deleted, or the gang just ended)."""
    gpu_gang = job.spec.gpus_per_worker > 0
    ended = plan.status.phase in TERMINAL_PHASES and job.status.phase not in TERMINAL_PHASES
    return gpu_gang and (bool(plan.delete_pods) or ended)


async def _create(api: ApiClient, objs: list[dict[str, Any]]) -> ApiError | None:
    """Create the Service/PVC first (rendezvous DNS, volume), then all pods concurrently.

    Returns the API server's refusal (see :func:`refused_by_server`) instead of raising it; other
    errors raise.
    """
    first = [o for o in objs if o.get("kind") != "Pod"]
    pods = [o for o in objs if o.get("kind") == "Pod"]
    try:
        if first:
            await api.create_many(first)
        if pods:
            await api.create_many(pods)
    except ApiError as exc:
        if refused_by_server(exc):
            return exc
        raise
    return None


async def _settle_creates(
    api: ApiClient,
    job: TrainingJob,
    body: Mapping[str, Any],
    plan: Plan,
    *,
    refusal: ApiError | None,
    now: datetime,
    metrics: JobMetrics,
    logger: kopf.Logger,
) -> None:
    """After the creates: a refusal goes into the status (Admitted=False/CreateFailed with the
    server's message, no claim of workers that do not exist) and a Warning Event, then the pass
    ends as a reported failure (the loop backs off); creates that worked after a refusal write
    ``plan.on_created``. The live status is ``plan.status`` here: this pass wrote it."""
    namespace, name = job.metadata.namespace, job.metadata.name
    written = plan.status.wire()
    if refusal is None:
        assert plan.on_created is not None
        patch = status_merge_patch(written, plan.on_created)
        if patch:
            await api.patch_status(TRAININGJOBS, namespace, name, patch)
        logger.info("the gang's objects were created after an earlier refusal")
        return
    status = refused(job, plan.status, refusal.message, now, creating=plan.creating_workers)
    patch = status_merge_patch(written, status)
    if patch:
        await api.patch_status(TRAININGJOBS, namespace, name, patch)
    metrics.observe(job, plan.status, status, now)
    await api.post_event(body, CREATE_FAILED, refusal.message, "Warning")
    raise Reported(f"creating the gang's objects was refused: {refusal}")


# -- handlers ------------------------------------------------------------------------------------


@kopf.daemon(GROUP, VERSION, "trainingjobs", id="reconcile", cancellation_timeout=5.0)
async def trainingjob_loop(
    name: str,
    namespace: str | None,
    uid: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    """The reconcile loop of one TrainingJob (see the module docstring)."""
    assert namespace is not None  # TrainingJob is namespaced
    await reconcile_loop(
        KIND,
        reconcile,
        name=name,
        namespace=namespace,
        uid=uid,
        memo=memo,
        logger=logger,
        stopped=stopped,
        condition=ConditionType.ADMITTED,
    )


@kopf.on.event(GROUP, VERSION, "trainingjobs", id="wake-on-change")
def trainingjob_changed(uid: str, memo: kopf.Memo, **_: Any) -> None:
    """A TrainingJob changed (spec, suspend, status by someone else): reconcile it now."""
    wake(memo, uid)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB_UID: kopf.PRESENT}, id="wake-owner")
def worker_pod_changed(labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    """A worker pod changed: reconcile its TrainingJob (kopf has no owner re-trigger)."""
    wake(memo, labels.get(LABEL_JOB_UID))


@kopf.on.event("", "v1", "nodes", id="node-gone")
def node_changed(type: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A deleted Node loses the pods on it: wake every job so lost gangs restart at once."""
    gone = _state(memo).gone_nodes
    if type == "DELETED":
        gone.add(name)
        wake_all(memo)
    elif name in gone:
        gone.discard(name)


@kopf.on.delete(GROUP, VERSION, "trainingjobs", id="cleanup")
async def trainingjob_deleted(
    name: str,
    namespace: str | None,
    uid: str,
    spec: Mapping[str, Any],
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Delete the job's pods, Service and owned PVC before the finalizer goes.

    The garbage collector would do the same through ownerReferences; doing it here makes the
    cleanup immediate and visible, and works where no collector runs. An API server that fails
    for a moment (no answer, 429, 5xx, after the client's own retries) is tried again after
    :data:`CLEANUP_RETRY_S`, not after kopf's default minute: the deletion waits on this handler.
    """
    assert namespace is not None  # TrainingJob is namespaced
    try:
        await _delete_children(memo["api"], name, namespace, uid, spec, logger)
    except ApiError as exc:
        if exc.status in (0, 429) or exc.status >= 500:
            raise kopf.TemporaryError(f"cleanup failed, retrying: {exc}", delay=CLEANUP_RETRY_S) from exc
        raise
    state = _state(memo)
    state.metrics.forget(namespace, name)
    state.progress.pop(uid, None)
    state.parsed.forget(uid)


async def _delete_children(
    api: ApiClient, name: str, namespace: str, uid: str, spec: Mapping[str, Any], logger: kopf.Logger
) -> None:
    """Delete the pods, Service and owned PVC of TrainingJob ``uid`` (see :func:`trainingjob_deleted`)."""
    pods = await api.list_pods(namespace, {LABEL_JOB_UID: uid})
    await api.delete_pods(namespace, [p["metadata"]["name"] for p in pods])
    try:
        job = parse_object(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "metadata": {"name": name, "namespace": namespace, "uid": uid},
                "spec": dict(spec),
            }
        )
    except InvalidObject:
        job = None
    if isinstance(job, TrainingJob):
        svc = await api.get(SERVICES, namespace, service_name(job))
        if svc is not None and owner_of(svc, KIND) == (name, uid):
            await api.delete(SERVICES, namespace, service_name(job))
        claim = checkpoint_claim_name(job)
        pvc = await api.get(PVCS, namespace, claim) if claim else None
        if claim and pvc is not None and owner_of(pvc, KIND) == (name, uid):
            await api.delete(PVCS, namespace, claim)
    logger.info("deleted %d worker pod(s) and owned children", len(pods))


__all__ = ["JobMetrics", "TrainingState", "reconcile", "rfc3339", "status_merge_patch", "wants_placement"]
