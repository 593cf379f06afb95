"""kopf handlers for TrainingJob: read the world, call the pure gang lifecycle, apply its plan.

Triggering. Each TrainingJob gets one kopf *daemon*: a reconcile loop that runs, then sleeps until
``plan.requeue_after`` (or a resync period) or until something wakes it. Pod events (pods carrying
the job-uid label) and TrainingJob events only set the job's wake-up flag. So:

* reconciles of one job never overlap (one loop per job), yet different jobs run in parallel;
* a burst of 128 pod events collapses into one or two reconciles (the flag coalesces them);
* a requeue is an exact sleep, with no retry bookkeeping written to the object (a
  ``kopf.TemporaryError`` or a timer would fire late or persist progress; an index would hold
  possibly stale pods right after we created them — the loop reads them from the API instead).

Each reconcile: GET the job (the freshest status: status is the lifecycle's memory), LIST its pods,
plan, then apply in order: status patch, creates, pod deletes, Events, requeue, TTL delete. Every
step is idempotent (deterministic names, create-if-absent, delete-if-present, merge patches), so a
crash or an operator restart at any point converges to the same result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from capstan import GROUP, VERSION
from capstan.api.condition_types import ConditionType
from capstan.api.conditions import CREATE_FAILED, parse_time, rfc3339, set_condition
from capstan.api.loading import InvalidResource, parse_resource
from capstan.api.trainingjob import TERMINAL_PHASES, TrainingJob, TrainingJobStatus
from capstan.checkpoints.snapshots import LABEL_REASON, SnapshotPlan, plan_snapshots, snapshots_in_use
from capstan.kube.apply import (
    MODELSERVINGS,
    NODES,
    PODS,
    PVCS,
    SERVICES,
    TRAININGJOBS,
    VOLUME_SNAPSHOTS,
    ApiClient,
    ApiError,
    owner_of,
)
from capstan.kube.placement import (
    QueueState,
    make_placer,
    movable_gangs,
    pinned_node,
    queue_key,
    queued_jobs,
    running_gangs,
    wants_placement,
)
from capstan.kube.runtime import (
    Reported,
    operator_config,
    reconcile_loop,
    refused_by_server,
    wake,
    wake_all,
)
from capstan.kube.status import reconcile_live, status_merge_patch
from capstan.metrics import (
    GANG_RESTARTS,
    GANG_WAITING_SECONDS,
    GPUS_ALLOCATED,
    QUEUE_WAIT_SECONDS,
)
from capstan.metrics import (
    TRAININGJOBS as TRAININGJOBS_GAUGE,
)
from capstan.naming import LABEL_JOB, LABEL_JOB_UID, label_value
from capstan.training.lifecycle import (
    PlacementDecision,
    Placer,
    Plan,
    plan_trainingjob,
    refused,
)
from capstan.training.pods import checkpoint_claim_name, selector, service_name

KIND = "TrainingJob"
PHASES = ("Pending", "Queued", "Starting", "Running", "Restarting", "Succeeded", "Failed", "Suspended")


# -- placement adapter ---------------------------------------------------------------------------


class _NeedsPlacement(Exception):
    """Raised by the probe placer: this plan creates a gang, fetch the inventory first."""


def _probe(job: TrainingJob) -> PlacementDecision:
    raise _NeedsPlacement


def _node_lost(pods: list[dict[str, Any]], gone: set[str]) -> list[dict[str, Any]]:
    """Pods on (or pinned to) a deleted Node, shown to the lifecycle as Failed/NodeLost."""
    if not gone:
        return pods
    out = []
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase")
        if pinned_node(pod) in gone and phase not in ("Succeeded", "Failed"):
            pod = {**pod, "status": {**(pod.get("status") or {}), "phase": "Failed", "reason": "NodeLost"}}
        out.append(pod)
    return out


# -- metrics -------------------------------------------------------------------------------------


class _Metrics:
    """Keeps the per-namespace phase gauge and the GPU-allocation gauge consistent."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}
        self.gpus: dict[tuple[str, str], tuple[str, str, int]] = {}
        self.domains: set[tuple[str, str]] = set()

    def observe(
        self, job: TrainingJob, old: TrainingJobStatus, new: TrainingJobStatus, now: datetime
    ) -> None:
        ns, name = job.metadata.namespace, job.metadata.name
        self.phases[(ns, name)] = new.phase
        self._phase_gauge(ns)
        if new.restarts > old.restarts or new.preemptions > old.preemptions or new.moves > old.moves:
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
        self.phases.pop((namespace, name), None)
        self.gpus.pop((namespace, name), None)
        self._phase_gauge(namespace)
        self._gpu_gauge()
        with contextlib.suppress(KeyError):
            GANG_WAITING_SECONDS.remove(namespace, name)

    def _phase_gauge(self, ns: str) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for (job_ns, _), phase in self.phases.items():
            if job_ns == ns:
                counts[phase] = counts.get(phase, 0) + 1
        for phase, n in counts.items():
            TRAININGJOBS_GAUGE.labels(ns, phase).set(n)

    def _gpu_gauge(self) -> None:
        sums: dict[tuple[str, str], int] = {}
        for level, domain, gpus in self.gpus.values():
            sums[(level, domain)] = sums.get((level, domain), 0) + gpus
        for key in self.domains - set(sums):
            GPUS_ALLOCATED.labels(*key).set(0)
        for key, gpus in sums.items():
            GPUS_ALLOCATED.labels(*key).set(gpus)
        self.domains |= set(sums)


