"""Plan VolumeSnapshots of a TrainingJob's checkpoint PVC: when to take them and which to keep.

Pure: (job, observed snapshots, snapshots in use, now) → snapshots to create and delete, the
``status.checkpoints`` list and the ``CheckpointReady`` condition; :func:`with_snapshots` folds
that into the gang lifecycle's plan. Snapshots carry no
ownerReference on purpose: they outlive the job (that is their point — a finished or deleted job
can be continued or forked from one with ``restoreFrom``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from capstan.api.condition_types import CheckpointReadyReason, ConditionType
from capstan.api.conditions import parse_time, rfc3339, set_condition
from capstan.api.trainingjob import CheckpointRecord, TrainingJob, TrainingJobStatus
from capstan.fields import dig
from capstan.labels import ANNOTATION_ATTEMPT, ANNOTATION_STEP, LABEL_JOB, LABEL_SNAPSHOT_REASON
from capstan.naming import common_labels, dns_label, label_value
from capstan.training.lifecycle import Plan
from capstan.training.pods import checkpoint_claim_name

SNAPSHOT_API = "snapshot.storage.k8s.io/v1"
PENDING_RECHECK_S = 5.0


@dataclass
class SnapshotPlan:
    """What to do with snapshots in this reconcile."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    records: list[CheckpointRecord] = field(default_factory=list)
    condition: tuple[bool, str, str] | None = None  # (status, reason, message) of CheckpointReady
    requeue_after: float | None = None


def snapshot_name(job: TrainingJob, reason: str, now: datetime, attempt: int) -> str:
    """Deterministic name: repeated reconciles for the same trigger name the same snapshot."""
    if reason == "Completion":
        suffix = "-final"
    elif reason == "Restart":
        suffix = f"-restart-{attempt}"
    else:
        suffix = f"-{now.strftime('%Y%m%d%H%M')}"
    return dns_label(job.metadata.name, suffix=f"-ckpt{suffix}")


