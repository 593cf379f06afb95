"""kopf handlers for ModelServing: read the world, scrape the canary when due, plan, apply.

Triggering mirrors the TrainingJob handlers: one kopf daemon per ModelServing runs a reconcile
loop that sleeps until ``plan.requeue_after`` (a step's pause end, a readiness re-check) or a
resync period, or until something wakes it: the ModelServing itself (spec change, ``kubectl
scale``), one of its Deployments (labelled ``capstan.dev/modelserving``, owner found through the
ownerReference), or the TrainingJob it serves a checkpoint of (a new ready snapshot).

Each reconcile: GET the ModelServing, LIST its children by label (Deployments, Services, HPAs,
PVCs, HTTPRoutes, ScaledObjects, and InferencePools with their pickers' ServiceAccounts, Roles and
RoleBindings, when the cluster serves them), GET the TrainingJob for ``fromTrainingJob``; when
a canary step is analysed (:func:`capstan.serving.plan.analysis_due`) scrape the canary pods'
``/metrics`` (pod IP and the ``http`` container port) for the step's baseline or, once the pause
is over, for the verdict; plan; then apply in order: status patch, server-side apply of the
desired objects, Deployment rescales, deletes, Events, metrics. Baselines are kept in memory
(:class:`~capstan.serving.analysis.Baselines`): after a restart a step's window restarts, which
only delays the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from capstan import GROUP, VERSION
from capstan.api.condition_types import ConditionType
from capstan.api.conditions import CREATE_FAILED
from capstan.api.modelserving import ModelServing
from capstan.fields import dig
from capstan.kube.activities import operator_config, shared_state
from capstan.kube.adapters import apply_adapter_actions, observe_servers
from capstan.kube.client import ApiClient, ApiError, gather_bounded, owner_of
from capstan.kube.reconciler import Reported, reconcile_loop, refused_by_server, wake
from capstan.kube.resources import (
    DEPLOYMENTS,
    HPAS,
    JOBS,
    MODELSERVINGS,
    NETWORK_POLICIES,
    PVCS,
    SERVICES,
    TRAININGJOBS,
    VOLUME_SNAPSHOTS,
    ApiResource,
    api_resource_of,
    register_kind,
)
from capstan.kube.scrape import pod_targets, scrape_pods
from capstan.kube.servinggroups import (
    CONTROLLERREVISIONS,
    LEADERWORKERSETS,
    group_selector,
    run_groups,
)
from capstan.kube.status import reconcile_live, status_merge_patch
from capstan.labels import LABEL_GROUP_OF, LABEL_SERVING, LENT_TO_ANNOTATION
from capstan.metrics import MODELSERVINGS as MODELSERVINGS_GAUGE
from capstan.metrics import (
    REVISION_WEIGHT,
    ROLLOUT_STEP,
    ROLLOUTS,
    PhaseGauge,
)
from capstan.naming import label_value
from capstan.serving.adapters import ObservedServer
from capstan.serving.adapters import mode as adapter_mode
from capstan.serving.analysis import AnalysisResult, Baselines, PodSample, evaluate, window, with_queries
from capstan.serving.groups import group_replicas, scale_annotation
from capstan.serving.plan import Observed, ServingPlan, analysis_due, plan_modelserving, refused
from capstan.serving.promql import QueryOutcome, judge_queries, render_query, scalar_of
from capstan.serving.revisions import revision_selector, serving_selector
from capstan.serving.rollout import WAIT_READY_S
from capstan.serving.runtimes import runtime_for

KIND = "ModelServing"
QUERY_TIMEOUT_S = 10.0  # one PromQL query of canary analysis; a slower Prometheus holds the step
PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Failed")
HTTPROUTES = ApiResource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
register_kind(HTTPROUTES)
SCALEDOBJECTS = ApiResource("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject")
register_kind(SCALEDOBJECTS)
INFERENCEPOOLS = ApiResource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")
register_kind(INFERENCEPOOLS)
# An InferencePool's endpoint picker: its identity and what it may read.
SERVICEACCOUNTS = ApiResource("", "v1", "serviceaccounts", "ServiceAccount")
ROLES = ApiResource("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLEBINDINGS = ApiResource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
for _res in (SERVICEACCOUNTS, ROLES, ROLEBINDINGS):
    register_kind(_res)


@dataclass
class ServingState:
    """What the ModelServing handlers share across objects in one operator run."""

    baselines: Baselines = field(default_factory=Baselines)
    served: dict[ApiResource, tuple[float, bool]] = field(default_factory=dict)  # (checked at, answer)
    sources: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # TrainingJob → uids
    weights: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # revisions in the gauge
    phases: PhaseGauge = field(default_factory=lambda: PhaseGauge(MODELSERVINGS_GAUGE, PHASES))
    # ModelServing uid -> adapter name -> why its last load or unload failed (shown in the next status)
    adapter_failures: dict[str, dict[str, str]] = field(default_factory=dict)
    # ModelServing uid -> revision -> why its groups waited for room at the last pass
    group_waiting: dict[str, dict[str, str]] = field(default_factory=dict)
    # (namespace, label value of a ModelServing's name) -> its uid: group pods' events wake it
    group_owners: dict[tuple[str, str], str] = field(default_factory=dict)


@kopf.on.startup(id="serving-state")
def init_state(memo: kopf.Memo, **_: Any) -> None:
    """Create the shared state on the operator memo (objects' memos are shallow copies of it)."""
    memo["serving"] = ServingState()


def _state(memo: kopf.Memo) -> ServingState:
    return shared_state(memo, "serving", ServingState)



async def served(api: ApiClient, res: ApiResource, memo: kopf.Memo | None = None) -> bool:
    """Whether the API server serves ``res`` (API discovery; cached on ``memo`` when given, for the
    configuration's ``discovery_ttl_s``): CRDs installed or removed later are seen within that time
    (e.g. Gateway API's: traffic then moves to route weights)."""
    if memo is None:
        cache: dict[ApiResource, tuple[float, bool]] = {}
        ttl = 0.0
    else:
        cache, ttl = _state(memo).served, operator_config(memo).discovery_ttl_s
    checked, answer = cache.get(res, (-ttl - 1, False))
    if time.monotonic() - checked < ttl:
        return answer
    try:
        doc = await api.request("GET", f"/apis/{res.group}/{res.version}")
        answer = any(r.get("name") == res.plural for r in doc.get("resources") or [])
    except ApiError as exc:
        if exc.status not in (403, 404, 503):
            raise
        answer = False
    cache[res] = (time.monotonic(), answer)
    return answer


async def gateway_api_available(api: ApiClient, memo: kopf.Memo) -> bool:
    """Whether the API server serves ``httproutes.gateway.networking.k8s.io/v1`` (cached)."""
    return await served(api, HTTPROUTES, memo)


async def keda_available(api: ApiClient, memo: kopf.Memo | None = None) -> bool:
    """Whether the API server serves KEDA's ``scaledobjects.keda.sh/v1alpha1`` (cached)."""
    return await served(api, SCALEDOBJECTS, memo)


async def leader_worker_sets_available(api: ApiClient, memo: kopf.Memo | None = None) -> bool:
    """Whether the API server serves ``leaderworkersets.leaderworkerset.x-k8s.io/v1`` (cached)."""
    return await served(api, LEADERWORKERSETS, memo)


async def inference_pools_available(api: ApiClient, memo: kopf.Memo | None = None) -> bool:
    """Whether the API server serves ``inferencepools.inference.networking.k8s.io/v1`` (cached)."""
    return await served(api, INFERENCEPOOLS, memo)


async def _list(
    api: ApiClient, res: ApiResource, namespace: str, labels: Mapping[str, str]
) -> list[dict[str, Any]]:
    try:
        return await api.list_objects(res, namespace, labels)
    except ApiError as exc:
        if exc.not_found:  # the kind is not served (e.g. no snapshot CRDs)
            return []
        raise


async def _observe(
    api: ApiClient, ms: ModelServing, gateway: bool, keda: bool, pools: bool, memo: kopf.Memo,
    lws: bool = False,
) -> Observed:
    ns = ms.metadata.namespace
    sel = serving_selector(ms)
    # revision workloads first: Deployments, the ControllerRevisions of Capstan-managed multi-host
    # groups, and LeaderWorkerSets where served
    workloads = [DEPLOYMENTS, CONTROLLERREVISIONS] + ([LEADERWORKERSETS] if lws else [])
    kinds = [*workloads, SERVICES, HPAS, PVCS, NETWORK_POLICIES, JOBS]
    kinds += [HTTPROUTES] if gateway else []
    kinds += [SCALEDOBJECTS] if keda else []
    # Endpoint pickers exist only where InferencePool is served (the owner reference collects any
    # left behind by CRDs removed later).
    kinds += [INFERENCEPOOLS, SERVICEACCOUNTS, ROLES, ROLEBINDINGS] if pools else []
    # bounded gather: a failed list (the operator stopping, say) leaves no sibling request running
    found_kinds = await gather_bounded([_list(api, r, ns, sel) for r in kinds])
    deployments = [obj for objs in found_kinds[:len(workloads)] for obj in objs]
    children = [obj for objs in found_kinds[len(workloads):] for obj in objs]
    group_pods: list[dict[str, Any]] = []
    if any(d.get("kind") == CONTROLLERREVISIONS.kind for d in deployments):
        group_pods = await api.list_pods(ns, group_selector(ms))
    training_job = None
    snapshots: dict[str, dict[str, Any]] = {}
    ftj = ms.spec.model.from_training_job
    if ftj is not None:
        training_job = await api.get(TRAININGJOBS, ns, ftj.name)
    # The TrainingJobs LoRA adapters come from, by name.
    names = sorted({a.from_training_job.name for a in ms.spec.adapters if a.from_training_job is not None})
    found = await gather_bounded([api.get(TRAININGJOBS, ns, n) for n in names])
    jobs = {n: j for n, j in zip(names, found, strict=True) if j is not None}
    sources = [j for j in (training_job, *jobs.values()) if j is not None]
    if any(not (dig(j, "spec", "checkpoint", "volume") or {}).get("size") for j in sources):
        # An adopted checkpoint volume has no size in the spec: the snapshot's restoreSize has it.
        snapshots = {s["metadata"]["name"]: s for s in await _list(api, VOLUME_SNAPSHOTS, ns, {})}
    servers: list[ObservedServer] = []
    if ms.spec.adapters and adapter_mode(ms) == "runtime":
        servers = await observe_servers(await api.list_pods(ns, sel), ms.spec.port)
    failures = _state(memo).adapter_failures.get(ms.metadata.uid or ms.metadata.name, {})
    waiting = _state(memo).group_waiting.get(ms.metadata.uid or ms.metadata.name, {})
    canary_pods, lenders = await _borrow_view(api, ms)
    return Observed(deployments, children, training_job, snapshots, training_jobs=jobs, servers=servers,
                    adapter_failures=failures, group_pods=group_pods, group_waiting=dict(waiting),
                    canary_pods=canary_pods, lenders=lenders)


async def _borrow_view(
    api: ApiClient, ms: ModelServing
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For ``rollout.borrow``, or a ModelServing that ever borrowed (its Borrowing condition: a loan
    may still have to be given back): the canary's pods and the namespace's TrainingJobs; nothing is
    read otherwise."""
    allowed = ms.spec.rollout.borrow == "PreemptibleJobs"
    on_record = any(c.type == ConditionType.BORROWING for c in ms.status.conditions)
    if not (allowed or on_record):
        return [], []
    ns, canary = ms.metadata.namespace, ms.status.canary_revision
    pods = await api.list_pods(ns, revision_selector(ms, canary)) if allowed and canary else []
    return pods, await api.list_objects(TRAININGJOBS, ns)


async def _lend_and_return(
    api: ApiClient, ms: ModelServing, plan: ServingPlan, observed: Observed, logger: kopf.Logger
) -> None:
    """Mark the TrainingJobs the plan borrows from (``capstan.dev/lent-to``) and unmark those it
    returns. A mark carries the resourceVersion read, so two rollouts never take one job; a job
    changed meanwhile is decided on again next pass, as is a return that failed (the jobs are read
    as long as the Borrowing condition exists)."""
    versions = {dig(j, "metadata", "name"): dig(j, "metadata", "resourceVersion") for j in observed.lenders}
    changes = [(n, ms.metadata.name) for n in plan.lend] + [(n, None) for n in plan.give_back]
    for name, value in changes:
        meta: dict[str, Any] = {"annotations": {LENT_TO_ANNOTATION: value}}
        if value is not None:
            meta["resourceVersion"] = versions.get(name)
        patch = {"metadata": meta}
        try:
            await api.patch(TRAININGJOBS, ms.metadata.namespace, name, patch)
        except ApiError as exc:
            if not (exc.conflict or exc.not_found):
                raise
            logger.info("TrainingJob %s changed meanwhile (%s): the next pass decides", name, exc.reason)
            continue
        logger.info("%s the GPUs of TrainingJob %s", "borrowed" if value else "returned", name)


async def _analyse(
    api: ApiClient, ms: ModelServing, now: datetime, memo: kopf.Memo, logger: kopf.Logger
) -> AnalysisResult | None:
    """Scrape the canary (and, for ``maxRegression``, the stable revision) when a step is analysed:
    the baseline once, the verdict after the pause; then the PromQL queries, if any."""
    due = analysis_due(ms, now)
    baselines = _state(memo).baselines
    uid = ms.metadata.uid
    if due is None:
        baselines.forget(uid)
        return None
    baseline = baselines.get(uid, due.revision, due.step)
    if baseline is not None and not due.verdict_needed:
        return None
    spec = ms.spec.rollout.analysis
    assert spec is not None
    stable = ms.status.stable_revision if spec.max_regression is not None else None
    canary_scrape = await _scrape_revision(api, ms, due.revision, logger)
    stable_scrape = await _scrape_revision(api, ms, stable, logger) if stable else {}
    if baseline is None:
        # Pod names are unique across revisions: one baseline holds both.
        baselines.put(uid, due.revision, due.step, {**canary_scrape, **stable_scrape})
        return None
    result = evaluate(
        due.revision, due.step, window(baseline, canary_scrape), spec,
        stable=window(baseline, stable_scrape) if stable else None,
    )
    if result.verdict == "Pass" and spec.queries:
        verdict, message = judge_queries(
            [(q.name, q.min, q.max) for q in spec.queries],
            await _run_queries(ms, due.revision, operator_config(memo).prometheus_url),
        )
        result = with_queries(result, verdict, message)
    logger.info(
        "analysis of %s at step %d: %s (%s)", due.revision, due.step + 1, result.verdict, result.message
    )
    return result


async def _scrape_revision(
    api: ApiClient, ms: ModelServing, revision: str, logger: kopf.Logger
) -> dict[str, PodSample]:
    rt = runtime_for(ms.spec)
    pods = await api.list_pods(ms.metadata.namespace, revision_selector(ms, revision))
    scrape, errors = await scrape_pods(pod_targets(pods, rt.metrics_path, ms.spec.port), rt.metrics)
    for err in errors:
        logger.warning("metrics scrape of revision %s failed: %s", revision, err)
    return scrape


async def _run_queries(ms: ModelServing, revision: str, prometheus_url: str) -> dict[str, QueryOutcome]:
    """Each of the analysis' PromQL queries against ``prometheus_url``, by name."""
    spec = ms.spec.rollout.analysis
    assert spec is not None
    values = {
        "namespace": ms.metadata.namespace,
        "name": ms.metadata.name,
        "revision": revision,
        "stableRevision": ms.status.stable_revision or "",
    }
    timeout = aiohttp.ClientTimeout(total=QUERY_TIMEOUT_S)
    out: dict[str, QueryOutcome] = {}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for q in spec.queries:
            out[q.name] = await _query(session, prometheus_url, q.name, render_query(q.query, values))
    return out


async def _query(session: aiohttp.ClientSession, url: str, name: str, promql: str) -> QueryOutcome:
    try:
        async with session.get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql}) as resp:
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return QueryOutcome(name, problem=f"Prometheus at {url} did not answer: {type(exc).__name__}: {exc}")
    if not isinstance(doc, Mapping) or doc.get("status") != "success":
        error = doc.get("error") if isinstance(doc, Mapping) else None
        return QueryOutcome(name, problem=f"Prometheus refused it: {error or doc!r}"[:300])
    return replace(scalar_of(doc.get("data") or {}), name=name)