METRICS = _Metrics()


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
        METRICS.phases[(namespace, name)] = (body.get("status") or {}).get("phase") or "Pending"
        METRICS._phase_gauge(namespace)

    async def step(body: dict[str, Any], job: Any, now: datetime) -> float | None:
        assert isinstance(job, TrainingJob)
        return await _reconcile_job(api, body, job, now, memo, logger)

    return await reconcile_live(
        KIND, api, TRAININGJOBS, namespace, name, uid, logger, step, ConditionType.ADMITTED, None, invalid
    )


async def _reconcile_job(
    api: ApiClient,
    body: dict[str, Any],
    job: TrainingJob,
    now: datetime,
    memo: kopf.Memo,
    logger: kopf.Logger,
) -> float | None:
    """Plan the valid, live ``job`` and apply the plan in order (see the module docstring)."""
    namespace, name = job.metadata.namespace, job.metadata.name
    pods = await api.list_pods(namespace, selector(job))
    pods = _node_lost(pods, memo.get("gone_nodes") or set())
    # set at startup: each object's memo is a shallow copy, so all loops share it
    queue: QueueState = memo["placement_queue"]
    move = queue.move_for(queue_key(job), job.status.phase) if wants_placement(job) else None
    levels = operator_config(memo).topology_levels
    probe = _probe if wants_placement(job) else None
    try:
        plan = plan_trainingjob(job, pods, now, placer=probe, move=move, levels=levels)
    except _NeedsPlacement:
        lock: asyncio.Lock = memo["placement_lock"]
        async with lock:  # place and create under one lock: no two gangs get the same GPUs
            placer = await _fetch_placer(api, memo, queue, namespace, logger)
            plan = plan_trainingjob(job, pods, now, placer=placer, levels=levels)
            snaps = await _plan_snapshots(api, job, plan, pods, now)
            await _apply_status(api, job, body, plan, now, logger)
            await _apply_snapshots(api, body, snaps, logger)
            refusal = await _create(api, plan.create)
        for other in queue.startable:  # queued gangs this pass found room for: start them now
            wake(memo, other)
        moving, queue.to_move = set(queue.to_move), []
        for key, pending in queue.moves.items():  # gangs this pass moves to make room: stop them now
            if pending.uid in moving:
                logger.info("moving %s to %s: %s", key, ",".join(pending.move.to.nodes), pending.move.reason)
                wake(memo, pending.uid)
    else:
        snaps = await _plan_snapshots(api, job, plan, pods, now)
        await _apply_status(api, job, body, plan, now, logger)
        await _apply_snapshots(api, body, snaps, logger)
        refusal = await _create(api, plan.create)
    if refusal is not None or (plan.create and plan.on_created is not None):
        await _settle_creates(api, job, body, plan, refusal, now, logger)
    if plan.delete_pods:
        await api.delete_pods(namespace, plan.delete_pods)
    if _frees_gpus(job, plan):
        wake_all(memo)  # queued gangs may fit now, rather than at their next recheck
    if plan.events:
        await asyncio.gather(*(api.post_event(body, e.reason, e.message, e.type) for e in plan.events))
    if plan.delete_job:
        logger.info("ttlSecondsAfterFinished passed: deleting the TrainingJob")
        await api.delete(TRAININGJOBS, namespace, name)
        return None
    return plan.requeue_after


async def _plan_snapshots(
    api: ApiClient, job: TrainingJob, plan: Plan, pods: list[dict[str, Any]], now: datetime
) -> SnapshotPlan | None:
    """Plan VolumeSnapshots for the job's new status and fold them into ``plan`` (status, requeue)."""
    if job.spec.checkpoint.snapshots is None or job.spec.checkpoint.volume is None:
        return None
    ns, name = job.metadata.namespace, job.metadata.name
    try:
        snapshots = await api.list_objects(VOLUME_SNAPSHOTS, ns, {LABEL_JOB: label_value(name)})
        available = True
    except ApiError as exc:
        if not exc.not_found:  # 404: the cluster has no snapshot CRDs; say so and go on
            raise
        snapshots, available = [], False
    try:
        in_use = snapshots_in_use(await api.list_objects(MODELSERVINGS, ns), name)
    except ApiError as exc:
        if not exc.not_found:
            raise
        in_use = set()
    stopped = not any((p.get("status") or {}).get("phase") in ("Pending", "Running", "Unknown") for p in pods)
    planned = job.model_copy(update={"status": plan.status})
    snaps = plan_snapshots(planned, snapshots, in_use, now, available, workers_stopped=stopped)
    for status in (plan.status, plan.on_created):
        if status is None:
            continue
        if available:
            status.checkpoints = snaps.records
        if snaps.condition is not None:
            ok, reason, message = snaps.condition
            status.conditions = set_condition(
                status.conditions,
                ConditionType.CHECKPOINT_READY,
                "True" if ok else "False",
                reason,
                message,
                now=now,
                generation=job.metadata.generation,
            )
    if snaps.requeue_after is not None:
        plan.requeue_after = min(plan.requeue_after or snaps.requeue_after, snaps.requeue_after)
    return snaps