def volume_snapshot(
    job: TrainingJob, name: str, reason: str, step: int | None, attempt: int
) -> dict[str, Any]:
    """The VolumeSnapshot object of the job's checkpoint PVC."""
    policy = job.spec.checkpoint.snapshots
    claim = checkpoint_claim_name(job)
    labels = {**common_labels("trainingjob", job.metadata.name, "checkpoint"), LABEL_SNAPSHOT_REASON: reason}
    labels[LABEL_JOB] = label_value(job.metadata.name)
    annotations = {ANNOTATION_ATTEMPT: str(attempt)}
    if step is not None:
        annotations[ANNOTATION_STEP] = str(step)
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": claim}}
    if policy is not None and policy.volume_snapshot_class_name:
        spec["volumeSnapshotClassName"] = policy.volume_snapshot_class_name
    return {
        "apiVersion": SNAPSHOT_API,
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": name,
            "namespace": job.metadata.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


def _ready(snap: dict[str, Any]) -> bool:
    return bool(dig(snap, "status", "readyToUse"))


def _created(snap: dict[str, Any]) -> datetime | None:
    meta = snap.get("metadata", {})
    status = snap.get("status") or {}
    return parse_time(status.get("creationTime")) or parse_time(meta.get("creationTimestamp"))


def _record(snap: dict[str, Any]) -> CheckpointRecord:
    meta = snap.get("metadata", {})
    step = dig(meta, "annotations", ANNOTATION_STEP)
    when = _created(snap)
    return CheckpointRecord(
        name=meta.get("name", ""),
        step=int(step) if step and step.isdigit() else None,
        time=rfc3339(when) if when else None,
        ready_to_use=_ready(snap),
        reason=dig(meta, "labels", LABEL_SNAPSHOT_REASON),
    )


_REASON_ORDER = {"Scheduled": 0, "Restart": 1, "Completion": 2}


def _sort_key(snap: dict[str, Any]) -> tuple[float, int, int, str]:
    # Creation times have one-second resolution: within a second, a later gang attempt and then
    # the trigger order (completion is always a job's last snapshot) decide which is newer.
    meta = snap.get("metadata", {})
    when = _created(snap)
    attempt = dig(meta, "annotations", ANNOTATION_ATTEMPT, default="0")
    reason = dig(meta, "labels", LABEL_SNAPSHOT_REASON, default="")
    return (
        when.timestamp() if when else float("inf"),
        int(attempt) if attempt.isdigit() else 0,
        _REASON_ORDER.get(reason, 0),
        meta.get("name", ""),
    )


def plan_snapshots(
    job: TrainingJob,
    snapshots: list[dict[str, Any]],
    in_use: set[str],
    now: datetime,
    *,
    api_available: bool,
    step: int | None = None,
    workers_stopped: bool = True,
) -> SnapshotPlan:
    """Decide snapshots for ``job`` (its phase and attempt are read from ``job.status``).

    Triggers: every ``everyMinutes`` while Running, once per gang restart and once at completion.
    The last two wait for ``workers_stopped`` (no worker pod still running): the trainer writes a
    final checkpoint on SIGTERM, and the snapshot should hold it. Retention keeps the newest
    ``keep`` ready snapshots, and never deletes the newest ready one nor one that a ModelServing
    uses (``in_use``).
    """
    plan = SnapshotPlan()
    policy = job.spec.checkpoint.snapshots
    if policy is None or job.spec.checkpoint.volume is None:
        return plan
    if not api_available:
        plan.condition = (
            False,
            CheckpointReadyReason.SNAPSHOT_API_UNAVAILABLE,
            "the cluster has no snapshot.storage.k8s.io/v1 VolumeSnapshot API; checkpoints stay on the "
            "volume only (install the CSI snapshot CRDs and controller to keep them)",
        )
        return plan

    ordered = sorted(snapshots, key=_sort_key)
    names = {s["metadata"]["name"] for s in ordered}
    phase, attempt = job.status.phase, job.status.attempt

    def want(reason: str) -> None:
        name = snapshot_name(job, reason, now, attempt)
        if name not in names:
            plan.create.append(volume_snapshot(job, name, reason, step, attempt))
            names.add(name)

    if phase in ("Succeeded", "Failed"):
        if workers_stopped:
            want("Completion")
    elif attempt > 0 and phase in ("Restarting", "Starting"):
        # Between gangs: the old workers are gone and the new ones not yet created (the executor
        # creates snapshots before pods). With no backoff that moment is a "Starting" reconcile.
        if workers_stopped:
            want("Restart")
    elif phase == "Running":
        scheduled = [
            s
            for s in ordered
            if dig(s["metadata"], "labels", LABEL_SNAPSHOT_REASON) == "Scheduled"
        ]
        last = _created(scheduled[-1]) if scheduled else parse_time(job.status.start_time)
        due = (last or now) + timedelta(minutes=policy.every_minutes)
        if (scheduled and due <= now) or (not scheduled and last is not None and due <= now):
            want("Scheduled")
            due = now + timedelta(minutes=policy.every_minutes)
        plan.requeue_after = max((due - now).total_seconds(), 1.0)

    if plan.create or any(not _ready(s) for s in ordered):
        # The CSI controller marks snapshots ready; poll until it has (no watch on an optional CRD).
        plan.requeue_after = min(plan.requeue_after or PENDING_RECHECK_S, PENDING_RECHECK_S)

    ready = [s for s in ordered if _ready(s)]
    keep = set(s["metadata"]["name"] for s in ready[-policy.keep :])
    if ready:
        keep.add(ready[-1]["metadata"]["name"])  # never the newest ready one, whatever keep says
    for snap in ready:
        name = snap["metadata"]["name"]
        if name not in keep and name not in in_use and not snap["metadata"].get("deletionTimestamp"):
            plan.delete.append(name)

    plan.records = [_record(s) for s in ordered if s["metadata"]["name"] not in plan.delete]
    plan.records += [_record(s) for s in plan.create]
    if ready:
        newest = _record(ready[-1])
        at = f" at step {newest.step}" if newest.step is not None else ""
        newest_ready = f"snapshot {newest.name}{at} is ready to use"
        plan.condition = (True, CheckpointReadyReason.SNAPSHOT_READY, newest_ready)
    elif ordered or plan.create:
        none_yet = "waiting for the first snapshot to become ready"
        plan.condition = (False, CheckpointReadyReason.SNAPSHOT_PENDING, none_yet)
    return plan


@dataclass(frozen=True)
class SnapshotsSeen:
    """What the executor read for a job's snapshots."""

    snapshots: list[dict[str, Any]]  # the job's VolumeSnapshots
    in_use: set[str]  # names ModelServings serve from
    available: bool  # whether the cluster serves the VolumeSnapshot API at all


def with_snapshots(
    job: TrainingJob, plan: Plan, pods: list[dict[str, Any]], seen: SnapshotsSeen, now: datetime
) -> tuple[Plan, SnapshotPlan]:
    """The snapshots of ``job`` once ``plan`` is applied, and ``plan`` with their outcome.

    The snapshots are decided for the status ``plan`` writes (:func:`plan_snapshots`; a restart or
    completion snapshot waits until none of ``pods`` runs) and record the step of its
    ``lastCheckpoint``. Both statuses of ``plan`` (``status``
    and ``on_created``) get ``status.checkpoints`` (where the API is served) and the
    ``CheckpointReady`` condition; the plan requeues by the snapshots' recheck when that is sooner.
    """
    stopped = not any(dig(p, "status", "phase") in ("Pending", "Running", "Unknown") for p in pods)
    planned = job.model_copy(update={"status": plan.status})
    # the newest checkpoint rank 0 reported committed: what a snapshot taken now holds (at least)
    step = plan.status.last_checkpoint.step if plan.status.last_checkpoint is not None else None
    snaps = plan_snapshots(
        planned, seen.snapshots, seen.in_use, now, api_available=seen.available, step=step,
        workers_stopped=stopped
    )

    def fold(status: TrainingJobStatus) -> TrainingJobStatus:
        st = status.model_copy(deep=True)
        if seen.available:
            st.checkpoints = list(snaps.records)
        if snaps.condition is not None:
            ok, reason, message = snaps.condition
            st.conditions = set_condition(
                st.conditions, ConditionType.CHECKPOINT_READY, "True" if ok else "False", reason, message,
                now=now, generation=job.metadata.generation,
            )
        return st

    requeue = plan.requeue_after
    if snaps.requeue_after is not None:
        requeue = min(requeue or snaps.requeue_after, snaps.requeue_after)
    on_created = fold(plan.on_created) if plan.on_created is not None else None
    return replace(plan, status=fold(plan.status), on_created=on_created, requeue_after=requeue), snaps


def snapshots_in_use(modelservings: list[dict[str, Any]], job_name: str) -> set[str]:
    """Snapshot names that ModelServings of ``job_name`` serve from (never to be deleted)."""
    used: set[str] = set()
    for ms in modelservings:
        spec = dig(ms, "spec", "model") or {}
        ref = spec.get("fromTrainingJob") or {}
        if ref.get("name") != job_name:
            continue
        if ref.get("checkpoint") and ref["checkpoint"] != "Latest":
            used.add(ref["checkpoint"])
        # Revisions record their model as "snapshot:<job>/<snapshot>" (serving.model_source).
        prefix = f"snapshot:{job_name}/"
        for rev in dig(ms, "status", "revisions") or []:
            model = rev.get("model") or ""
            if model.startswith(prefix):
                used.add(model.removeprefix(prefix))
    return used