def _record_metrics(memo: kopf.Memo, ms: ModelServing, plan: ServingPlan) -> None:
    ns, name = ms.metadata.namespace, ms.metadata.name
    st = plan.status
    weights = _state(memo).weights
    live = {r.name for r in st.revisions}
    for gone in weights.get((ns, name), set()) - live:
        with contextlib.suppress(KeyError):
            REVISION_WEIGHT.remove(ns, name, gone)
    for rev in st.revisions:
        REVISION_WEIGHT.labels(ns, name, rev.name).set(rev.weight)
    weights[(ns, name)] = live
    ROLLOUT_STEP.labels(ns, name).set(st.rollout.step if st.canary_revision and st.rollout else -1)
    if plan.outcome:
        ROLLOUTS.labels(ns, plan.outcome).inc()
    _state(memo).phases.set(ns, name, st.phase)


async def _apply(
    api: ApiClient,
    ms: ModelServing,
    body: Mapping[str, Any],
    plan: ServingPlan,
    observed: Observed,
    logger: kopf.Logger,
) -> None:
    ns, name = ms.metadata.namespace, ms.metadata.name
    patch = status_merge_patch(body.get("status"), plan.status)
    if patch:
        await api.patch_status(MODELSERVINGS, ns, name, patch)
        if ms.status.phase != plan.status.phase:
            logger.info("phase %s -> %s: %s", ms.status.phase, plan.status.phase, plan.status.message)
    # PVCs, Services and the NetworkPolicy first (a pod needs its claim, a route its backends, and no
    # pod should run unprotected), then the rest.
    early = ("PersistentVolumeClaim", "Service", "NetworkPolicy")
    first = [o for o in plan.objects if o["kind"] in early]
    later = [o for o in plan.objects if o["kind"] not in early]
    refusal: tuple[dict[str, Any], ApiError] | None = None
    for batch in (first, later):
        if batch and refusal is None:
            results = await asyncio.gather(*(api.apply(o) for o in batch), return_exceptions=True)
            for obj, result in zip(batch, results, strict=True):
                if isinstance(result, ApiError) and refused_by_server(result):
                    refusal = refusal or (obj, result)
                elif isinstance(result, BaseException):
                    raise result
    workloads = {d["metadata"]["name"]: d for d in observed.deployments}
    await gather_bounded([
        _rescale(api, workloads[rev], n) for rev, n in plan.scale.items()
        if rev in workloads and _size(workloads[rev]) != n
    ])
    await gather_bounded([
        api.delete(api_resource_of({"apiVersion": r.api_version, "kind": r.kind}), ns, r.name)
        for r in plan.deletes
    ])
    if plan.events:
        await asyncio.gather(*(api.post_event(body, e.reason, e.message, e.type) for e in plan.events))
    if refusal is not None or plan.on_applied is not None:
        await _settle_applies(api, ms, body, plan, refusal)


