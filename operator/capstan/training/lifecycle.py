"""The gang lifecycle of a TrainingJob as a pure function: (job, observed pods, now) → plan.

Level-based: every call looks at the whole observed state and says what should be true, so a
plan applied twice, or after an operator restart, changes nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from capstan.api.condition_types import (
    AdmittedReason,
    FailedReason,
    PlacedReason,
    Reason,
    RestartReason,
    RunningReason,
    SucceededReason,
    SuspendedReason,
)
from capstan.api.condition_types import ConditionType as CT
from capstan.api.conditions import (
    get_condition,
    keep_from,
    parse_time,
    refusal_on_record,
    rfc3339,
    set_condition,
)
from capstan.api.trainingjob import (
    TERMINAL_PHASES,
    PlacementStatus,
    TrainingJob,
    TrainingJobStatus,
    WorkerCounts,
)
from capstan.events import Event
from capstan.fields import dig
from capstan.labels import LABEL_ATTEMPT, LABEL_RANK, LABEL_WORKERS, SPEC_DIGEST_ANNOTATION
from capstan.security import nonroot_advice, nonroot_refusal
from capstan.topology.levels import DEFAULT_LEVELS, TopologyLevels
from capstan.training.pods import (
    CONTAINER,
    EXIT_PREEMPTED,
    checkpoint_pvc,
    gang_network_policy,
    headless_service,
    spec_digest,
    worker_pod,
)

MAX_BACKOFF_S = 600.0
QUEUED_RECHECK_S = 15.0


@dataclass(frozen=True)
class PlacementDecision:
    """What the placement engine said about the gang."""

    placed: bool
    nodes: list[str] = field(default_factory=list)
    level: str = ""
    domain: str = ""
    reason: str = ""


@dataclass
class Plan:
    """What the executor should do; ``status`` is the complete new status.

    ``on_created``: while a refusal of the API server is on record (``Admitted=False``,
    :data:`CREATE_FAILED`, this generation), ``status`` keeps showing it and the executor writes
    ``on_created`` once every object of ``create`` was created; a refused create again is
    reported with :func:`refused`.

    ``needs_placement``: the gang is about to be created and Capstan's placement queue places it,
    but no decision was given. Such a plan changes nothing (``status`` is the job's own): the
    caller runs a queue pass and plans again with its decision.
    """

    status: TrainingJobStatus
    create: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    delete_job: bool = False
    on_created: TrainingJobStatus | None = None
    needs_placement: bool = False


@dataclass(frozen=True)
class WorkerState:
    """One observed worker pod, reduced to what the lifecycle needs."""

    name: str
    rank: int
    attempt: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    exit_code: int | None
    terminating: bool
    reason: str = ""
    node: str | None = None
    # The kubelet's refusal to run the image as a non-root user (see capstan.security).
    nonroot_refusal: str = ""
    # The gang size and spec digest the pod was made for (None, "": a pod from an older operator).
    workers: int | None = None
    digest: str = ""


def worker_state(pod: dict[str, Any]) -> WorkerState | None:
    """Reduce a Pod dict to a :class:`WorkerState` (None if it lacks Capstan's labels)."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    try:
        rank, attempt = int(labels[LABEL_RANK]), int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    size = labels.get(LABEL_WORKERS)
    exit_code = None
    statuses = status.get("containerStatuses") or []
    # The worker's own exit code decides (a template may add sidecars that exit differently).
    worker = [cs for cs in statuses if cs.get("name") == CONTAINER]
    for cs in worker or statuses:
        term = dig(cs, "state", "terminated")
        if term is not None:
            exit_code = int(term.get("exitCode", 1))
            if exit_code != 0:
                break
    return WorkerState(
        name=meta.get("name", ""),
        rank=rank,
        attempt=attempt,
        phase=status.get("phase", "Pending"),
        exit_code=exit_code,
        terminating=bool(meta.get("deletionTimestamp")),
        reason=status.get("reason", ""),
        node=dig(pod, "spec", "nodeName"),
        nonroot_refusal=nonroot_refusal(pod) or "",
        workers=int(size) if isinstance(size, str) and size.isdigit() else None,
        digest=str(dig(meta, "annotations", SPEC_DIGEST_ANNOTATION) or ""),
    )


class _Builder:
    """Accumulates status changes, events and actions for one reconcile."""

    def __init__(self, job: TrainingJob, now: datetime, levels: TopologyLevels) -> None:
        self.job = job
        self.now = now
        self.levels = levels
        self.old_phase = job.status.phase
        self.status = job.status.model_copy(deep=True)
        self.status.observed_generation = job.metadata.generation
        self.plan = Plan(status=self.status)

    def condition(self, type_: str, ok: bool, reason: str, message: str) -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type_,
            "True" if ok else "False",
            reason,
            message,
            now=self.now,
            generation=self.job.metadata.generation,
        )

    def phase(self, phase: str, reason: str, message: str, warning: bool = False) -> None:
        self.status.phase = phase  # type: ignore[assignment]
        self.status.message = message
        if phase != self.old_phase:
            self.plan.events.append(Event("Warning" if warning else "Normal", reason, message))

    def requeue(self, seconds: float) -> None:
        cur = self.plan.requeue_after
        self.plan.requeue_after = seconds if cur is None else min(cur, seconds)


def _count(workers: list[WorkerState]) -> WorkerCounts:
    return WorkerCounts(
        active=sum(w.phase in ("Pending", "Running", "Unknown") for w in workers),
        running=sum(w.phase == "Running" for w in workers),
        succeeded=sum(w.phase == "Succeeded" for w in workers),
        failed=sum(w.phase == "Failed" for w in workers),
    )


def _backoff(job: TrainingJob, restarts: int) -> float:
    base = float(job.spec.failure_policy.backoff_seconds)
    # the exponent is capped: 2**1024 overflows a float, and MAX_BACKOFF_S is reached long before
    return min(base * (2 ** min(max(restarts - 1, 0), 32)), MAX_BACKOFF_S) if base else 0.0


def refused(job: TrainingJob, status: TrainingJobStatus, message: str, now: datetime) -> TrainingJobStatus:
    """``status`` after the API server refused to create the gang's objects with ``message``:
    ``Admitted=False``/:data:`CREATE_FAILED`, and nothing claims workers that do not exist —
    phase Pending and no placement while none exists (Starting while some of the gang does)."""
    st = status.model_copy(deep=True)
    gen = job.metadata.generation
    st.conditions = set_condition(
        st.conditions, CT.ADMITTED, "False", Reason.CREATE_FAILED, message, now=now, generation=gen
    )
    st.message = f"the API server refused the gang's objects: {message}"
    if st.workers.active + st.workers.succeeded + st.workers.failed == 0:
        st.phase = "Pending"
        st.placement = None
        if get_condition(st.conditions, CT.PLACED) is not None:
            st.conditions = set_condition(
                st.conditions, CT.PLACED, "False", Reason.CREATE_FAILED,
                "no worker pod could be created", now=now, generation=gen,
            )
    else:
        st.phase = "Starting"
    return st


def plan_trainingjob(
    job: TrainingJob,
    pods: list[dict[str, Any]],
    now: datetime,
    placement: PlacementDecision | None = None,
    *,
    service_exists: bool | None = None,
    pvc_exists: bool | None = None,
    move: str | None = None,
    placed_by_queue: bool = False,
    levels: TopologyLevels = DEFAULT_LEVELS,
) -> Plan:
    """Decide the next step of ``job`` given its observed worker ``pods`` at time ``now``.

    ``placement`` is the placement queue's decision for a gang about to be created. Without one,
    a job ``placed_by_queue`` gets a plan that only says it needs one (``needs_placement``), and
    any other job (local executor, Kueue-managed, CPU) gets its pods unpinned, for the default
    scheduler. ``move`` (why, in words) asks to move a running gang: its pods are stopped and the
    gang is recreated where its next placement says. Ignored unless every worker runs.
    ``service_exists`` / ``pvc_exists``: whether the job's headless Service and the checkpoint PVC
    the operator creates are there (None: not looked at). A new gang's creation always includes
    those not known to exist; while a gang is alive, one known to be missing is created again
    (a create that met a namesake about to go, an object deleted by hand), with a short requeue.
    ``levels`` are the operator's topology levels (see :func:`~capstan.training.pods.worker_pod`).
    A refusal of the API server on record (see :class:`Plan`) stays on show until creating works.
    """
    refusal = refusal_on_record(job.status.conditions, CT.ADMITTED, job.metadata.generation)
    admit = refusal is None
    plan = _plan(
        job, pods, now, placement=placement, placed_by_queue=placed_by_queue, service_exists=service_exists,
        pvc_exists=pvc_exists, move=move, admit=admit, levels=levels,
    )
    if plan.needs_placement:
        return Plan(status=job.status.model_copy(deep=True), needs_placement=True)
    if refusal is not None and plan.create:
        plan.on_created = plan.status.model_copy(deep=True)
        plan.on_created.conditions = set_condition(
            plan.on_created.conditions, CT.ADMITTED, "True", AdmittedReason.VALID, "spec is valid",
            now=now, generation=job.metadata.generation,
        )
        plan.status = _as_refused_before(plan.status, job.status)
    return plan


def _as_refused_before(new: TrainingJobStatus, old: TrainingJobStatus) -> TrainingJobStatus:
    """``new`` with what the last refusal wrote (phase, message, placement, the Admitted and
    Placed conditions) taken from ``old``: while the retries fail, the status does not flap."""
    st = new.model_copy(deep=True)
    st.phase, st.message, st.placement = old.phase, old.message, old.placement
    st.conditions = keep_from(st.conditions, old.conditions, (CT.ADMITTED, CT.PLACED))
    return st


def _plan(
    job: TrainingJob,
    pods: list[dict[str, Any]],
    now: datetime,
    *,
    placement: PlacementDecision | None,
    placed_by_queue: bool,
    service_exists: bool | None,
    pvc_exists: bool | None,
    move: str | None,
    admit: bool,
    levels: TopologyLevels,
) -> Plan:
    b = _Builder(job, now, levels)
    st = b.status
    workers = [w for w in (worker_state(p) for p in pods) if w is not None]
    current = [w for w in workers if w.attempt == st.attempt]
    stale = [w for w in workers if w.attempt != st.attempt]
    st.workers = _count(current)
    if admit:
        b.condition(CT.ADMITTED, True, AdmittedReason.VALID, "spec is valid")

    if st.phase in TERMINAL_PHASES:
        return _finished(b, current + stale)

    if job.spec.suspend:
        for w in workers:
            if not w.terminating:
                b.plan.delete_pods.append(w.name)
        b.condition(CT.SUSPENDED, True, SuspendedReason.SUSPENDED, "spec.suspend is true")
        b.condition(CT.RUNNING, False, RunningReason.SUSPENDED, "workers removed while suspended")
        b.phase("Suspended", "Suspended", "suspended: workers removed, status kept")
        return b.plan
    if st.phase == "Suspended":
        b.condition(CT.SUSPENDED, False, SuspendedReason.RESUMED, "spec.suspend is false")
        b.phase("Pending", "Resumed", "resumed: recreating the gang")

    started = parse_time(st.start_time)
    limit = job.spec.active_deadline_seconds
    if started is not None and limit is not None:
        # downtime of the operator's moves is not the job's: finished ones and the one in progress
        credit = st.moved_seconds
        moving_since = parse_time(st.moving_since)
        if moving_since is not None:
            credit += max(0, int((b.now - moving_since).total_seconds()))
        left = (started + timedelta(seconds=limit + credit) - b.now).total_seconds()
        if left <= 0:
            extra = f" plus {credit}s of moves" if credit else ""
            return _fail(
                b, current + stale, FailedReason.DEADLINE_EXCEEDED,
                f"ran past activeDeadlineSeconds ({limit}s{extra}) counted from startTime {st.start_time}",
            )
        b.requeue(left)  # wake at the deadline even if no pod changes

    # A previous gang must be gone before the next is created: same pod names, same DNS names.
    if stale:
        for w in stale:
            if not w.terminating:
                b.plan.delete_pods.append(w.name)
        if st.phase not in ("Restarting",):
            b.phase("Restarting", "GangRestarting", "waiting for the previous gang to terminate")
        b.requeue(2)
        return b.plan

    failed = [w for w in current if w.phase == "Failed"]
    if failed:
        return _on_failure(b, current, failed)
    root = next((w for w in current if w.nonroot_refusal and not w.terminating), None)
    if root is not None:
        # No restart can help: the same image runs as the same user. Fail now, freeing the GPUs the
        # waiting pods hold, and say how to fix it.
        return _fail(
            b, current, FailedReason.RUN_AS_NON_ROOT,
            f"the kubelet refused to start worker {root.name} ({root.nonroot_refusal}). "
            f"{nonroot_advice('spec.securityContext')}",
        )

    change = _spec_change(job, current)
    if change is not None:
        return _restart(b, current, change[0], change[1], counted=False, tally=False)

    present = {w.rank for w in current}
    missing = [r for r in range(job.spec.workers) if r not in present]
    if current and missing and st.phase == "Running":
        return _restart(
            b, current, RestartReason.WORKER_LOST, f"worker pod(s) of rank {missing} disappeared",
            counted=False,
        )

    if not current:
        return _create_gang(b, placement, placed_by_queue, service_exists, pvc_exists)
    _recreate_missing_children(b, service_exists, pvc_exists)
    if missing:  # a creation interrupted part-way (e.g. operator restart): finish it
        _create_workers(b, missing, _placed_nodes(st))
        b.phase("Starting", "Starting", f"creating {len(missing)} missing worker pod(s)")
        b.requeue(2)
        return b.plan

    if all(w.phase == "Succeeded" for w in current):
        st.completion_time = rfc3339(now)
        b.condition(CT.RUNNING, False, RunningReason.COMPLETED, "all workers exited 0")
        b.condition(
            CT.SUCCEEDED, True, SucceededReason.ALL_WORKERS_SUCCEEDED, f"all {len(current)} workers exited 0"
        )
        b.phase("Succeeded", "Succeeded", f"all {len(current)} workers exited 0")
        _schedule_ttl(b)
        return b.plan
    if all(w.phase in ("Running", "Succeeded") for w in current):
        if move is not None and st.phase == "Running" and all(w.phase == "Running" for w in current):
            return _restart(b, current, RestartReason.MOVED, move, counted=False, moved=True)
        moving_since = parse_time(st.moving_since)
        if moving_since is not None:  # a move is over once the gang runs again
            st.moved_seconds += max(0, int((now - moving_since).total_seconds()))
            st.moving_since = None
        if st.start_time is None:
            st.start_time = rfc3339(now)
            if job.spec.active_deadline_seconds is not None:
                b.requeue(job.spec.active_deadline_seconds)
        b.condition(CT.RUNNING, True, RunningReason.ALL_WORKERS_RUNNING, f"{len(current)} workers running")
        b.phase("Running", "Running", f"all {len(current)} workers running")
        return b.plan
    pending = [w for w in current if w.phase not in ("Running", "Succeeded")]
    b.phase("Starting", "Starting", f"{len(pending)} of {len(current)} workers not running yet")
    return b.plan


def _spec_change(job: TrainingJob, current: list[WorkerState]) -> tuple[str, str] | None:
    """``(reason, why)`` when the live gang was made from another spec than ``job``'s: another
    ``spec.workers`` (Resized) or another field that shapes the pods (SpecChanged). Pods without
    the record (made by an older operator) count as current."""
    sizes = {w.workers for w in current if w.workers is not None}
    want = job.spec.workers
    if sizes and sizes != {want}:
        was = ", ".join(map(str, sorted(sizes)))
        return RestartReason.RESIZED, (
            f"spec.workers changed from {was} to {want}: stopping the gang (workers checkpoint on "
            f"SIGTERM) to restart it with {want} workers"
        )
    digests = {w.digest for w in current if w.digest}
    if digests and digests != {spec_digest(job)}:
        return RestartReason.SPEC_CHANGED, (
            "the spec changed: stopping the gang (workers checkpoint on SIGTERM) to restart it with "
            "the new spec"
        )
    return None


def _placed_nodes(st: TrainingJobStatus) -> list[str]:
    return list(st.placement.nodes) if st.placement else []


def _create_workers(b: _Builder, ranks: list[int], nodes: list[str]) -> None:
    for rank in ranks:
        node = nodes[rank] if rank < len(nodes) else None
        b.plan.create.append(worker_pod(b.job, rank, b.status.attempt, node, levels=b.levels))


def _recreate_missing_children(b: _Builder, service_exists: bool | None, pvc_exists: bool | None) -> None:
    """A live gang whose Service or checkpoint PVC is known to be missing gets it created again."""
    pvc = checkpoint_pvc(b.job) if pvc_exists is False else None
    if pvc is not None:
        b.plan.create.append(pvc)
    if service_exists is False:
        b.plan.create.append(headless_service(b.job))
    if pvc is not None or service_exists is False:
        b.requeue(2)  # a namesake being deleted answers 409 until it is gone: look again soon


def _create_gang(
    b: _Builder, decision: PlacementDecision | None, placed_by_queue: bool, service_exists: bool | None,
    pvc_exists: bool | None,
) -> Plan:
    st, job = b.status, b.job
    wait_until = parse_time(st.restart_after)
    if wait_until and wait_until > b.now:
        b.requeue((wait_until - b.now).total_seconds())
        b.phase(
            "Restarting", "BackingOff", f"gang restart {st.restarts} after backoff until {st.restart_after}"
        )
        return b.plan
    st.restart_after = None
    nodes: list[str] = []
    if decision is None and placed_by_queue:
        b.plan.needs_placement = True
        return b.plan
    if decision is not None:
        if not decision.placed:
            b.condition(CT.PLACED, False, PlacedReason.WAITING_FOR_CAPACITY, decision.reason)
            b.phase("Queued", "Queued", f"waiting for capacity: {decision.reason}")
            b.requeue(QUEUED_RECHECK_S)
            return b.plan
        nodes = decision.nodes
        st.placement = PlacementStatus(level=decision.level, domain=decision.domain, nodes=nodes)
        where = f"{decision.level} domain {decision.domain!r}" if decision.domain else "the cluster"
        b.condition(CT.PLACED, True, PlacedReason.PLACED, f"{job.spec.workers} workers placed in {where}")
    elif job.spec.queue_name:
        b.condition(
            CT.PLACED, False, PlacedReason.DEFERRED_TO_KUEUE,
            f"admission deferred to Kueue queue {job.spec.queue_name!r}",
        )
    pvc = checkpoint_pvc(job)
    if pvc is not None and not pvc_exists:
        b.plan.create.append(pvc)
    if not service_exists:
        b.plan.create.append(headless_service(job))
    policy = gang_network_policy(job)
    if policy is not None:  # created with the gang's Service, before any pod runs unprotected
        b.plan.create.append(policy)
    _create_workers(b, list(range(job.spec.workers)), nodes)
    b.phase("Starting", "GangCreated", f"created {job.spec.workers} worker pods (attempt {st.attempt})")
    b.requeue(5)
    return b.plan


def _on_failure(b: _Builder, current: list[WorkerState], failed: list[WorkerState]) -> Plan:
    job, st = b.job, b.status
    policy = job.spec.failure_policy
    first = min(failed, key=lambda w: w.rank)
    code = first.exit_code
    if code is not None and code in policy.non_retryable_exit_codes:
        return _fail(
            b,
            current,
            FailedReason.NON_RETRYABLE_EXIT_CODE,
            f"worker {first.rank} exited with code {code}, listed in failurePolicy.nonRetryableExitCodes",
        )
    if code == EXIT_PREEMPTED or first.reason in ("Evicted", "Preempting", "Shutdown", "NodeLost"):
        why = f"worker {first.rank} was preempted ({first.reason or f'exit {code}'})"
        return _restart(b, current, RestartReason.PREEMPTED, why, counted=False)
    why = (
        f"worker {first.rank} failed with exit code {code}"
        if code is not None
        else (f"worker {first.rank} failed ({first.reason or 'no exit code'})")
    )
    if st.restarts >= policy.max_restarts:
        return _fail(
            b, current, FailedReason.BACKOFF_LIMIT_EXCEEDED,
            f"{why}; maxRestarts ({policy.max_restarts}) used up",
        )
    return _restart(b, current, RestartReason.WORKER_FAILED, why, counted=True)


def _restart(b: _Builder, current: list[WorkerState], reason: str, why: str, *, counted: bool,
             moved: bool = False, tally: bool = True) -> Plan:
    """Stop the gang and start the next attempt. ``counted``: a failure (restarts, backoff);
    ``moved``: a move (moves); else a preemption, or with ``tally=False`` (a spec change) nothing."""
    st = b.status
    if moved:
        st.moves += 1
        st.moving_since = rfc3339(b.now)
    elif counted:
        st.restarts += 1
    elif tally:
        st.preemptions += 1
    st.attempt += 1
    st.placement = None  # a restarted gang gets fresh placement (the old node may be gone)
    delay = _backoff(b.job, st.restarts) if counted else 0.0
    st.restart_after = rfc3339(b.now + timedelta(seconds=delay)) if delay else None
    for w in current:
        if not w.terminating:
            b.plan.delete_pods.append(w.name)
    b.condition(CT.RUNNING, False, reason, why)
    if moved:
        b.phase("Restarting", reason, f"moving: {why}; stopping {len(current)} worker pod(s) to restart "
                                      "the gang from its checkpoint")
        b.requeue(1.0)
        return b.plan
    kind = (
        f"restart {st.restarts}/{b.job.spec.failure_policy.max_restarts}"
        if counted
        else "restart (not counted)"
    )
    b.phase("Restarting", reason, f"{why}; gang {kind}", warning=True)
    b.plan.events.append(
        Event("Warning", "GangRestart", f"{why}; deleting {len(current)} worker pods ({kind})")
    )
    b.requeue(max(delay, 1.0))
    return b.plan


def _fail(b: _Builder, current: list[WorkerState], reason: str, message: str) -> Plan:
    st = b.status
    for w in current:
        if w.phase not in ("Succeeded", "Failed") and not w.terminating:
            b.plan.delete_pods.append(w.name)
    st.completion_time = rfc3339(b.now)
    b.condition(CT.RUNNING, False, reason, message)
    b.condition(CT.FAILED, True, reason, message)
    b.phase("Failed", reason, message, warning=True)
    _schedule_ttl(b)
    return b.plan


def _schedule_ttl(b: _Builder) -> None:
    ttl = b.job.spec.ttl_seconds_after_finished
    done = parse_time(b.status.completion_time)
    if ttl is None or done is None:
        return
    left = (done + timedelta(seconds=ttl) - b.now).total_seconds()
    if left <= 0:
        b.plan.delete_job = True
    else:
        b.requeue(left)


def _finished(b: _Builder, workers: list[WorkerState]) -> Plan:
    # A finished job keeps its exited pods for logs but never leaves a worker running.
    for w in workers:
        if w.phase not in ("Succeeded", "Failed") and not w.terminating:
            b.plan.delete_pods.append(w.name)
    _schedule_ttl(b)
    return b.plan
