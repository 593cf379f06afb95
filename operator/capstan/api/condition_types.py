"""The types and reasons of ``status.conditions``: part of the API, as the fields are.

One :class:`~enum.StrEnum` per condition type lists the reasons it can carry, each with what it
means, in the style of Kueue's ``workload_types.go``. Members are ``str``: they compare equal to,
and serialise as, their wire value (``ConditionType.READY == "Ready"``). :data:`Reason` holds the
reasons the Kubernetes shell writes on any type. ``docs/conditions.md`` is generated from this
module by :func:`markdown` (``python -m capstan.api.condition_types docs/conditions.md``; a test
fails when it is stale).
"""

from __future__ import annotations

import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Self


class _Documented(StrEnum):
    """A string enum whose members carry a one-line description (``member.doc``)."""

    doc: str

    def __new__(cls, value: str, doc: str = "") -> Self:
        """A member with wire value ``value`` described by ``doc``."""
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member


class ConditionType(_Documented):
    """The condition types of TrainingJob and ModelServing ``status.conditions``."""

    ADMITTED = "Admitted", "TrainingJob: the spec is valid and the API server accepts the gang's objects."
    PLACED = "Placed", "TrainingJob: the gang has nodes (topology-aware placement) or waits for them."
    RUNNING = "Running", "TrainingJob: every worker of the current gang runs."
    SUCCEEDED = "Succeeded", "TrainingJob: every worker exited 0 (terminal)."
    FAILED = "Failed", "TrainingJob: the job failed and will not be restarted (terminal)."
    SUSPENDED = "Suspended", "TrainingJob: spec.suspend holds the job with its workers removed."
    CHECKPOINT_READY = "CheckpointReady", "TrainingJob: a VolumeSnapshot of the checkpoint volume is ready."
    READY = "Ready", "ModelServing: the stable revision has at least one ready replica."
    PROGRESSING = "Progressing", "ModelServing: a rollout or a scale-up is under way."
    DEGRADED = "Degraded", "ModelServing: the stable revision, once ready, lost replicas."
    ROLLED_BACK = "RolledBack", "ModelServing: the last rollout was rolled back to the stable revision."
    INFERENCE_ROUTING = (
        "InferenceRouting",
        "ModelServing: requests reach the revisions through InferencePools and their endpoint pickers.",
    )
    BORROWING = "Borrowing", "ModelServing: its rollout runs on GPUs lent by preemptible TrainingJobs."
    LENT = "Lent", "TrainingJob: its gang stopped to lend its GPUs to a ModelServing rollout."


class Reason(_Documented):
    """Reasons the Kubernetes shell writes on the type a kind reports errors on (TrainingJob:
    ``Admitted``; ModelServing: ``Ready``, and ``Progressing`` for :attr:`CREATE_FAILED`)."""

    INVALID_SPEC = "InvalidSpec", "The spec fails validation; the message names the field."
    RECONCILE_ERROR = "ReconcileError", "Reconciling raised an unexpected error; it is retried."
    CREATE_FAILED = "CreateFailed", "The API server refused to create a child object (a 4xx)."


class AdmittedReason(_Documented):
    """Reasons of ``Admitted`` (besides :class:`Reason`)."""

    VALID = "Valid", "The spec is valid."


class PlacedReason(_Documented):
    """Reasons of ``Placed`` (besides ``CreateFailed``)."""

    PLACED = "Placed", "The gang was placed; the message names the topology domain."
    WAITING_FOR_CAPACITY = "WaitingForCapacity", "Not enough free GPUs in one domain; the job is queued."
    DEFERRED_TO_KUEUE = "DeferredToKueue", "spec.queueName hands admission to Kueue."


class RunningReason(_Documented):
    """Reasons of ``Running``: why it is True, or why the gang stopped (the restart and failure
    reasons of :class:`RestartReason` and :class:`FailedReason` also appear here)."""

    ALL_WORKERS_RUNNING = "AllWorkersRunning", "Every worker of the current gang runs."
    COMPLETED = "Completed", "Every worker exited 0."
    SUSPENDED = "Suspended", "spec.suspend removed the workers."
    LENT = "Lent", "The workers stopped to lend their GPUs to a ModelServing rollout."
    WORKERS_PENDING = (
        "WorkersPending",
        "Some workers do not run yet; the message gives the scheduler's reason (PodScheduled=False) or "
        "the container's waiting reason.",
    )