def _size(workload: Mapping[str, Any]) -> int | None:
    """Replicas a revision workload asks for (groups, for multi-host replicas)."""
    if workload.get("kind") == CONTROLLERREVISIONS.kind:
        return group_replicas(workload)
    return dig(workload, "spec", "replicas")


async def _rescale(api: ApiClient, workload: Mapping[str, Any], replicas: int) -> None:
    """Set a revision workload's size: a Deployment's or LeaderWorkerSet's replicas, or the number
    of groups of a Capstan-managed group revision."""
    meta = workload["metadata"]
    if workload.get("kind") == CONTROLLERREVISIONS.kind:
        await api.patch(CONTROLLERREVISIONS, meta["namespace"], meta["name"], scale_annotation(replicas))
        return
    res = LEADERWORKERSETS if workload.get("kind") == LEADERWORKERSETS.kind else DEPLOYMENTS
    await api.patch(res, meta["namespace"], meta["name"], {"spec": {"replicas": replicas}})


async def _apply_adapters(
    api: ApiClient, ms: ModelServing, body: Mapping[str, Any], plan: ServingPlan, memo: kopf.Memo,
    logger: kopf.Logger,
) -> None:
    """Load and unload adapters on the running servers; failures go into the next pass's status."""
    key = ms.metadata.uid or ms.metadata.name
    if not plan.adapter_actions:
        _state(memo).adapter_failures.pop(key, None)
        return
    for a in plan.adapter_actions:
        logger.info("adapter %s: %s on %s%s", a.name, a.verb, a.pod, f" from {a.path}" if a.path else "")
    failures = await apply_adapter_actions(plan.adapter_actions)
    _state(memo).adapter_failures[key] = failures
    for name, why in sorted(failures.items()):
        logger.warning("adapter %s: %s", name, why)
        await api.post_event(body, "AdapterLoadFailed", f"adapter {name}: {why}", "Warning")


