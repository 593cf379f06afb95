"""The gang lifecycle of a TrainingJob as a pure function: (job, observed pods, now) → plan.

Level-based: every call looks at the whole observed state and says what should be true, so a
plan applied twice, or after an operator restart, changes nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from capstan.api.condition_types import (
    AdmittedReason,
    FailedReason,
    LentReason,
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
    CheckpointProgress,
    CheckpointRequest,
    PlacementStatus,
    TrainingJob,
    TrainingJobStatus,
    WorkerCounts,
)
from capstan.events import Event
from capstan.fields import dig
from capstan.labels import (
    CHECKPOINT_NOW_ANNOTATION,
    LABEL_ATTEMPT,
    LABEL_RANK,
    LABEL_WORKERS,
    LENT_TO_ANNOTATION,
    REQUEST_ANNOTATION,
    SPEC_DIGEST_ANNOTATION,
)
from capstan.security import DEFAULT_OPERATOR_NAMESPACE, nonroot_advice, nonroot_refusal
from capstan.topology.levels import DEFAULT_LEVELS, TopologyLevels
from capstan.training.failure_rules import Failure, first_failure, judge, pod_reasons
from capstan.training.pods import (
    CONTAINER,
    checkpoint_pvc,
    gang_network_policy,
    headless_service,
    needs_service,
    spec_digest,
    worker_pod,
)
from capstan.training.progress import (
    PROGRESS_RECHECK_S,
    REQUEST_RECHECK_S,
    Progress,
    parse_progress,
    request_value,
)
from capstan.training.quarantine import avoided, exclude, keep_off, still_excluded
from capstan.training.startup import not_running_detail, startup_left, unbound_nodes

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
    #: Annotations to merge into worker pods, by pod name (a checkpoint request to rank 0).
    annotate_pods: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Worker pods of ``create`` that ``status.workers.active`` already counts: the status is the
    #: one the next pass finds once they exist, so that pass writes nothing. A refusal takes them
    #: back (:func:`refused`).
    creating_workers: int = 0


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
    container_reason: str = ""  # the container's terminated.reason (OOMKilled, Error, ...)
    message: str = ""  # its termination message, then the pod's status message
    finished_at: str | None = None  # its terminated.finishedAt
    disruption: str = ""  # reason of the pod's DisruptionTarget=True condition
    unscheduled: str = ""  # the scheduler's message while PodScheduled=False
    waiting: str = ""  # the container's waiting reason and message (ImagePullBackOff: ...)
    progress: Progress | None = None  # the capstan-progress line of its termination message
    request: str = ""  # its checkpoint-request annotation

    def failure(self) -> Failure:
        """This worker's failure, as the failure rules read it."""
        reasons = pod_reasons(self.exit_code, self.reason, self.container_reason, self.disruption)
        return Failure(self.rank, self.exit_code, reasons, self.message, self.node, self.finished_at)


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
    term: dict[str, Any] = {}
    waiting = ""
    statuses = status.get("containerStatuses") or []
    # The worker's own container decides (a template may add sidecars that exit differently).
    worker = [cs for cs in statuses if cs.get("name") == CONTAINER]
    for cs in worker or statuses:
        state = cs.get("state") or {}
        if state.get("waiting") and not waiting:
            wait = state["waiting"]
            waiting = ": ".join(x for x in (wait.get("reason", ""), wait.get("message", "")) if x)
        if state.get("terminated") is not None:
            term = state["terminated"]
            exit_code = int(term.get("exitCode", 1))
            if exit_code != 0:
                break
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget") or {}
    scheduled = conditions.get("PodScheduled") or {}
    terminating = bool(meta.get("deletionTimestamp"))
    phase = status.get("phase", "Pending")
    disrupted = disruption.get("reason", "") if disruption.get("status") == "True" else ""
    if terminating and disrupted == "DeletionByTaintManager" and phase not in ("Succeeded", "Failed"):
        # evicted from a NotReady or unreachable node: its kubelet may never confirm the deletion
        phase = "Failed"
    message = "\n".join(m for m in (term.get("message", ""), status.get("message", "")) if m)
    return WorkerState(
        name=meta.get("name", ""),
        rank=rank,
        attempt=attempt,
        phase=phase,
        exit_code=exit_code,
        terminating=terminating,
        reason=status.get("reason", ""),
        node=dig(pod, "spec", "nodeName"),
        nonroot_refusal=nonroot_refusal(pod) or "",
        workers=int(size) if isinstance(size, str) and size.isdigit() else None,
        digest=str(dig(meta, "annotations", SPEC_DIGEST_ANNOTATION) or ""),
        container_reason=term.get("reason", ""),
        message=message,
        finished_at=term.get("finishedAt"),
        disruption=disrupted,
        unscheduled=scheduled.get("message", "") if scheduled.get("status") == "False" else "",
        waiting=waiting,
        progress=parse_progress(term.get("message", "")) if term.get("message") else None,
        request=str(dig(meta, "annotations", REQUEST_ANNOTATION) or ""),
    )