async def _apply_snapshots(
    api: ApiClient, body: Mapping[str, Any], snaps: SnapshotPlan | None, logger: kopf.Logger
) -> None:
    """Create planned snapshots (idempotent names) and delete the ones retention let go."""
    if snaps is None:
        return
    created = await api.create_many(snaps.create) if snaps.create else []
    for obj, new in zip(snaps.create, created, strict=True):
        if new:
            reason = obj["metadata"]["labels"].get(LABEL_REASON, "Scheduled")
            message = f"VolumeSnapshot {obj['metadata']['name']} of the checkpoint volume ({reason})"
            logger.info("snapshot %s created (%s)", obj["metadata"]["name"], reason)
            await api.post_event(body, "SnapshotCreated", message, "Normal")
    ns = (body.get("metadata") or {}).get("namespace")
    for name in snaps.delete:
        await api.delete(VOLUME_SNAPSHOTS, ns, name)
        await api.post_event(body, "SnapshotDeleted", f"VolumeSnapshot {name} removed by retention", "Normal")


def _frees_gpus(job: TrainingJob, plan: Plan) -> bool:
    """Whether applying ``plan`` gives GPUs back (pods deleted, or the gang just ended)."""
    gpu_gang = job.spec.gpus_per_worker > 0
    ended = plan.status.phase in TERMINAL_PHASES and job.status.phase not in TERMINAL_PHASES
    return gpu_gang and (bool(plan.delete_pods) or ended)


async def _fetch_placer(
    api: ApiClient, memo: kopf.Memo, queue: QueueState, namespace: str, logger: kopf.Logger
) -> Placer | None:
    try:
        nodes, pods = await asyncio.gather(api.list_objects(NODES), api.list_objects(PODS))
    except ApiError as exc:
        if exc.status != 403:
            raise
        logger.warning("cannot list nodes/pods cluster-wide (%s): creating the gang unplaced", exc.reason)
        return None
    try:
        jobs = await api.list_objects(TRAININGJOBS)
    except ApiError as exc:
        if exc.status != 403:
            raise
        # an operator scoped to namespaces queues the gangs of the namespace it can see
        logger.warning("cannot list TrainingJobs cluster-wide (%s): queue of %s only", exc.reason, namespace)
        jobs = await api.list_objects(TRAININGJOBS, namespace)
    now = time.time()
    config = operator_config(memo)
    return make_placer(nodes, pods, queued_jobs(jobs), queue, now, running_gangs(jobs, now), config.queue,
                       movable_gangs(jobs), levels=config.topology_levels)


async def _apply_status(
    api: ApiClient, job: TrainingJob, body: Mapping[str, Any], plan: Plan, now: datetime, logger: kopf.Logger
) -> None:
    old, new = job.status, plan.status
    patch = status_merge_patch(body.get("status"), new)
    if patch:
        await api.patch_status(TRAININGJOBS, job.metadata.namespace, job.metadata.name, patch)
        if old.phase != new.phase:
            logger.info("phase %s -> %s: %s", old.phase, new.phase, new.message)
    METRICS.observe(job, old, new, now)


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
    refusal: ApiError | None,
    now: datetime,
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
    status = refused(job, plan.status, refusal.message, now)
    patch = status_merge_patch(written, status)
    if patch:
        await api.patch_status(TRAININGJOBS, namespace, name, patch)
    METRICS.observe(job, plan.status, status, now)
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
    await reconcile_loop(KIND, reconcile, name, namespace, uid, memo, logger, stopped, ConditionType.ADMITTED)


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
    gone: set[str] = memo.get("gone_nodes", set())
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
    cleanup immediate and visible, and works where no collector runs.
    """
    assert namespace is not None  # TrainingJob is namespaced
    api: ApiClient = memo["api"]
    pods = await api.list_pods(namespace, {LABEL_JOB_UID: uid})
    await api.delete_pods(namespace, [p["metadata"]["name"] for p in pods])
    try:
        job = parse_resource(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "metadata": {"name": name, "namespace": namespace, "uid": uid},
                "spec": dict(spec),
            }
        )
    except InvalidResource:
        job = None
    if isinstance(job, TrainingJob):
        svc = await api.get(SERVICES, namespace, service_name(job))
        if svc is not None and owner_of(svc, KIND) == (name, uid):
            await api.delete(SERVICES, namespace, service_name(job))
        claim = checkpoint_claim_name(job)
        pvc = await api.get(PVCS, namespace, claim) if claim else None
        if claim and pvc is not None and owner_of(pvc, KIND) == (name, uid):
            await api.delete(PVCS, namespace, claim)
    METRICS.forget(namespace, name)
    logger.info("deleted %d worker pod(s) and owned children", len(pods))


__all__ = ["make_placer", "reconcile", "rfc3339", "status_merge_patch", "wants_placement"]
