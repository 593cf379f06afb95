"""What a worker's failure means for its gang: ``spec.failurePolicy.rules``, then the defaults.

Pure. :func:`judge` takes the failure policy and one failed worker (:class:`Failure`, read from
its pod) and returns a :class:`Verdict`: the action (restart counted, restart not counted, fail
the job), the condition reason, a message, and whether the failure is blamed on the node (then
the node is quarantined for the job, :mod:`capstan.training.quarantine`).

The rules are tried in order and the first that matches decides, as in Kubernetes Job's
``podFailurePolicy`` and JobSet's ``failurePolicy.rules``. When none matches, the defaults keep
Capstan's behaviour from before the rules: ``nonRetryableExitCodes`` fail the job, a failure
blamed on the node or a preemption restarts without counting, anything else restarts and counts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from capstan.api.condition_types import FailedReason, RestartReason
from capstan.api.conditions import parse_time
from capstan.api.trainingjob import FailureAction, FailurePolicy, FailureRule

EXIT_PREEMPTED = 75  # same number as capstan.training.pods.EXIT_PREEMPTED (kept here: no import cycle)

#: Kubelet eviction messages for node pressure ("The node was low on resource: memory. ...",
#: "Pod was rejected: The node had condition: [DiskPressure].").
NODE_PRESSURE = re.compile(r"node was low on resource|node had condition", re.IGNORECASE)
#: GPU hardware faults in a termination message: NVIDIA Xid reports, a GPU off the bus, ECC errors.
GPU_ERROR = re.compile(
    r"\bXid\b|GPU has fallen off the bus|uncorrectable ECC|double[- ]bit ECC|ECC error", re.IGNORECASE
)
#: NCCL errors of the local system (NIC, driver, CUDA), not those that only relay a remote rank's death.
NCCL_ERROR = re.compile(
    r"ncclSystemError|ncclUnhandledCudaError|NCCL error[^\n]*unhandled (system|cuda) error", re.IGNORECASE
)


@dataclass(frozen=True)
class Failure:
    """One failed worker, as its pod tells it."""

    rank: int
    exit_code: int | None = None
    reasons: frozenset[str] = frozenset()  # PodFailureReason values (see :func:`pod_reasons`)
    message: str = ""  # the container's termination message, then the pod's status message
    node: str | None = None
    finished_at: str | None = None  # the container's terminated.finishedAt (RFC 3339)


@dataclass(frozen=True)
class Blame:
    """A failure attributed to the node it ran on."""

    node: str
    cause: str  # NodeLost | NotReady | NodePressure | GPUError | NCCLError
    detail: str


@dataclass(frozen=True)
class Verdict:
    """What one failure does to the job."""

    action: FailureAction
    reason: str  # Running (and Failed) condition reason
    why: str  # the message, naming the worker and the rule when one matched
    blame: Blame | None = None


def pod_reasons(
    exit_code: int | None, pod_reason: str, container_reason: str, disruption: str
) -> frozenset[str]:
    """The PodFailureReason values a failed pod shows.

    ``pod_reason``: ``status.reason`` (Evicted, DeadlineExceeded, NodeLost — Capstan's own for a
    deleted Node —, Preempting, Shutdown/Terminated on node shutdown); ``container_reason``: the
    container's ``terminated.reason`` (OOMKilled); ``disruption``: the reason of the pod's
    ``DisruptionTarget`` condition (DeletionByTaintManager: the node is NotReady or unreachable;
    PreemptionByScheduler; TerminationByKubelet: node shutdown or pressure).
    """
    found = set()
    if pod_reason in ("Evicted", "DeadlineExceeded", "NodeLost"):
        found.add(pod_reason)
    if pod_reason in ("Shutdown", "Terminated") or disruption == "TerminationByKubelet":
        found.add("Shutdown")
    if container_reason == "OOMKilled":
        found.add("OOMKilled")
    if disruption == "DeletionByTaintManager":
        found.add("NotReady")
    if exit_code == EXIT_PREEMPTED or pod_reason == "Preempting" or disruption == "PreemptionByScheduler":
        found.add("Preempted")
    return frozenset(found)


def blame_node(failure: Failure) -> Blame | None:
    """The node to blame for ``failure``, or None when the failure is the job's (or nobody's)."""
    if failure.node is None:
        return None
    text = failure.message
    if "NodeLost" in failure.reasons:
        return Blame(failure.node, "NodeLost", f"node {failure.node} was deleted")
    if "NotReady" in failure.reasons:
        return Blame(failure.node, "NotReady", f"node {failure.node} became NotReady or unreachable")
    if "Evicted" in failure.reasons and NODE_PRESSURE.search(text):
        return Blame(failure.node, "NodePressure", _first_line(text))
    for cause, pattern in (("GPUError", GPU_ERROR), ("NCCLError", NCCL_ERROR)):
        found = pattern.search(text)
        if found:
            return Blame(failure.node, cause, _line_of(text, found.start()))
    return None


def rule_matches(rule: FailureRule, failure: Failure) -> bool:
    """Whether every criterion ``rule`` gives matches ``failure``."""
    if rule.exit_codes is not None and failure.exit_code not in rule.exit_codes:
        return False
    if rule.reasons is not None and not failure.reasons & set(rule.reasons):
        return False
    return rule.message_pattern is None or re.search(rule.message_pattern, failure.message) is not None


def describe(failure: Failure) -> str:
    """``worker 1 failed with exit code 137 (OOMKilled)`` and the like."""
    what = f"exit code {failure.exit_code}" if failure.exit_code is not None else ""
    why = ", ".join(sorted(failure.reasons))
    if what and why:
        return f"worker {failure.rank} failed with {what} ({why})"
    return f"worker {failure.rank} failed with {what or why or 'no exit code'}"


def judge(policy: FailurePolicy, failure: Failure) -> Verdict:
    """The verdict on ``failure`` under ``policy``: the first matching rule, else the defaults."""
    blame = blame_node(failure)
    said = describe(failure)
    if blame is not None:
        said += f" on node {blame.node} ({blame.cause}: {blame.detail})"
    for i, rule in enumerate(policy.failure_rules):
        if rule_matches(rule, failure):
            why = f"{said}; matched failurePolicy.rules[{i}] ({rule.action})"
            if rule.action == "FailJob":
                return Verdict("FailJob", FailedReason.FAILURE_RULE, why, blame)
            if rule.action == "RestartGang":
                return Verdict("RestartGang", RestartReason.WORKER_FAILED, why, blame)
            reason = RestartReason.NODE_FAILURE if blame else RestartReason.NOT_COUNTED_BY_RULE
            return Verdict("RestartGangAndIgnoreMaxRestarts", reason, why, blame)
    code = failure.exit_code
    if code is not None and code in policy.non_retryable_exit_codes:
        why = f"worker {failure.rank} exited with code {code}, listed in failurePolicy.nonRetryableExitCodes"
        return Verdict("FailJob", FailedReason.NON_RETRYABLE_EXIT_CODE, why, blame)
    if blame is not None:
        return Verdict("RestartGangAndIgnoreMaxRestarts", RestartReason.NODE_FAILURE, said, blame)
    if failure.reasons & {"Preempted", "Evicted", "Shutdown"}:
        why = f"worker {failure.rank} was preempted ({', '.join(sorted(failure.reasons))})"
        return Verdict("RestartGangAndIgnoreMaxRestarts", RestartReason.PREEMPTED, why)
    return Verdict("RestartGang", RestartReason.WORKER_FAILED, said)


def first_failure(failures: Iterable[Failure]) -> Failure:
    """The failure that came first (the container that finished earliest; then the lowest rank):
    the others are usually its echo (peers of a dead rank fail their collectives)."""

    def key(f: Failure) -> tuple[float, int]:
        at = parse_time(f.finished_at)
        return (at.timestamp() if at else math.inf, f.rank)

    return min(failures, key=key)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def _line_of(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start : end if end >= 0 else len(text)].strip()[:200]