class RestartReason(_Documented):
    """Why a gang was restarted (``Running=False`` reason, and the phase event's reason)."""

    WORKER_FAILED = "WorkerFailed", "A worker failed with a retryable exit code (counts as a restart)."
    PREEMPTED = "Preempted", "A worker was preempted or evicted (not counted)."
    WORKER_LOST = "WorkerLost", "A running worker's pod disappeared (not counted)."
    MOVED = "Moved", "The gang is moved to another domain and resumes from its checkpoint (not counted)."
    RESIZED = (
        "Resized",
        "spec.workers changed: the gang stops (workers checkpoint on SIGTERM) and restarts at the new "
        "size (not counted).",
    )
    SPEC_CHANGED = (
        "SpecChanged",
        "A field that shapes the worker pods changed (image, env, resources, template, ...): the gang "
        "stops and restarts with the new spec (not counted).",
    )
    NODE_FAILURE = (
        "NodeFailure",
        "A worker failed for a reason blamed on its node, which the job now avoids "
        "(counted in status.hardwareRestarts).",
    )
    NOT_COUNTED_BY_RULE = (
        "RestartNotCounted",
        "A failurePolicy rule with action RestartGangAndIgnoreMaxRestarts matched (not counted).",
    )
    STARTUP_TIMEOUT = (
        "StartupTimeout",
        "The gang was not all running within startupTimeoutSeconds; it is placed again off the nodes "
        "where its pods did not bind.",
    )


class SucceededReason(_Documented):
    """Reasons of ``Succeeded``."""

    ALL_WORKERS_SUCCEEDED = "AllWorkersSucceeded", "Every worker exited 0."


class FailedReason(_Documented):
    """Reasons of ``Failed`` (and of ``Running=False`` when the job fails)."""

    NON_RETRYABLE_EXIT_CODE = (
        "NonRetryableExitCode",
        "A worker exited with a code listed in failurePolicy.nonRetryableExitCodes.",
    )
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded", "A worker failed after failurePolicy.maxRestarts."
    DEADLINE_EXCEEDED = "DeadlineExceeded", "The job ran past activeDeadlineSeconds."
    RUN_AS_NON_ROOT = "RunAsNonRoot", "The kubelet refused to run the image as non-root; no restart helps."
    FAILURE_RULE = "FailureRule", "A failurePolicy rule with action FailJob matched a worker's failure."
    UNCOUNTED_RESTART_LIMIT_EXCEEDED = (
        "UncountedRestartLimitExceeded",
        "Restarts not counted against maxRestarts reached failurePolicy.maxUncountedRestarts.",
    )
    STARTUP_ATTEMPTS_EXCEEDED = (
        "StartupAttemptsExceeded",
        "failurePolicy.maxStartupAttempts gangs in a row were not all running within startupTimeoutSeconds.",
    )


class SuspendedReason(_Documented):
    """Reasons of ``Suspended``."""

    SUSPENDED = "Suspended", "spec.suspend is true."
    RESUMED = "Resumed", "spec.suspend became false; the gang is recreated."


class LentReason(_Documented):
    """Reasons of ``Lent`` (TrainingJob)."""

    LENT = (
        "LentToRollout", "A ModelServing rollout borrows the gang's GPUs; it requeues when the rollout ends."
    )
    RETURNED = "Returned", "The rollout ended: the job is back in the placement queue."


class BorrowingReason(_Documented):
    """Reasons of ``Borrowing`` (ModelServing)."""

    BORROWING = "Borrowing", "Canary pods short of GPUs run on GPUs lent by preemptible TrainingJobs."
    NOT_NEEDED = (
        "NotNeeded", "No GPUs are borrowed (none are short, or the rollout ended and they were returned)."
    )
    NONE_TO_BORROW = (
        "NothingToBorrow", "Canary pods are short of GPUs and no preemptible TrainingJob can lend."
    )


class CheckpointReadyReason(_Documented):
    """Reasons of ``CheckpointReady``."""

    SNAPSHOT_READY = "SnapshotReady", "The newest VolumeSnapshot is ready to use."
    SNAPSHOT_PENDING = "SnapshotPending", "No snapshot is ready yet."
    SNAPSHOT_API_UNAVAILABLE = (
        "SnapshotAPIUnavailable",
        "The cluster has no snapshot.storage.k8s.io/v1 API; checkpoints stay on the volume only.",
    )