async def _settle_applies(
    api: ApiClient,
    ms: ModelServing,
    body: Mapping[str, Any],
    plan: ServingPlan,
    refusal: tuple[dict[str, Any], ApiError] | None,
) -> None:
    """After the applies: a refusal goes into the status (Progressing=False/CreateFailed with the
    server's message) and a Warning Event, then the pass ends as a reported failure (the loop
    backs off); applies that worked after a refusal write ``plan.on_applied``. The live status
    is ``plan.status`` here: this pass wrote it."""
    ns, name = ms.metadata.namespace, ms.metadata.name
    written = plan.status.wire()
    if refusal is None:
        assert plan.on_applied is not None
        patch = status_merge_patch(written, plan.on_applied)
        if patch:
            await api.patch_status(MODELSERVINGS, ns, name, patch)
        return
    obj, exc = refusal
    what = f"{obj['kind']} {obj['metadata']['name']}"
    status = refused(ms, plan.status, what, exc.message, datetime.now(UTC))
    patch = status_merge_patch(written, status)
    if patch:
        await api.patch_status(MODELSERVINGS, ns, name, patch)
    await api.post_event(body, CREATE_FAILED, status.message, "Warning")
    raise Reported(f"applying {what} was refused: {exc}")


async def reconcile(
    api: ApiClient, namespace: str, name: str, uid: str | None, memo: kopf.Memo, logger: kopf.Logger
) -> float | None:
    """One level-based pass over ModelServing ``namespace/name``; seconds until the next, or None."""

    async def step(body: dict[str, Any], ms: Any, now: datetime) -> float | None:
        assert isinstance(ms, ModelServing)
        return await _reconcile_serving(api, body, ms, now, memo, logger)

    return await reconcile_live(
        KIND,
        api,
        MODELSERVINGS,
        namespace=namespace,
        name=name,
        uid=uid,
        logger=logger,
        step=step,
        condition=ConditionType.READY,
        phase="Failed",
    )


