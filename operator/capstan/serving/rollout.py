"""The rollout state machine: stable revision, canary steps, analysis verdicts, promote, roll back.

State lives in ``status`` (stableRevision, canaryRevision, rollout.step, rollout.stepStartedAt,
failedRevisions), so every decision is a pure function of (status, desired revision, observed
Deployments, analysis verdict, now) and an operator restart resumes where it was.

A step ``i`` is *pending* until the canary has the replicas that step asks for ready (capacity
first), then *started* (``stepStartedAt``) and holds its weight for ``pause``; then the analysis
verdict decides: Pass → next step (or promote after the last), Fail → roll back, Inconclusive
(fewer than ``minRequests``) → hold and look again. While a step is pending, traffic stays at the
previous step's weight, so a weight never lands on capacity that is not ready.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from capstan.api.common import parse_duration
from capstan.api.condition_types import RolledBackReason
from capstan.api.conditions import parse_time, rfc3339
from capstan.api.modelserving import ModelServingStatus, RolloutSpec, RolloutStatus
from capstan.events import Event
from capstan.fields import dig
from capstan.labels import ANNOTATION_MODEL, ANNOTATION_RUNTIME, LABEL_REVISION
from capstan.serving.analysis import AnalysisResult
from capstan.serving.groups import GROUP_REVISION_KIND, LWS_KIND, group_revision_state

WAIT_READY_S = 5.0
# How soon to look again when a step's window has too few requests for a verdict.
INCONCLUSIVE_RECHECK_S = 15.0
FAILED_KEPT = 10
# On each revision Deployment: what it serves, so status can say it after the spec moved on.

Outcome = Literal["promoted", "rolled_back"]


@dataclass(frozen=True)
class RevisionState:
    """One observed revision Deployment, reduced to what the rollout needs."""

    name: str
    spec_replicas: int | None
    ready: int
    deadline_exceeded: bool = False
    model: str = ""
    runtime: str = ""  # "" when the Deployment predates the annotation
    port: int | None = None  # the server's container port
    kind: str = "Deployment"  # or LeaderWorkerSet, ControllerRevision (multi-host replicas)


def server_template(obj: Mapping[str, Any]) -> Any:
    """The pod template that serves (a group's leader) of a revision workload."""
    if obj.get("kind") == LWS_KIND:
        return dig(obj, "spec", "leaderWorkerTemplate", "leaderTemplate")
    if obj.get("kind") == GROUP_REVISION_KIND:
        return dig(obj, "data", "leader")
    return dig(obj, "spec", "template")


def revision_state(
    dep: dict[str, Any], pods: Sequence[Mapping[str, Any]] = (), now: datetime | None = None
) -> RevisionState | None:
    """Reduce a revision workload (a Deployment, or the LeaderWorkerSet or ControllerRevision of
    multi-host replicas, whose groups are counted in ``pods`` at ``now``); None when it lacks the
    revision label."""
    meta = dep.get("metadata") or {}
    rev = dig(meta, "labels", LABEL_REVISION)
    if not rev or meta.get("deletionTimestamp"):
        return None
    kind = str(dep.get("kind") or "Deployment")
    model = dig(meta, "annotations", ANNOTATION_MODEL, default="")
    runtime = dig(meta, "annotations", ANNOTATION_RUNTIME, default="")
    containers = dig(server_template(dep), "spec", "containers", default=None) or []
    port = next((p.get("containerPort") for c in containers if c.get("name") == "server"
                 for p in c.get("ports") or [] if p.get("name") == "http"), None)
    if kind in (LWS_KIND, GROUP_REVISION_KIND):
        groups = group_revision_state(dep, pods, now or datetime.now(UTC))
        return RevisionState(rev, groups.replicas, groups.ready, groups.deadline_exceeded, model, runtime,
                             port, kind)
    status = dep.get("status") or {}
    conds = status.get("conditions") or []
    exceeded = any(
        c.get("type") == "Progressing"
        and c.get("status") == "False"
        and c.get("reason") == "ProgressDeadlineExceeded"
        for c in conds
    )
    replicas = dig(dep, "spec", "replicas")
    return RevisionState(rev, replicas, int(status.get("readyReplicas") or 0), exceeded, model, runtime, port)


def replicas_for_weight(total: int, weight: int, live: bool) -> int:
    """Replicas for a ``weight`` percent share of ``total``: ceil, at least 1 when ``live``."""
    if weight <= 0:
        return 1 if live and total > 0 else 0
    n = math.ceil(total * weight / 100)
    return max(n, 1) if live and total > 0 else n


@dataclass
class Tick:
    """What one turn of the machine decided (``status`` was updated in place)."""

    events: list[Event] = field(default_factory=list)
    outcome: Outcome | None = None
    requeue: float | None = None
    message: str = ""
    rolled_back: str | None = None  # RolledBack condition message when a rollback happened now
    rolled_back_reason: str = ""
    new_rollout: bool = False

    def again(self, seconds: float) -> None:
        """Ask to be called again within ``seconds``."""
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)