class _Builder:
    """Accumulates status changes, events and actions for one reconcile."""

    def __init__(
        self, job: TrainingJob, now: datetime, levels: TopologyLevels, operator_namespace: str
    ) -> None:
        self.job = job
        self.now = now
        self.levels = levels
        self.operator_namespace = operator_namespace
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


def refused(
    job: TrainingJob, status: TrainingJobStatus, message: str, now: datetime, *, creating: int = 0
) -> TrainingJobStatus:
    """``status`` after the API server refused to create the gang's objects with ``message``:
    ``Admitted=False``/:data:`CREATE_FAILED`, and nothing claims workers that do not exist —
    phase Pending and no placement while none exists (Starting while some of the gang does).
    ``creating``: the plan's :attr:`Plan.creating_workers`, counted in ``status`` before the creates."""
    st = status.model_copy(deep=True)
    st.workers = st.workers.model_copy(update={"active": max(st.workers.active - creating, 0)})
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
    rank0: Progress | None = None,
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
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
    ``levels`` are the operator's topology levels (see :func:`~capstan.training.pods.worker_pod`);
    ``operator_namespace`` is where the operator runs (the gang's NetworkPolicy admits it to rank
    0's metrics). A refusal of the API server on record (see :class:`Plan`) stays on show until
    creating works.
    ``rank0``: what the current gang's rank 0 reports on its metrics endpoint (None: not read, or
    nothing); with the termination messages of the pods it gives ``status.lastCheckpoint`` and
    ``resumedFromStep``, and answers checkpoint requests (see :mod:`capstan.training.progress`).
    """
    refusal = refusal_on_record(job.status.conditions, CT.ADMITTED, job.metadata.generation)
    admit = refusal is None
    plan = _plan(
        job, pods, now, placement=placement, placed_by_queue=placed_by_queue, service_exists=service_exists,
        pvc_exists=pvc_exists, move=move, admit=admit, levels=levels, rank0=rank0,
        operator_namespace=operator_namespace,
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
        # shown as refused until the creates work: no count of workers that may not come
        plan.status.workers = plan.status.workers.model_copy(
            update={"active": max(plan.status.workers.active - plan.creating_workers, 0)})
        plan.creating_workers = 0
    return plan


def _as_refused_before(new: TrainingJobStatus, old: TrainingJobStatus) -> TrainingJobStatus:
    """``new`` with what the last refusal wrote (phase, message, placement, gang creation time, the
    Admitted and Placed conditions) taken from ``old``: while the retries fail, the status does not flap."""
    st = new.model_copy(deep=True)
    st.phase, st.message, st.placement = old.phase, old.message, old.placement
    st.gang_created = old.gang_created
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
    rank0: Progress | None,
    operator_namespace: str,
) -> Plan:
    b = _Builder(job, now, levels, operator_namespace)
    st = b.status
    workers = [w for w in (worker_state(p) for p in pods) if w is not None]
    current = [w for w in workers if w.attempt == st.attempt]
    stale = [w for w in workers if w.attempt != st.attempt]
    st.workers = _count(current)
    st.excluded_nodes = still_excluded(st.excluded_nodes, now)
    _fold_progress(st, workers, rank0)
    if admit:
        b.condition(CT.ADMITTED, True, AdmittedReason.VALID, "spec is valid")

    if st.phase in TERMINAL_PHASES:
        return _finished(b, current + stale)

    lent_to = lent_to_of(job)
    if lent_to and not job.spec.suspend:
        why = f"GPUs lent to the rollout of ModelServing {lent_to}"
        saving = _save_first(b, current, rank0, LentReason.LENT, why)
        if saving is not None:
            return saving
        for w in workers:
            if not w.terminating:
                b.plan.delete_pods.append(w.name)
        b.condition(CT.LENT, True, LentReason.LENT, f"{why}; requeued when it ends")
        b.condition(CT.RUNNING, False, RunningReason.LENT, "workers removed while the GPUs are lent")
        b.phase("Lent", "Lent", f"{why}: workers removed, requeued when the rollout ends")
        return b.plan
    if st.phase == "Lent":
        b.condition(CT.LENT, False, LentReason.RETURNED, "the rollout ended: back in the placement queue")
        b.phase("Pending", "Returned", "GPUs returned: recreating the gang from its checkpoint")

    if job.spec.suspend:
        saving = _save_first(b, current, rank0, SuspendedReason.SUSPENDED, "spec.suspend is true")
        if saving is not None:
            return saving
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
        saving = _save_first(b, current, rank0, change[0], change[1])
        return saving if saving is not None else _restart(b, current, change[0], change[1], counter="none")

    present = {w.rank for w in current}
    missing = [r for r in range(job.spec.workers) if r not in present]
    if current and missing and st.phase == "Running":
        return _restart(
            b, current, RestartReason.WORKER_LOST, f"worker pod(s) of rank {missing} disappeared",
            counter="preemptions",
        )

    if not current:
        return _create_gang(b, placement, placed_by_queue, service_exists, pvc_exists)
    if missing or not all(w.phase in ("Running", "Succeeded") for w in current):
        overdue = _startup_overdue(b, current, missing)
        if overdue is not None:
            return overdue
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
            saving = _save_first(b, current, rank0, RestartReason.MOVED, move)
            if saving is not None:
                return saving
            return _restart(b, current, RestartReason.MOVED, move, counter="moves")
        _settle_requests(b, current, rank0)
        moving_since = parse_time(st.moving_since)
        if moving_since is not None:  # a move is over once the gang runs again
            st.moved_seconds += max(0, int((now - moving_since).total_seconds()))
            st.moving_since = None
        if st.start_time is None:
            st.start_time = rfc3339(now)
            if job.spec.active_deadline_seconds is not None:
                b.requeue(job.spec.active_deadline_seconds)
        st.startup_timeouts = 0  # the bound is on gangs in a row that do not start
        st.gang_created = None  # started: a worker that stops running later is a failure, not a slow start
        b.condition(CT.RUNNING, True, RunningReason.ALL_WORKERS_RUNNING, f"{len(current)} workers running")
        b.phase("Running", "Running", f"all {len(current)} workers running")
        if rank0 is not None:
            b.requeue(PROGRESS_RECHECK_S)  # keep status.lastCheckpoint fresh
        return b.plan
    pending = [w for w in current if w.phase not in ("Running", "Succeeded")]
    said = f"{len(pending)} of {len(current)} workers not running yet"
    if any(w.unscheduled or w.waiting for w in pending):
        # the scheduler's (or kubelet's) own words, where the user looks first
        said += f": {not_running_detail(pending)}"
        b.condition(CT.RUNNING, False, RunningReason.WORKERS_PENDING, said)
    b.phase("Starting", "Starting", said)
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
def _startup_overdue(b: _Builder, current: list[WorkerState], missing: list[int]) -> Plan | None:
    """The plan for a placed gang past ``startupTimeoutSeconds``: re-place it off the nodes where
    pods did not bind, or fail once ``maxStartupAttempts`` gangs in a row missed it. None while
    there is time (a requeue for the deadline) and for gangs Capstan did not place: the default
    scheduler's queue (CPU, Kueue) is where they wait for capacity, and a new gang would only
    queue again."""
    st, spec = b.status, b.job.spec
    placed = _placed_nodes(st)
    left = startup_left(st.gang_created, spec.startup_timeout_seconds, b.now)
    if not placed or left is None:
        return None
    if left > 0:
        b.requeue(left)
        return None
    waiting = [w for w in current if w.phase not in ("Running", "Succeeded")]
    detail = not_running_detail(waiting)
    if missing:
        detail = f"worker(s) {missing} not created" + (f"; {detail}" if detail else "")
    why = f"the gang was not all running {spec.startup_timeout_seconds}s after it was created ({detail})"
    st.startup_timeouts += 1
    limit = spec.failure_policy.max_startup_attempts
    if st.startup_timeouts >= limit:
        return _fail(
            b, current, FailedReason.STARTUP_ATTEMPTS_EXCEEDED,
            f"{why}; {st.startup_timeouts} gang(s) in a row did not start "
            f"(failurePolicy.maxStartupAttempts: {limit})",
        )
    _quarantine(b, unbound_nodes(waiting, placed))
    return _restart(b, current, RestartReason.STARTUP_TIMEOUT, why, counter="startup")


def _quarantine(b: _Builder, blamed: list[tuple[str, str, str]]) -> None:
    """Keep the job off the ``blamed`` (node, reason, message) for a while; an Event names each."""
    st = b.status
    seconds = b.job.spec.failure_policy.node_quarantine_seconds
    st.excluded_nodes, added = exclude(st.excluded_nodes, blamed, b.now, seconds)
    for entry in added:
        b.plan.events.append(Event(
            "Warning", "NodeQuarantined",
            f"node {entry.node} excluded from this job's placement until {entry.until} "
            f"({entry.reason}: {entry.message})",
        ))


def _placed_nodes(st: TrainingJobStatus) -> list[str]:
    return list(st.placement.nodes) if st.placement else []


def _create_workers(b: _Builder, ranks: list[int], nodes: list[str]) -> None:
    avoid = avoided(b.status.excluded_nodes, b.now)
    for rank in ranks:
        node = nodes[rank] if rank < len(nodes) else None
        pod = worker_pod(b.job, rank, b.status.attempt, node, levels=b.levels)
        # a pod the default scheduler places must not land on a node quarantined for this job
        b.plan.create.append(pod if node is not None else keep_off(pod, avoid))


def _recreate_missing_children(b: _Builder, service_exists: bool | None, pvc_exists: bool | None) -> None:
    """A live gang whose Service or checkpoint PVC is known to be missing gets it created again."""
    pvc = checkpoint_pvc(b.job) if pvc_exists is False else None
    if pvc is not None:
        b.plan.create.append(pvc)
    service = service_exists is False and needs_service(b.job)
    if service:
        b.plan.create.append(headless_service(b.job))
    if pvc is not None or service:
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
    if not service_exists and needs_service(job):
        b.plan.create.append(headless_service(job))
    policy = gang_network_policy(job, b.operator_namespace)
    if policy is not None:  # created with the gang's Service, before any pod runs unprotected
        b.plan.create.append(policy)
    _create_workers(b, list(range(job.spec.workers)), nodes)
    st.gang_created = rfc3339(b.now)
    if nodes:
        b.requeue(job.spec.startup_timeout_seconds)  # wake at the startup deadline even if nothing changes
    b.phase("Starting", "GangCreated", f"created {job.spec.workers} worker pods (attempt {st.attempt})")
    # The status as the next pass will find it once the pods exist (as the Job controller counts
    # the pods it creates): one status write per gang start, not one before and one after.
    b.plan.creating_workers = job.spec.workers
    st.workers = st.workers.model_copy(update={"active": st.workers.active + job.spec.workers})
    st.message = f"{job.spec.workers} of {job.spec.workers} workers not running yet"
    b.requeue(5)
    return b.plan


def _on_failure(b: _Builder, current: list[WorkerState], failed: list[WorkerState]) -> Plan:
    """Judge the failure that came first (its peers usually fail in its wake) under the failure
    rules; quarantine every node a failure is blamed on when the gang restarts."""
    st, policy = b.status, b.job.spec.failure_policy
    verdicts = {w.rank: judge(policy, w.failure()) for w in failed}
    verdict = verdicts[first_failure(w.failure() for w in failed).rank]
    if verdict.action == "FailJob":
        return _fail(b, current, verdict.reason, verdict.why)
    if verdict.action == "RestartGang" and st.restarts >= policy.max_restarts:
        return _fail(
            b, current, FailedReason.BACKOFF_LIMIT_EXCEEDED,
            f"{verdict.why}; maxRestarts ({policy.max_restarts}) used up",
        )
    _quarantine(b, [(v.blame.node, v.blame.cause, v.blame.detail) for v in verdicts.values() if v.blame])
    if verdict.action == "RestartGang":
        return _restart(b, current, verdict.reason, verdict.why, counter="restarts")
    counter: _Counter = "hardware" if verdict.blame is not None else "preemptions"
    return _restart(b, current, verdict.reason, verdict.why, counter=counter)


#: Which status counter a gang restart adds to: ``restarts`` (against maxRestarts),
#: ``preemptions`` / ``hardware`` (not counted; together capped by maxUncountedRestarts),
#: ``moves`` (the queue's own), ``startup`` (counted by the caller in startupTimeouts),
#: ``none`` (a spec change: no counter).
_Counter = Literal["restarts", "preemptions", "hardware", "moves", "startup", "none"]


def _restart(b: _Builder, current: list[WorkerState], reason: str, why: str, *, counter: _Counter) -> Plan:
    st, policy = b.status, b.job.spec.failure_policy
    if counter in ("preemptions", "hardware"):
        uncounted = st.preemptions + st.hardware_restarts
        if uncounted >= policy.max_uncounted_restarts:
            return _fail(
                b, current, FailedReason.UNCOUNTED_RESTART_LIMIT_EXCEEDED,
                f"{why}; {uncounted} restarts not counted against maxRestarts reached "
                f"failurePolicy.maxUncountedRestarts ({policy.max_uncounted_restarts})",
            )
    moved, counted = counter == "moves", counter == "restarts"
    if moved:
        st.moves += 1
        st.moving_since = rfc3339(b.now)
    elif counted:
        st.restarts += 1
    elif counter == "preemptions":
        st.preemptions += 1
    elif counter == "hardware":
        st.hardware_restarts += 1
    st.attempt += 1
    st.resumed_from_step = None  # until the next gang's rank 0 says where it resumed
    st.placement = None  # a restarted gang gets fresh placement (the old node may be gone)
    st.gang_created = None
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
    if counted:
        kind = f"restart {st.restarts}/{policy.max_restarts}"
    elif counter == "startup":
        kind = f"placed again, startup attempt {st.startup_timeouts + 1}/{policy.max_startup_attempts}"
    else:
        kind = "restart (not counted)"
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


# -- checkpoint progress and requests ------------------------------------------------------------


def _fold_progress(st: TrainingJobStatus, workers: list[WorkerState], rank0: Progress | None) -> None:
    """``lastCheckpoint`` and ``resumedFromStep`` from rank 0's newest report: the termination
    message of a rank-0 pod (any gang still listed), or ``rank0`` (the current gang's metrics)."""
    reports = [(w.attempt, w.progress) for w in workers if w.rank == 0 and w.progress is not None]
    if rank0 is not None:
        reports.append((st.attempt, rank0))
    if not reports:
        return

    def newest(r: tuple[int, Progress]) -> tuple[int, int]:
        step = r[1].checkpoint_step
        return r[0], step if step is not None else -1

    attempt, report = max(reports, key=newest)
    if report.checkpoint_step is not None:
        st.last_checkpoint = CheckpointProgress(step=report.checkpoint_step, time=report.checkpoint_time)
    if attempt == st.attempt and report.resumed_from_step is not None:
        st.resumed_from_step = report.resumed_from_step if report.resumed_from_step >= 0 else None


def _rank0(current: list[WorkerState]) -> WorkerState | None:
    return next((w for w in current if w.rank == 0), None)


def _ask(b: _Builder, current: list[WorkerState], request: CheckpointRequest, mode: str) -> None:
    """Annotate rank 0's pod with ``request`` (mode save, stop or cancel) unless it already is."""
    pod = _rank0(current)
    value = request_value(request.id, mode)
    if pod is not None and pod.request != value:
        b.plan.annotate_pods[pod.name] = {REQUEST_ANNOTATION: value}


def _answered(request: CheckpointRequest, rank0: Progress | None) -> bool:
    return rank0 is not None and rank0.request is not None and rank0.request >= request.id


def _request_bound(job: TrainingJob) -> int:
    """Seconds a request waits for rank 0 (a user's request waits 120 s when stops do not wait)."""
    return job.spec.checkpoint.save_before_stop_seconds or 120


def _new_request(
    b: _Builder, rank0: Progress, reason: str, stop: bool, note: str | None
) -> CheckpointRequest:
    last = b.status.checkpoint_request
    number = max(last.id if last else 0, rank0.request or 0) + 1
    annotation = note if note is not None else (last.annotation if last else None)
    request = CheckpointRequest(
        id=number, reason=reason, stop=stop, requested_at=rfc3339(b.now), annotation=annotation
    )
    b.status.checkpoint_request = request
    return request


def _close(b: _Builder, request: CheckpointRequest, rank0: Progress | None) -> bool:
    """Settle pending ``request``: Saved once rank 0 answered it, TimedOut past the bound (with an
    Event); False while it is still pending (a requeue to look again)."""
    if _answered(request, rank0):
        assert rank0 is not None
        request.outcome, request.step = "Saved", rank0.checkpoint_step
        at = f" at step {request.step}" if request.step is not None else ""
        b.plan.events.append(Event(
            "Normal", "CheckpointSaved", f"rank 0 committed a checkpoint{at} for request {request.id} "
            f"({request.reason})",
        ))
        return True
    asked = parse_time(request.requested_at) or b.now
    left = (asked + timedelta(seconds=_request_bound(b.job)) - b.now).total_seconds()
    if left <= 0:
        request.outcome = "TimedOut"
        b.plan.events.append(Event(
            "Warning", "CheckpointRequestTimedOut",
            f"rank 0 did not report checkpoint request {request.id} ({request.reason}) committed within "
            f"{_request_bound(b.job)}s" + ("; stopping the gang anyway" if request.stop else ""),
        ))
        return True
    b.requeue(min(REQUEST_RECHECK_S, left))
    return False


def lent_to_of(job: TrainingJob) -> str:
    """The ModelServing a preemptible job lends its GPUs to ("" when none, or not preemptible)."""
    if not job.spec.preemptible:
        return ""
    return str((job.metadata.annotations or {}).get(LENT_TO_ANNOTATION) or "")


def _save_first(
    b: _Builder, current: list[WorkerState], rank0: Progress | None, reason: str, why: str
) -> Plan | None:
    """The plan while a running gang that is about to be stopped on purpose (``reason``) saves a
    checkpoint first; None once it may stop: rank 0 answered, the bound
    (``checkpoint.saveBeforeStopSeconds``) passed, or no wait applies (0, no checkpoint volume or
    resume, a gang not all running, a trainer that does not answer requests)."""
    st, ckpt = b.status, b.job.spec.checkpoint
    request = st.checkpoint_request
    running = bool(current) and all(w.phase == "Running" and not w.terminating for w in current)
    if request is not None and request.outcome == "Pending" and request.stop and request.reason == reason:
        if _close(b, request, rank0) or not running:
            return None
    else:
        supported = rank0 is not None and rank0.request is not None
        resumes = ckpt.volume is not None and ckpt.resume == "Latest"
        if not (ckpt.save_before_stop_seconds and running and resumes and supported):
            return None
        assert rank0 is not None
        request = _new_request(b, rank0, reason, stop=True, note=None)
        b.plan.events.append(Event(
            "Normal", "CheckpointRequested",
            f"{why}: asked rank 0 to save a checkpoint first (request {request.id}, waiting up to "
            f"{ckpt.save_before_stop_seconds}s)",
        ))
        b.requeue(REQUEST_RECHECK_S)
    _ask(b, current, request, "stop")
    st.message = (
        f"{why}: waiting up to {ckpt.save_before_stop_seconds}s from {request.requested_at} for rank 0 to "
        f"commit checkpoint request {request.id} before stopping the gang"
    )
    return b.plan


def _settle_requests(b: _Builder, current: list[WorkerState], rank0: Progress | None) -> None:
    """For a running gang with no stop ahead: call off a stop request nothing needs any more, settle
    a user's request, and make one for a new ``capstan.dev/checkpoint-now`` value."""
    st = b.status
    request = st.checkpoint_request
    if request is not None and request.outcome == "Pending":
        if request.stop:  # the move was called off, or suspend unset, before the gang stopped
            request.outcome = "Cancelled"
        elif not _close(b, request, rank0):
            _ask(b, current, request, "save")
            return
    pod = _rank0(current)
    if request is not None and pod is not None and pod.request == request_value(request.id, "stop"):
        _ask(b, current, request, "cancel")  # called off: a trainer holding for it trains on
    wanted = b.job.metadata.annotations.get(CHECKPOINT_NOW_ANNOTATION)
    if not wanted or wanted == (request.annotation if request else None):
        return
    if rank0 is None or rank0.request is None:
        last = request.id if request else 0
        st.checkpoint_request = CheckpointRequest(
            id=last, reason="User", requested_at=rfc3339(b.now), outcome="Cancelled", annotation=wanted
        )
        b.plan.events.append(Event(
            "Warning", "CheckpointRequestUnsupported",
            f"{CHECKPOINT_NOW_ANNOTATION}={wanted!r}: rank 0 does not answer checkpoint requests (its "
            "metrics endpoint has no capstan_train_checkpoint_request, or could not be read)",
        ))
        return
    request = _new_request(b, rank0, "User", stop=False, note=wanted)
    _ask(b, current, request, "save")
    b.plan.events.append(Event(
        "Normal", "CheckpointRequested",
        f"{CHECKPOINT_NOW_ANNOTATION}={wanted!r}: asked rank 0 to save a checkpoint now "
        f"(request {request.id})",
    ))
    b.requeue(REQUEST_RECHECK_S)