async def _reconcile_serving(
    api: ApiClient,
    body: dict[str, Any],
    ms: ModelServing,
    now: datetime,
    memo: kopf.Memo,
    logger: kopf.Logger,
) -> float | None:
    """Observe, analyse, plan and apply for the valid, live ``ms``."""
    namespace = ms.metadata.namespace
    ftj = ms.spec.model.from_training_job
    sources = _state(memo).sources
    for key in [k for k, uids in sources.items() if ms.metadata.uid in uids]:
        sources[key].discard(ms.metadata.uid)
    if ftj is not None:
        sources.setdefault((namespace, ftj.name), set()).add(ms.metadata.uid)
    for a in ms.spec.adapters:  # a new snapshot of an adapter's TrainingJob wakes this one too
        if a.from_training_job is not None:
            sources.setdefault((namespace, a.from_training_job.name), set()).add(ms.metadata.uid)
    gateway = await gateway_api_available(api, memo)
    keda = await keda_available(api, memo)
    pools = await inference_pools_available(api, memo)
    lws = await leader_worker_sets_available(api, memo)
    pickers = operator_config(memo).endpoint_pickers
    _state(memo).group_owners[(namespace, label_value(ms.metadata.name))] = ms.metadata.uid or ""
    # Without the grants of routing.endpointPickers the operator may not even list pickers' Roles.
    observed = await _observe(api, ms, gateway, keda, pools and pickers, memo, lws)
    analysis = await _analyse(api, ms, now, memo, logger)
    plan = plan_modelserving(
        ms,
        observed,
        now,
        gateway_api=gateway,
        analysis=analysis,
        operator_namespace=operator_config(memo).operator_namespace,
        keda=keda,
        prometheus=operator_config(memo).prometheus_url,
        inference_api=pools,
        epp_image=operator_config(memo).epp_image,
        endpoint_pickers=pickers,
        lws=lws,
        levels=operator_config(memo).topology_levels,
    )
    if not (gateway and keda and pools and lws):
        # An optional API the cluster lacks (a spec refused for it, or run without it) is looked
        # for again once its answer expires: installing it takes effect within the TTL, not at the
        # next resync. (With the default TTL, the resync's minute: no extra passes.)
        plan.requeue(operator_config(memo).discovery_ttl_s)
    await _apply(api, ms, body, plan, observed, logger)
    await _lend_and_return(api, ms, plan, observed, logger)
    live = {r.name for r in plan.status.revisions}
    workloads = [d for d in observed.deployments if dig(d, "metadata", "name") in live]
    groups = await run_groups(api, ms, plan, workloads, observed.group_pods, memo, logger)
    _state(memo).group_waiting[ms.metadata.uid or ms.metadata.name] = {
        a.revision: a.waiting for a in groups if a.waiting}
    for actions in groups:
        for group, why in actions.restarted:
            message = f"group {group} restarted as a unit: {why}"
            await api.post_event(body, "GroupRestarted", message, "Warning")
        if actions.waiting or actions.create or actions.delete:
            plan.requeue(WAIT_READY_S)
    await _apply_adapters(api, ms, body, plan, memo, logger)
    _record_metrics(memo, ms, plan)
    # A step that started in this pass gets its baseline now, so its window is the whole pause.
    after = ms.model_copy(update={"status": plan.status})
    if analysis_due(after, now) is not None:
        await _analyse(api, after, now, memo, logger)
    return plan.requeue_after