def step_weights(spec: RolloutSpec, rollout: RolloutStatus | None) -> tuple[int, int]:
    """(weight the canary has now, weight the current step asks for)."""
    if rollout is None or not spec.steps:
        return 0, 0
    i = min(rollout.step, len(spec.steps) - 1)
    target = spec.steps[i].weight
    if rollout.step_started_at:
        return target, target
    return (spec.steps[i - 1].weight if i > 0 else 0), target


def tick(
    st: ModelServingStatus,
    desired: str | None,
    *,
    spec: RolloutSpec,
    observed: dict[str, RevisionState],
    canary_replicas: Callable[[int], int],
    analysis: AnalysisResult | None,
    now: datetime,
    straight: bool,
) -> Tick:
    """Advance the rollout of ``st`` towards ``desired`` (None: the model is not resolvable now).

    ``canary_replicas(weight)`` is the replica count the canary needs ready for that weight.
    ``straight``: there is nothing to protect (no replicas wanted), a new revision replaces the
    stable one at once.
    """
    t = Tick()
    traffic = st.rollout.traffic if st.rollout else "replicas"
    if desired is None:
        return t
    if (
        st.stable_revision is None
        or straight
        or (
            st.stable_revision != desired
            and st.stable_revision not in observed
            and st.canary_revision != desired
        )
    ):
        # First revision ever, or the stable Deployment is gone (nothing left to protect).
        if st.stable_revision != desired:
            what = "first revision" if st.stable_revision is None else "new revision"
            t.events.append(Event("Normal", "RevisionCreated", f"{what} {desired} takes 100% of traffic"))
        if st.canary_revision and st.canary_revision != desired:
            t.events.append(
                Event("Normal", "CanaryRemoved", f"canary {st.canary_revision} superseded by {desired}")
            )
        st.stable_revision, st.canary_revision = desired, None
        st.rollout = RolloutStatus(traffic=traffic)
        return t
    if desired == st.stable_revision:
        if st.canary_revision:
            t.events.append(
                Event(
                    "Normal",
                    "RolloutAborted",
                    f"spec is back at stable {desired}; canary {st.canary_revision} removed",
                )
            )
            st.canary_revision = None
            st.rollout = RolloutStatus(traffic=traffic)
        return t
    if desired in st.failed_revisions:
        if st.canary_revision:
            t.events.append(Event("Normal", "CanaryRemoved", f"canary {st.canary_revision} superseded"))
            st.canary_revision = None
            st.rollout = RolloutStatus(traffic=traffic)
        t.message = f"revision {desired} was rolled back; not retried until the spec changes"
        return t
    if st.canary_revision != desired:
        if st.canary_revision:
            t.events.append(
                Event("Normal", "CanaryRemoved", f"canary {st.canary_revision} superseded by {desired}")
            )
        st.canary_revision = desired
        st.rollout = RolloutStatus(step=0, step_started_at=None, traffic=traffic)
        plan = " → ".join(f"{s.weight}%" for s in spec.steps) or "promote when ready"
        t.events.append(
            Event("Normal", "RolloutStarted", f"rolling out {desired} over {st.stable_revision} ({plan})")
        )
        t.new_rollout = True
    return _progress(st, desired, spec=spec, observed=observed, canary_replicas=canary_replicas,
                     analysis=analysis, now=now, t=t)