class ReadyReason(_Documented):
    """Reasons of ``Ready`` (besides :class:`Reason`)."""

    AVAILABLE = "Available", "The stable revision has ready replicas."
    NO_REPLICAS_READY = "NoReplicasReady", "The stable revision has no ready replica yet."
    SCALED_TO_ZERO = "ScaledToZero", "spec.replicas is 0."
    MODEL_NOT_READY = "ModelNotReady", "The model source is not ready yet; no revision can start."


class ProgressingReason(_Documented):
    """Reasons of ``Progressing`` (besides :class:`Reason`, and ``ModelNotReady``)."""

    ROLLING_OUT = "RollingOut", "A canary rollout is under way."
    SCALING_UP = "ScalingUp", "The stable revision scales up, or an old revision retires."
    STABLE = "Stable", "The stable revision serves 100% of traffic."


class DegradedReason(_Documented):
    """Reasons of ``Degraded`` (besides ``InvalidSpec`` and ``ModelNotReady``)."""

    REPLICAS_UNAVAILABLE = "ReplicasUnavailable", "The stable revision, once ready, lacks replicas."
    AS_EXPECTED = "AsExpected", "The stable revision has its replicas."


class RolledBackReason(_Documented):
    """Reasons of ``RolledBack``."""

    ANALYSIS_FAILED = "AnalysisFailed", "Canary analysis failed a threshold at a step."
    PROGRESS_DEADLINE_EXCEEDED = (
        "ProgressDeadlineExceeded",
        "The canary's Deployment did not become available in time.",
    )
    NEW_ROLLOUT = "NewRollout", "A new rollout started."
    PROMOTED = "Promoted", "The last rollout was promoted."
    NO_ROLLBACK = "NoRollback", "No rollout has been rolled back."


class InferenceRoutingReason(_Documented):
    """Reasons of ``InferenceRouting``: True with :attr:`INFERENCE_POOL`, else why not (the message
    says what routes instead: HTTPRoute weights or the Service)."""

    INFERENCE_POOL = "InferencePool", "An InferencePool and endpoint picker per revision, behind the Gateway."
    DISABLED = "Disabled", "spec.routing.inferencePool is Disabled."
    NO_GATEWAY = "NoGateway", "No spec.routing.gateway: an InferencePool is reached through a Gateway."
    RUNTIME_NOT_SUPPORTED = "RuntimeNotSupported", "A live revision's runtime is not vllm or sglang."
    NOT_INSTALLED = "NotInstalled", "The cluster does not serve InferencePool or HTTPRoute."
    NOT_ENABLED = (
        "NotEnabled",
        "The operator may not create endpoint pickers (their Roles): chart routing.endpointPickers.",
    )


#: Every reason class, in the order the docs list them.
REASONS: tuple[type[_Documented], ...] = (
    Reason,
    AdmittedReason,
    PlacedReason,
    RunningReason,
    RestartReason,
    SucceededReason,
    FailedReason,
    SuspendedReason,
    CheckpointReadyReason,
    ReadyReason,
    ProgressingReason,
    DegradedReason,
    RolledBackReason,
    InferenceRoutingReason,
)


def markdown() -> str:
    """``docs/conditions.md``: a table of the condition types and one of each reason class."""
    lines = [
        "# Status conditions",
        "",
        "<!-- Generated from operator/capstan/api/condition_types.py by",
        "     `python -m capstan.api.condition_types docs/conditions.md`; do not edit. -->",
        "",
        "The `type` and `reason` values Capstan writes in `status.conditions` are part of its API:",
        "they change only with a new API version. In Python they are the string enums of",
        "`capstan.api.condition_types`.",
        "",
        "## Condition types",
        "",
        "| Type | Meaning |",
        "|---|---|",
        *(f"| `{m.value}` | {m.doc} |" for m in ConditionType),
    ]
    for cls in REASONS:
        text = " ".join((cls.__doc__ or "").split()).replace("``", "`")
        summary = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
        lines += ["", f"## `{cls.__name__}`", "", summary, "", "| Reason | Meaning |", "|---|---|"]
        lines += [f"| `{m.value}` | {m.doc} |" for m in cls]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(markdown())