# -- handlers ------------------------------------------------------------------------------------


@kopf.daemon(GROUP, VERSION, "modelservings", id="reconcile", cancellation_timeout=5.0)
async def modelserving_loop(
    name: str,
    namespace: str | None,
    uid: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    """The reconcile loop of one ModelServing (see the module docstring)."""
    assert namespace is not None  # ModelServing is namespaced
    try:
        await reconcile_loop(
            KIND,
            reconcile,
            name=name,
            namespace=namespace,
            uid=uid,
            memo=memo,
            logger=logger,
            stopped=stopped,
            condition=ConditionType.READY,
        )
    finally:
        _state(memo).baselines.forget(uid)


@kopf.on.event(GROUP, VERSION, "modelservings", id="wake-on-change")
def modelserving_changed(
    type: str | None, name: str, namespace: str | None, uid: str, memo: kopf.Memo, **_: Any
) -> None:
    """A ModelServing changed (spec, ``kubectl scale``): reconcile it now; forget a deleted one."""
    if type == "DELETED":
        state, ns = _state(memo), namespace or ""
        state.phases.forget(ns, name)
        state.group_waiting.pop(uid, None)
        state.group_owners.pop((ns, label_value(name)), None)
        for rev in state.weights.pop((ns, name), set()):
            with contextlib.suppress(KeyError):
                REVISION_WEIGHT.remove(ns, name, rev)
        return
    wake(memo, uid)


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_SERVING: kopf.PRESENT}, id="wake-serving")
def revision_deployment_changed(body: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """A revision Deployment changed (readiness, progress deadline): reconcile its ModelServing."""
    owner = owner_of(body, KIND)
    if owner is not None:
        wake(memo, owner[1])


@kopf.on.event("", "v1", "pods", labels={LABEL_GROUP_OF: kopf.PRESENT}, id="wake-serving-group")
def group_pod_changed(namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    """A pod of a Capstan-managed group changed (ready, failed, restarted, gone): reconcile its
    ModelServing now, so a broken group restarts as a unit at once."""
    uid = _state(memo).group_owners.get((namespace or "", labels.get(LABEL_GROUP_OF, "")))
    if uid:
        wake(memo, uid)


@kopf.on.event(GROUP, VERSION, "trainingjobs", id="wake-serving")
def source_trainingjob_changed(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A TrainingJob changed (maybe a new ready snapshot): reconcile the ModelServings serving it."""
    for uid in list(_state(memo).sources.get((namespace or "", name), ())):
        wake(memo, uid)


__all__ = [
    "HTTPROUTES",
    "INFERENCEPOOLS",
    "SCALEDOBJECTS",
    "ServingState",
    "gateway_api_available",
    "inference_pools_available",
    "keda_available",
    "reconcile",
    "served",
    "status_merge_patch",
]