def _progress(
    st: ModelServingStatus,
    canary: str,
    *,
    spec: RolloutSpec,
    observed: dict[str, RevisionState],
    canary_replicas: Callable[[int], int],
    analysis: AnalysisResult | None,
    now: datetime,
    t: Tick,
) -> Tick:
    ro = st.rollout
    assert ro is not None
    obs = observed.get(canary)
    if obs is not None and obs.deadline_exceeded:
        return _roll_back(
            st,
            canary,
            RolledBackReason.PROGRESS_DEADLINE_EXCEEDED,
            f"revision {canary} did not become available (Deployment progress deadline exceeded)",
            t,
        )
    steps = spec.steps
    ready = obs.ready if obs else 0
    if not steps:
        want = canary_replicas(100)
        if ready >= want:
            return _promote(st, canary, t)
        t.message = f"waiting for {canary}: {ready}/{want} replicas ready"
        t.again(WAIT_READY_S)
        return t
    i = min(ro.step, len(steps) - 1)
    step = steps[i]
    where = f"step {i + 1}/{len(steps)} ({step.weight}%)"
    started = parse_time(ro.step_started_at)
    if started is None:
        want = canary_replicas(step.weight)
        if ready < want:
            t.message = f"{where}: waiting for {canary}: {ready}/{want} replicas ready"
            t.again(WAIT_READY_S)
            return t
        ro.step_started_at = rfc3339(now)
        t.events.append(Event("Normal", "CanaryStep", f"{where}: {step.weight}% of traffic to {canary}"))
        started = now
    pause = parse_duration(step.pause)
    end = started + timedelta(seconds=pause)
    if now < end:
        t.message = f"{where}: holding until {rfc3339(end)}"
        t.again((end - now).total_seconds())
        return t
    if spec.analysis is not None:
        if analysis is None or analysis.revision != canary or analysis.step != i:
            t.message = f"{where}: waiting for the analysis of {canary}"
            t.again(WAIT_READY_S)
            return t
        if analysis.verdict == "Inconclusive":
            t.message = f"{where}: holding, {analysis.message}"
            t.again(min(pause or INCONCLUSIVE_RECHECK_S, INCONCLUSIVE_RECHECK_S))
            return t
        if analysis.verdict == "Fail":
            return _roll_back(
                st,
                canary,
                RolledBackReason.ANALYSIS_FAILED,
                f"{analysis.message} at step {i + 1} (weight {step.weight}%)",
                t,
            )
        t.events.append(Event("Normal", "AnalysisPassed", f"{canary} {where}: {analysis.message}"))
    if i + 1 < len(steps):
        ro.step, ro.step_started_at = i + 1, None
        nxt = steps[i + 1]
        t.message = f"step {i + 2}/{len(steps)} ({nxt.weight}%): scaling {canary} up"
        t.again(0.5)
        return t
    return _promote(st, canary, t)


def _promote(st: ModelServingStatus, canary: str, t: Tick) -> Tick:
    old = st.stable_revision
    st.stable_revision, st.canary_revision = canary, None
    st.rollout = RolloutStatus(traffic=st.rollout.traffic if st.rollout else "replicas")
    t.events.append(
        Event("Normal", "Promoted", f"{canary} promoted to stable (100% of traffic); {old} retiring")
    )
    t.outcome = "promoted"
    t.again(WAIT_READY_S)
    return t


def _roll_back(st: ModelServingStatus, canary: str, reason: str, message: str, t: Tick) -> Tick:
    st.canary_revision = None
    st.rollout = RolloutStatus(traffic=st.rollout.traffic if st.rollout else "replicas")
    if canary not in st.failed_revisions:
        st.failed_revisions = [*st.failed_revisions, canary][-FAILED_KEPT:]
    t.events.append(
        Event("Warning", "RolledBack", f"{canary} rolled back to {st.stable_revision}: {message}")
    )
    t.rolled_back = f"{canary}: {message}"
    t.message = f"rolled back {canary}: {message}"
    t.outcome = "rolled_back"
    t.rolled_back_reason = reason
    t.again(WAIT_READY_S)
    return t
