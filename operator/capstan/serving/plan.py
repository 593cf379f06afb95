"""The ModelServing planner: (ModelServing, observed children, now, analysis verdict) → ServingPlan.

Pure and level-based, like the TrainingJob planner: it reads the whole observed state, says what
should exist (objects to apply, Deployments to rescale, objects to delete), the complete new status
and the events to emit. Applying a plan twice, or after an operator restart, changes nothing more.

Traffic: the canary's weight is its step's weight once the step started; the rest goes to the stable
revision, or, while a just-replaced revision is still retiring (the new stable is not fully ready
yet), to the stable and retiring ones in proportion to their ready replicas. With Gateway API the
weights are HTTPRoute backendRef weights; without, the same weights size the revisions' replica
counts behind the stable Service (replicas = ceil(total x weight), at least 1 for a live canary).
With inference routing (:mod:`capstan.serving.inference`) the route's backends are one
InferencePool per revision, with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal

from capstan.api.condition_types import ConditionType as CT
from capstan.api.condition_types import (
    DegradedReason,
    ProgressingReason,
    ReadyReason,
    Reason,
    RolledBackReason,
)
from capstan.api.conditions import (
    get_condition,
    keep_from,
    parse_time,
    refusal_on_record,
    set_condition,
)
from capstan.api.modelserving import ModelServing, ModelServingStatus, RevisionStatus, RolloutStatus
from capstan.fields import dig
from capstan.labels import (
    ANNOTATION_MODEL,
    ANNOTATION_RUNTIME,
    LABEL_COMPONENT,
    LABEL_REVISION,
    LABEL_SERVING,
)
from capstan.naming import label_value
from capstan.security import DEFAULT_OPERATOR_NAMESPACE
from capstan.serving.adapters import (
    AdapterAction,
    AdapterCanary,
    ObservedServer,
    adapter_canaries,
    adapter_claims,
    adapter_status,
    plan_adapter_actions,
    resolve_adapters,
)
from capstan.serving.adapters import mode as adapter_mode
from capstan.serving.analysis import AnalysisResult
from capstan.serving.borrow import lender_of, plan_borrow, unschedulable_gpus
from capstan.serving.groups import (
    GROUP_REVISION_KIND,
    LWS_KIND,
    group_network_policy,
    group_policy_name,
    group_revision,
    group_service,
    is_multi_host,
    leader_worker_set,
)
from capstan.serving.inference import (
    DEFAULT_EPP_IMAGE,
    EPP_COMPONENT,
    Routing,
    endpoint_picker,
    epp_peer,
    gateway_parents,
    inference_pool,
    pool_route,
    routing,
)
from capstan.serving.model_source import ModelNotReady, resolve_model
from capstan.serving.revisions import (
    Revision,
    autoscaler,
    deployment,
    desired_revision,
    http_route,
    meta,
    model_claim,
    model_fetch,
    network_policy,
    revision_service,
    scaled_bounds,
    selector_string,
    server_pod,
    stable_service,
    stable_service_name,
)
from capstan.serving.rollout import (
    WAIT_READY_S,
    Event,
    Outcome,
    RevisionState,
    Tick,
    parse_duration,
    replicas_for_weight,
    revision_state,
    server_template,
    step_weights,
    tick,
)
from capstan.serving.runtimes import ArgsTemplateError
from capstan.topology.levels import DEFAULT_LEVELS, TopologyLevels

ADAPTER_COMPONENT = "adapter"
# After loading or unloading adapters: read the servers' /v1/models again this soon.
ADAPTER_RECHECK_S = 5.0
ADAPTER_RESYNC_S = 30.0


@dataclass(frozen=True)
class ObjectRef:
    """An object to delete."""

    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Observed:
    """What the executor read: children labelled with this ModelServing, and its model source.

    ``deployments`` holds the revision workloads: Deployments, and for multi-host replicas
    LeaderWorkerSets or the ControllerRevisions of Capstan-managed groups.
    ``children`` holds every other labelled child (Services, HPAs, PVCs, HTTPRoutes, NetworkPolicies,
    InferencePools and their pickers' ServiceAccounts, Roles and RoleBindings) so the planner can
    delete what no live revision needs. ``snapshots`` maps VolumeSnapshot name to object.
    """

    deployments: list[dict[str, Any]] = field(default_factory=list)
    children: list[dict[str, Any]] = field(default_factory=list)
    training_job: dict[str, Any] | None = None
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The TrainingJobs spec.adapters name (by name), and the server pods with the adapters they hold.
    training_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    servers: list[ObservedServer] = field(default_factory=list)
    adapter_failures: dict[str, str] = field(default_factory=dict)  # last pass's failed loads, by name
    # Pods of Capstan-managed multi-host groups (label capstan.dev/serving-group-of): their ready groups.
    group_pods: list[dict[str, Any]] = field(default_factory=list)
    # Why groups of a revision waited for room at the last pass (the placer's reason), by revision.
    group_waiting: dict[str, str] = field(default_factory=dict)
    # rollout.borrow: the canary's pods, and the namespace's TrainingJobs (lenders and would-be ones).
    canary_pods: list[dict[str, Any]] = field(default_factory=list)
    lenders: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ServingPlan:
    """What the executor should do; ``status`` is the complete new status.

    ``on_applied``: while a refusal of the API server is on record (``Progressing=False``,
    ``CreateFailed``, this generation), ``status`` keeps showing it and the executor writes
    ``on_applied`` once every object of ``objects`` was applied; a refusal again is reported
    with :func:`refused`.
    """

    status: ModelServingStatus
    objects: list[dict[str, Any]] = field(default_factory=list)
    scale: dict[str, int] = field(default_factory=dict)
    deletes: list[ObjectRef] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    outcome: Outcome | None = None
    on_applied: ModelServingStatus | None = None
    # LoRA adapters to load on or unload from running servers (runtimes that load them at run time).
    adapter_actions: list[AdapterAction] = field(default_factory=list)
    # rollout.borrow: TrainingJobs to ask for their GPUs, and those to give them back to.
    lend: list[str] = field(default_factory=list)
    give_back: list[str] = field(default_factory=list)

    def requeue(self, seconds: float) -> None:
        """Ask to be called again within ``seconds``."""
        cur = self.requeue_after
        self.requeue_after = seconds if cur is None else min(cur, seconds)


def _split(total: int, shares: dict[str, int]) -> dict[str, int]:
    """``total`` percent split in proportion to ``shares`` (largest remainder, sums to ``total``)."""
    whole = sum(shares.values())
    if whole <= 0:
        return {k: 0 for k in shares}
    exact = {k: total * v / whole for k, v in shares.items()}
    out = {k: int(x) for k, x in exact.items()}
    left = total - sum(out.values())
    for k in sorted(exact, key=lambda k: (out[k] - exact[k], k))[:left]:
        out[k] += 1
    return out


def refused(
    ms: ModelServing, status: ModelServingStatus, what: str, message: str, now: datetime
) -> ModelServingStatus:
    """``status`` after the API server refused to create or update child ``what`` (e.g.
    ``Deployment gpt-7f3c``) with ``message``: ``Progressing=False``/``CreateFailed`` and a
    status message that says so. The phase stays: it is derived from observed readiness."""
    st = status.model_copy(deep=True)
    text = f"the API server refused {what}: {message}"
    st.conditions = set_condition(
        st.conditions, CT.PROGRESSING, "False", Reason.CREATE_FAILED, text,
        now=now, generation=ms.metadata.generation,
    )
    st.message = text
    return st


def plan_modelserving(
    ms: ModelServing,
    observed: Observed,
    now: datetime,
    *,
    gateway_api: bool = False,
    analysis: AnalysisResult | None = None,
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
    keda: bool = False,
    prometheus: str = "",
    inference_api: bool = False,
    epp_image: str = DEFAULT_EPP_IMAGE,
    endpoint_pickers: bool = True,
    lws: bool = False,
    levels: TopologyLevels = DEFAULT_LEVELS,
) -> ServingPlan:
    """Decide the next step of ``ms`` given what was observed at ``now``.

    ``gateway_api``: the cluster serves HTTPRoute (gateway.networking.k8s.io/v1); traffic is then
    split by route weights. ``keda``: the cluster serves KEDA's ScaledObject; autoscaled revisions
    get one (querying the Prometheus at ``prometheus``) instead of an HPA, and may scale to zero.
    ``analysis``: the verdict on the canary's current step, when the executor scraped it (the
    planner says when one is due through :func:`analysis_due`).
    ``operator_namespace``: where the operator runs (the servers' NetworkPolicy admits it).
    ``inference_api``: the cluster serves InferencePool (inference.networking.k8s.io/v1); vLLM and
    SGLang revisions behind a named Gateway then get a pool each, with an endpoint picker running
    ``epp_image``, when ``endpoint_pickers`` (the operator may create their Roles).
    ``lws``: the cluster serves LeaderWorkerSet; multi-host replicas are then rendered as one per
    revision, else as Capstan-managed groups (:mod:`capstan.serving.groups`), kept in the domains of
    ``levels``.
    A refusal of the API server on record (see :class:`ServingPlan`) stays on show until
    applying works.
    """
    plan = _plan(ms, observed, now, gateway_api=gateway_api, analysis=analysis,
                 operator_namespace=operator_namespace, keda=keda, prometheus=prometheus,
                 inference_api=inference_api, epp_image=epp_image, endpoint_pickers=endpoint_pickers,
                 lws=lws, levels=levels)
    if plan.objects and refusal_on_record(ms.status.conditions, CT.PROGRESSING, ms.metadata.generation):
        plan.on_applied = plan.status
        kept = plan.status.model_copy(deep=True)
        kept.message = ms.status.message
        kept.conditions = keep_from(kept.conditions, ms.status.conditions, (CT.PROGRESSING,))
        plan.status = kept
    return plan


@dataclass(frozen=True)
class _Desired:
    """The revision the spec asks for, or why none can be made from it now."""

    revision: Revision | None
    blocked: str = ""  # why no revision can be made now ("" when one can)
    invalid: bool = False  # the spec itself is wrong (not only waiting for its model)

    @property
    def name(self) -> str | None:
        return self.revision.name if self.revision else None


@dataclass(frozen=True)
class _Traffic:
    """Who serves what once this pass's rollout step is taken."""

    stable: str | None
    canary: str | None
    weights: dict[str, int]  # live revision -> percent of traffic
    roles: dict[str, tuple[int, bool]]  # stable and canary -> (weight they are sized for, is canary)
    stable_target: int  # replicas the stable revision should have ready
    stable_ready: int
    stable_full: bool  # the stable revision has all of them
    retiring: list[str]  # replaced revisions still serving while the stable one fills up
    autoscaled: bool
    total: int  # spec.replicas
    surge: int | None = None  # spec.rollout.maxSurge
    canary_size: int = 0  # replicas the canary is sized for (its step's weight)

    @property
    def live(self) -> set[str]:
        """Revisions that get traffic (and keep their objects)."""
        return set(self.weights)

    @property
    def room(self) -> int | None:
        """Replicas left for everything but the canary under ``maxSurge`` (None: no limit)."""
        return None if self.surge is None else max(0, self.total + self.surge - self.canary_size)

    def replicas(self, weight: int, canary: bool) -> int | None:
        """Replicas of a revision sized for ``weight``; None when an HPA sizes it."""
        if self.autoscaled:
            return None
        if canary:
            return self.canary_size
        n = replicas_for_weight(self.total, weight, canary)
        return n if self.room is None else min(n, self.room)


def _plan(
    ms: ModelServing,
    observed: Observed,
    now: datetime,
    *,
    gateway_api: bool,
    analysis: AnalysisResult | None,
    operator_namespace: str,
    keda: bool,
    prometheus: str,
    inference_api: bool,
    epp_image: str,
    endpoint_pickers: bool,
    lws: bool,
    levels: TopologyLevels,
) -> ServingPlan:
    st = ms.status.model_copy(deep=True)
    old_phase = st.phase
    was_ready = (c := get_condition(st.conditions, CT.READY)) is not None and c.status == "True"
    plan = ServingPlan(status=st)
    st.observed_generation = ms.metadata.generation
    st.url = f"http://{stable_service_name(ms)}.{ms.metadata.namespace}.svc"
    st.selector = selector_string(ms)
    traffic_mode: Literal["gateway", "replicas"] = "gateway" if gateway_api else "replicas"
    st.rollout = (st.rollout or RolloutStatus()).model_copy(update={"traffic": traffic_mode})

    revs = _observed_revisions(ms, observed, now)
    desired = _desired_revision(ms, observed, keda, gateway_api and inference_api, endpoint_pickers, lws)
    straight = ms.spec.autoscaling is None and ms.spec.replicas == 0
    t = tick(
        st,
        desired.name,
        spec=ms.spec.rollout,
        observed=revs,
        canary_replicas=partial(_canary_replicas, ms),
        analysis=analysis,
        now=now,
        straight=straight,
    )
    plan.events.extend(t.events)
    plan.outcome = t.outcome
    if t.requeue is not None:
        plan.requeue(t.requeue)

    traffic = _traffic(ms, st, revs)
    route = routing(ms, gateway_api=gateway_api, inference_api=inference_api, pickers=endpoint_pickers,
                    runtimes={r: revs[r].runtime for r in traffic.live
                              if r in revs and r != desired.name and revs[r].runtime})
    scrapers = [epp_peer(ms)] if route.pools else None
    policy = (network_policy(ms, operator_namespace=operator_namespace, scrapers=scrapers)
              if traffic.live else None)
    groups_live = is_multi_host(ms) or any(
        revs[r].kind != "Deployment" for r in traffic.live if r in revs)
    # Multi-host groups talk among themselves on every port (Ray, NCCL, torch.distributed).
    group_policy = group_network_policy(ms) if policy is not None and groups_live else None
    if group_policy is not None:
        plan.objects.append(group_policy)
    _add_objects(plan, ms, desired, revs, traffic, policy=policy, gateway_api=gateway_api, keda=keda,
                 prometheus=prometheus, lws=lws, levels=levels)
    _add_routing(plan, ms, desired, revs, traffic, route, gateway_api=gateway_api, epp_image=epp_image)
    _add_deletes(plan, ms, observed, revs, traffic, policy=policy, group_policy=group_policy is not None,
                 gateway_api=gateway_api, keda=keda,
                 pools=route.pools)
    _set_revisions(st, ms, desired, revs, traffic)
    _adapters(plan, ms, observed, now)
    if not traffic.canary:
        st.rollout = RolloutStatus(traffic=traffic_mode)

    waiting = observed.group_waiting
    rollout_message = t.message
    if traffic.canary and waiting.get(traffic.canary):
        rollout_message = f"{rollout_message}; groups of {traffic.canary} wait: {waiting[traffic.canary]}"
    _conditions(plan, ms, now, rollout_message=rollout_message, desired=desired, traffic=traffic,
                was_ready=was_ready, waiting=waiting.get(traffic.stable or "", ""))
    _rolled_back_condition(plan, ms, now, t)
    _borrow(plan, ms, observed, traffic, now)
    _cond(plan, ms, now, CT.INFERENCE_ROUTING, route.pools, route.reason, route.message)
    if st.phase != old_phase:
        warn = st.phase in ("Degraded", "Failed")
        plan.events.append(Event("Warning" if warn else "Normal", st.phase, st.message))
    if traffic.stable and (not traffic.stable_full or traffic.retiring):
        plan.requeue(WAIT_READY_S)
    return plan


def _borrow(
    plan: ServingPlan, ms: ModelServing, observed: Observed, traffic: _Traffic, now: datetime
) -> None:
    """GPUs borrowed from preemptible TrainingJobs for the canary (``rollout.borrow``), loans that end,
    ``status.borrowedFrom`` and the Borrowing condition (shown once borrowing was ever asked for)."""
    allowed = ms.spec.rollout.borrow == "PreemptibleJobs"
    lenders = [x for x in map(lender_of, observed.lenders) if x is not None]
    canary = traffic.canary
    short = unschedulable_gpus(observed.canary_pods) if canary else 0
    if canary and observed.group_waiting.get(canary):
        short = max(short, ms.spec.replica_gpus)  # a whole group waits for room
    gpus = ms.spec.replica_gpus if ms.spec.gpu else 0
    bp = plan_borrow(ms.metadata.name, allowed=allowed, rolling_out=canary is not None, short=short,
                     canary_gpus=traffic.canary_size * gpus, lenders=lenders)
    plan.lend, plan.give_back = bp.lend, bp.give_back
    plan.status.borrowed_from = bp.borrowed
    for name in bp.lend:
        plan.events.append(Event("Normal", "Borrowing", f"the rollout of {canary} borrows the GPUs of "
                                 f"TrainingJob {name} (spec.preemptible) until it ends"))
    if bp.give_back:
        plan.events.append(Event("Normal", "GPUsReturned", bp.message))
    if allowed or bp.give_back or get_condition(ms.status.conditions, CT.BORROWING) is not None:
        _cond(plan, ms, now, CT.BORROWING, bp.active, bp.reason, bp.message)


def _adapters(plan: ServingPlan, ms: ModelServing, observed: Observed, now: datetime) -> None:
    """Loads and unloads that make every ready server hold the spec's adapters (new versions with
    rollout steps on a share of them); ``status.adapters``."""
    if not ms.spec.adapters and not any(s.loaded for s in observed.servers):
        plan.status.adapters = []
        return
    resolved = resolve_adapters(ms, observed.training_jobs, observed.snapshots)
    canaries: dict[str, AdapterCanary] = {}
    if adapter_mode(ms) == "runtime":
        canaries, next_step = adapter_canaries(ms, resolved.refs, now)
        if next_step is not None:
            plan.requeue(max(0.0, next_step))
        plan.adapter_actions = plan_adapter_actions(resolved.refs, observed.servers, canaries)
        # Confirm loads through /v1/models soon; and re-read the servers now and then anyway: a
        # server that restarted in place, or one not read this pass, holds no adapters yet.
        plan.requeue(ADAPTER_RECHECK_S if plan.adapter_actions else ADAPTER_RESYNC_S)
    plan.status.adapters = adapter_status(ms, resolved, observed.servers, observed.adapter_failures, canaries)


def _observed_revisions(ms: ModelServing, observed: Observed, now: datetime) -> dict[str, RevisionState]:
    """This ModelServing's revisions, by name, from its observed revision workloads."""
    mine = label_value(ms.metadata.name)
    revs: dict[str, RevisionState] = {}
    for dep in observed.deployments:
        labels = dig(dep, "metadata", "labels", default=None) or {}
        if labels.get(LABEL_SERVING) != mine or labels.get(LABEL_COMPONENT) == EPP_COMPONENT:
            continue
        state = revision_state(dep, observed.group_pods, now)
        if state is not None:
            revs[state.name] = state
    return revs


def _desired_revision(
    ms: ModelServing, observed: Observed, keda: bool, pools: bool, pickers: bool, lws: bool = False
) -> _Desired:
    """The revision the spec asks for; rendering it here surfaces a bad argsTemplate before any
    change. Autoscaling the cluster cannot do (minReplicas 0 without KEDA) and a Required
    InferencePool it cannot serve (``pools``: it serves InferencePool and HTTPRoute; ``pickers``: the
    operator may create endpoint pickers) make the spec invalid here: it is never run as something
    else."""
    problem = (ms.spec.scale_to_zero_problem(keda) or ms.spec.inference_pool_problem(pools, pickers)
               or ms.spec.multi_host_problem(lws))
    if problem:
        return _Desired(None, problem, invalid=True)
    try:
        model = resolve_model(ms, observed.training_job, observed.snapshots)
        adapters = resolve_adapters(ms, observed.training_jobs, observed.snapshots).refs
        desired = desired_revision(ms, model, adapters)
        deployment(ms, desired, None)
    except ModelNotReady as exc:
        return _Desired(None, str(exc))
    except (ArgsTemplateError, ValueError) as exc:
        return _Desired(None, str(exc), invalid=True)
    return _Desired(desired)


def _canary_replicas(ms: ModelServing, weight: int) -> int:
    """Replicas a revision needs ready to take ``weight`` percent of the traffic."""
    auto = ms.spec.autoscaling
    if auto is not None:
        return scaled_bounds(auto.min_replicas, auto.max_replicas, weight)[0] or 1
    n = replicas_for_weight(ms.spec.replicas, weight, live=True)
    if ms.spec.rollout.max_surge is not None and weight < 100:
        # Swapping replicas: the stable revision keeps at least one while it has traffic.
        n = min(n, ms.spec.replicas + ms.spec.rollout.max_surge - 1)
    return n


def _traffic(ms: ModelServing, st: ModelServingStatus, revs: dict[str, RevisionState]) -> _Traffic:
    """The traffic split after the rollout step recorded in ``st``: the canary its step's weight,
    the rest to the stable revision, shared with retiring ones while it is not full."""
    spec = ms.spec
    stable, canary = st.stable_revision, st.canary_revision
    active_w, target_w = step_weights(spec.rollout, st.rollout) if canary else (0, 0)
    if canary and not spec.rollout.steps:
        target_w = 100
    stable_w = 100 - active_w

    stable_obs = revs.get(stable) if stable else None
    if spec.autoscaling is not None and spec.autoscaling.min_replicas == 0 and stable_obs is not None:
        # Scaled to zero (or not yet) by KEDA: the autoscaler decides what the revision needs.
        stable_target = stable_obs.spec_replicas if stable_obs.spec_replicas is not None else 1
    elif spec.autoscaling is not None:
        stable_target = max(
            (stable_obs.spec_replicas or 0) if stable_obs else 0, _canary_replicas(ms, stable_w)
        )
    else:
        stable_target = replicas_for_weight(spec.replicas, stable_w, live=False)
    surge = spec.rollout.max_surge if spec.autoscaling is None else None
    canary_size = _canary_replicas(ms, target_w) if canary else 0
    if surge is not None:
        # No more than replicas + maxSurge at any time: the stable revision gives up the canary's room
        # first (its pods stop, freeing their GPUs), before the canary's start.
        stable_target = min(stable_target, max(0, spec.replicas + surge - canary_size))
    stable_ready = stable_obs.ready if stable_obs else 0
    stable_full = stable_obs is not None and stable_ready >= stable_target
    failed = set(st.failed_revisions)
    retiring = [] if stable_full else sorted(r for r in revs if r not in (stable, canary) and r not in failed)

    weights: dict[str, int] = {}
    if stable:
        shares = {r: revs[r].ready for r in retiring}
        shares[stable] = stable_ready
        weights = _split(stable_w, shares) if retiring and sum(shares.values()) else {stable: stable_w}
    if canary:
        weights[canary] = active_w
    roles = {stable: (stable_w, False)} if stable else {}
    if canary:
        roles[canary] = (target_w, True)
    return _Traffic(
        stable=stable,
        canary=canary,
        weights=weights,
        roles=roles,
        stable_target=stable_target,
        stable_ready=stable_ready,
        stable_full=stable_full,
        retiring=retiring,
        autoscaled=spec.autoscaling is not None,
        total=spec.replicas,
        surge=surge,
        canary_size=canary_size,
    )


def _add_objects(
    plan: ServingPlan,
    ms: ModelServing,
    desired: _Desired,
    revs: dict[str, RevisionState],
    traffic: _Traffic,
    *,
    policy: dict[str, Any] | None,
    gateway_api: bool,
    keda: bool,
    prometheus: str,
    lws: bool,
    levels: TopologyLevels,
) -> None:
    """The objects to apply (Services, the desired revision's workload, HPAs, the route) and
    the rescaling of revisions rendered from an older spec."""
    if policy is not None:  # applied with the Services, before a revision's pods start
        plan.objects.append(policy)
    if traffic.live:
        plan.objects.append(stable_service(ms))
    for rev in sorted(traffic.live):
        plan.objects.append(revision_service(ms, rev))
    new = desired.revision
    for rev, (w, is_canary) in traffic.roles.items():
        replicas = traffic.replicas(w, is_canary)
        if new is not None and rev == new.name:
            claim = model_claim(ms, new)
            if claim is not None:
                plan.objects.append(claim)
            fetch = model_fetch(ms, new)
            if fetch is not None:
                plan.objects.append(fetch)
            claim_meta = meta(ms, "", component=ADAPTER_COMPONENT)
            plan.objects.extend(adapter_claims(ms, list(new.adapters), claim_meta))
            plan.objects.extend(_workload(ms, new, replicas, lws=lws, levels=levels))
        elif replicas is not None and rev in revs:
            # Rendered from an older spec: only its size follows this one.
            plan.scale[rev] = replicas
        if traffic.autoscaled and (rev in revs or (new is not None and rev == new.name)):
            kind = revs[rev].kind if rev in revs else _workload_kind(ms, lws)
            plan.objects.append(autoscaler(ms, rev, w, canary=is_canary, keda=keda, prometheus=prometheus,
                                           target=kind))
    if traffic.room is not None and traffic.retiring:
        # Revisions replaced by a promotion give their replicas back as the new stable one needs them.
        left = max(0, traffic.room - traffic.stable_target)
        for rev in traffic.retiring:
            have = revs[rev].spec_replicas or 0
            plan.scale[rev] = min(have, left)
            left -= plan.scale[rev]


def _workload_kind(ms: ModelServing, lws: bool) -> str:
    """The kind of object that runs a revision of ``ms`` now."""
    if not is_multi_host(ms):
        return "Deployment"
    return LWS_KIND if lws else GROUP_REVISION_KIND


def _workload(
    ms: ModelServing, new: Revision, replicas: int | None, *, lws: bool, levels: TopologyLevels
) -> list[dict[str, Any]]:
    """The objects that run revision ``new``: its Deployment, or for multi-host replicas its
    LeaderWorkerSet, or the ControllerRevision and headless Service of Capstan-managed groups."""
    notes = {ANNOTATION_MODEL: new.model.identity, ANNOTATION_RUNTIME: ms.spec.runtime}
    kind = _workload_kind(ms, lws)
    if kind == "Deployment":
        dep = deployment(ms, new, replicas)
        dep["metadata"].setdefault("annotations", {}).update(notes)
        return [dep]
    metadata = meta(ms, new.name, new.name)
    metadata["annotations"] = notes
    pod = server_pod(ms, new)
    if kind == LWS_KIND:
        return [leader_worker_set(ms, pod, metadata, new.name, replicas, levels)]
    # autoscaling without LeaderWorkerSet is refused (_desired_revision): replicas is set here
    return [group_service(meta(ms, "", new.name), new.name),
            group_revision(ms, pod, metadata, new.name, replicas or 0)]


def _add_routing(
    plan: ServingPlan,
    ms: ModelServing,
    desired: _Desired,
    revs: dict[str, RevisionState],
    traffic: _Traffic,
    route: Routing,
    *,
    gateway_api: bool,
    epp_image: str,
) -> None:
    """The route to the live revisions: an InferencePool and endpoint picker each and an HTTPRoute
    to the pools, or an HTTPRoute to their Services (also on the named Gateway), or nothing."""
    if not traffic.live:
        return
    if route.pools:
        for rev in sorted(traffic.live):
            obs = revs.get(rev)
            current = rev == desired.name or obs is None
            # A revision from an older spec keeps the port and runtime it was rendered with.
            port = ms.spec.port if current or obs is None or obs.port is None else obs.port
            runtime = ms.spec.runtime if current or obs is None or not obs.runtime else obs.runtime
            plan.objects.append(inference_pool(ms, rev, port))
            plan.objects.extend(endpoint_picker(ms, rev, runtime, epp_image))
        plan.objects.append(pool_route(ms, traffic.weights))
    elif gateway_api:
        plan.objects.append(http_route(ms, traffic.weights, gateway_parents(ms)))


def _add_deletes(
    plan: ServingPlan,
    ms: ModelServing,
    observed: Observed,
    revs: dict[str, RevisionState],
    traffic: _Traffic,
    *,
    policy: dict[str, Any] | None,
    group_policy: bool,
    gateway_api: bool,
    keda: bool,
    pools: bool,
) -> None:
    """Children no live revision needs any more, and an event for each revision removed."""
    mine = label_value(ms.metadata.name)
    live = traffic.live
    adapter_claims_used = {
        str(v["persistentVolumeClaim"]["claimName"])
        for dep in observed.deployments if dig(dep, "metadata", "name") in live
        for v in dig(server_template(dep), "spec", "volumes") or [] if "persistentVolumeClaim" in v
    } | {str(o["metadata"]["name"]) for o in plan.objects if o.get("kind") == "PersistentVolumeClaim"}
    for obj in [*observed.deployments, *observed.children]:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(LABEL_SERVING) != mine or meta.get("deletionTimestamp"):
            continue
        kind, name = obj.get("kind", ""), meta.get("name", "")
        owner_rev = labels.get(LABEL_REVISION)
        gone = (
            (owner_rev is not None and owner_rev not in live)
            # KEDA makes its own HPA (keda-hpa-{name}) for a ScaledObject; Capstan's is named
            # like the revision and goes when KEDA takes over.
            or (kind == "HorizontalPodAutoscaler"
                and (not traffic.autoscaled or (keda and name == owner_rev)))
            or (kind == "ScaledObject" and (not traffic.autoscaled or not keda))
            or (kind == "HTTPRoute" and (not gateway_api or not live))
            or (kind == "NetworkPolicy" and (policy is None or (
                name == group_policy_name(ms) and not group_policy)))
            # An adapter's restored snapshot, once no live revision mounts it.
            or (kind == "PersistentVolumeClaim" and labels.get(LABEL_COMPONENT) == ADAPTER_COMPONENT
                and name not in adapter_claims_used)
            # Inference routing turned off (runtime, gateway or CRDs gone): pools and pickers go.
            or (not pools and (kind == "InferencePool" or labels.get(LABEL_COMPONENT) == EPP_COMPONENT))
        )
        if gone:
            plan.deletes.append(ObjectRef(obj.get("apiVersion", ""), kind, name))
    failed = set(plan.status.failed_revisions)
    for rev in sorted({r for r in revs if r not in live}):
        why = "rolled back" if rev in failed else "replaced"
        plan.events.append(
            Event("Normal", "RevisionRemoved", f"revision {rev} ({why}) scaled to 0 and deleted")
        )


def _set_revisions(
    st: ModelServingStatus,
    ms: ModelServing,
    desired: _Desired,
    revs: dict[str, RevisionState],
    traffic: _Traffic,
) -> None:
    """``status.revisions`` (stable first, then the canary) and ``status.replicas``."""
    previous = {r.name: r for r in ms.status.revisions}
    new = desired.revision
    st.revisions = []
    for rev in sorted(traffic.live, key=lambda r: (r != traffic.stable, r != traffic.canary, r)):
        obs = revs.get(rev)
        w, is_canary = traffic.roles.get(rev, (0, False))
        n = traffic.replicas(w, is_canary) if rev in traffic.roles else None
        if n is None:
            n = obs.spec_replicas if obs and obs.spec_replicas is not None else 0
        model_id = (
            new.model.identity
            if new and rev == new.name
            else (obs.model if obs and obs.model else previous.get(rev, RevisionStatus(name=rev)).model)
        )
        ready = obs.ready if obs else 0
        st.revisions.append(
            RevisionStatus(name=rev, weight=traffic.weights[rev], replicas=n, ready=ready, model=model_id)
        )
    st.replicas = sum(r.ready for r in st.revisions)


def _rolled_back_condition(plan: ServingPlan, ms: ModelServing, now: datetime, t: Tick) -> None:
    """RolledBack: True after a rollback, False once a new rollout starts or the canary is promoted."""
    st = plan.status
    cond = partial(_cond, plan, ms, now, CT.ROLLED_BACK)
    if t.rolled_back is not None:
        cond(True, t.rolled_back_reason, t.rolled_back)
    elif t.new_rollout:
        cond(False, RolledBackReason.NEW_ROLLOUT, f"rolling out {st.canary_revision}")
    elif t.outcome == "promoted":
        cond(False, RolledBackReason.PROMOTED, f"{st.stable_revision} promoted")
    elif get_condition(st.conditions, CT.ROLLED_BACK) is None:
        cond(False, RolledBackReason.NO_ROLLBACK, "no rollout has been rolled back")


def _cond(
    plan: ServingPlan, ms: ModelServing, now: datetime, type_: str, ok: bool, reason: str, msg: str
) -> None:
    plan.status.conditions = set_condition(
        plan.status.conditions, type_, "True" if ok else "False", reason, msg,
        now=now, generation=ms.metadata.generation,
    )


def _conditions(
    plan: ServingPlan,
    ms: ModelServing,
    now: datetime,
    *,
    rollout_message: str,
    desired: _Desired,
    traffic: _Traffic,
    was_ready: bool,
    waiting: str = "",
) -> None:
    """Ready, Progressing and Degraded, and the phase and message that go with them (``waiting``:
    why the stable revision's multi-host groups wait for room)."""
    st = plan.status
    stable, canary = st.stable_revision, st.canary_revision
    blocked, invalid = desired.blocked, desired.invalid
    ready, target, retiring = traffic.stable_ready, traffic.stable_target, traffic.retiring
    cond = partial(_cond, plan, ms, now)
    if stable is None:
        reason = Reason.INVALID_SPEC if invalid else ReadyReason.MODEL_NOT_READY
        msg = blocked or "no revision yet"
        cond(CT.READY, False, reason, msg)
        cond(CT.PROGRESSING, not invalid, reason, msg)
        cond(CT.DEGRADED, invalid, reason, msg)
        st.phase, st.message = ("Failed" if invalid else "Pending"), msg
        return
    serving = f"{stable}: {ready}/{target} replicas ready"
    if waiting and ready < target:
        serving += f" (groups wait: {waiting})"
    idle = ("scaled to zero by KEDA while idle (autoscaling.minReplicas: 0; autoscaling.activationQuery "
            "wakes it)" if traffic.autoscaled else "scaled to zero (spec.replicas: 0)")
    if target == 0:
        cond(CT.READY, False, ReadyReason.SCALED_TO_ZERO, idle)
    elif ready > 0:
        cond(CT.READY, True, ReadyReason.AVAILABLE, serving)
    else:
        cond(CT.READY, False, ReadyReason.NO_REPLICAS_READY, serving)
    # A just-promoted revision still scaling up while the old one retires is progress, not damage.
    degraded = target > 0 and ready < target and was_ready and not canary and not retiring
    cond(
        CT.DEGRADED,
        degraded,
        DegradedReason.REPLICAS_UNAVAILABLE if degraded else DegradedReason.AS_EXPECTED,
        serving if degraded else "stable revision has its replicas",
    )
    if canary:
        cond(CT.PROGRESSING, True, ProgressingReason.ROLLING_OUT, rollout_message)
        st.phase, st.message = "Progressing", rollout_message
    elif blocked:
        reason = Reason.INVALID_SPEC if invalid else ReadyReason.MODEL_NOT_READY
        cond(CT.PROGRESSING, False, reason, blocked)
    elif ready < target or retiring:
        what = f"retiring {', '.join(retiring)}" if retiring else "scaling up"
        cond(CT.PROGRESSING, True, ProgressingReason.SCALING_UP, f"{serving}; {what}")
    else:
        cond(CT.PROGRESSING, False, ProgressingReason.STABLE, f"{stable} serves 100% of traffic")
    if canary:
        return
    if target == 0:
        st.phase, st.message = "Pending", idle
    elif degraded:
        st.phase, st.message = "Degraded", serving
    elif ready >= target:
        st.phase = "Ready"
        st.message = rollout_message or (
            f"{blocked}; serving {stable}" if blocked else f"{stable} serving: {serving}"
        )
    else:
        st.phase, st.message = "Progressing", serving


@dataclass(frozen=True)
class AnalysisDue:
    """The canary step the executor should scrape for (and whether the window has closed)."""

    revision: str
    step: int
    verdict_needed: bool


def analysis_due(ms: ModelServing, now: datetime) -> AnalysisDue | None:
    """Whether the canary's current step is analysed: a baseline is needed once the step started,
    a verdict once its pause has elapsed. None when no analysis is configured or no step runs."""
    st, spec = ms.status, ms.spec.rollout
    if spec.analysis is None or not spec.steps or not st.canary_revision or st.rollout is None:
        return None
    started = parse_time(st.rollout.step_started_at)
    if started is None:
        return None
    i = min(st.rollout.step, len(spec.steps) - 1)
    end = started + timedelta(seconds=parse_duration(spec.steps[i].pause))
    return AnalysisDue(st.canary_revision, i, now >= end)
