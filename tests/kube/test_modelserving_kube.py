"""The real operator against an emulated API server: ModelServing create, canary steps, rollback.

The test plays the Deployment controller and the kubelet (it sets Deployment readiness and creates
the canary's pods), and serves the canary's ``/metrics`` from a local aiohttp server on 127.0.0.1:
the pods it creates carry ``podIP: 127.0.0.1`` and that server's port as their ``http`` port, so
the operator's analysis fetcher scrapes it exactly as it would scrape a pod.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from tests.api.bodies import make_modelserving
from tests.support.kube import emulated_cluster, running_operator, wait_for
from tests.support.kube import test_client as api_client

from capstan.kube.client import USER_AGENT, ApiClient
from capstan.kube.resources import DEPLOYMENTS, EVENTS, HPAS, MODELSERVINGS, PODS, SERVICES
from capstan.labels import LABEL_REVISION, LABEL_SERVING

pytestmark = pytest.mark.timeout(120)
NS = "default"


class MetricsStub:
    """Prometheus text of a canary whose counters grow by ``per_scrape`` requests each scrape."""

    def __init__(self, per_scrape: int = 100, errors: int = 0) -> None:
        self.per_scrape, self.errors = per_scrape, errors
        self.total = self.bad = 0

    def render(self) -> str:
        self.total += self.per_scrape
        self.bad += self.errors
        n, bad = self.total, self.bad
        return (
            "# TYPE capstan_serving_requests counter\n"
            f'capstan_serving_requests_total{{code="200"}} {n - bad}\n'
            f'capstan_serving_requests_total{{code="500"}} {bad}\n'
            "# TYPE capstan_serving_request_latency_seconds histogram\n"
            f'capstan_serving_request_latency_seconds_bucket{{le="0.1"}} {n - bad}\n'
            f'capstan_serving_request_latency_seconds_bucket{{le="+Inf"}} {n - bad}\n'
            f"capstan_serving_request_latency_seconds_count {n - bad}\n"
            f"capstan_serving_request_latency_seconds_sum {0.05 * (n - bad)}\n"
        )

    async def handle(self, _: web.Request) -> web.Response:
        return web.Response(text=self.render(), content_type="text/plain")


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Any, ApiClient]]:
    async with emulated_cluster() as (emulator, url), running_operator(url), api_client(url) as api:
        yield emulator, api


@pytest.fixture
async def stub() -> AsyncIterator[tuple[MetricsStub, int]]:
    metrics = MetricsStub()
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield metrics, port
    finally:
        await runner.cleanup()


def serving(name: str = "gpt", **spec: Any) -> dict[str, Any]:
    return make_modelserving(name).namespace(NS).pvc("models").spec(gpu=False, **spec).obj()


async def status(api: ApiClient, name: str = "gpt") -> dict[str, Any]:
    obj = await api.get(MODELSERVINGS, NS, name)
    return (obj or {}).get("status") or {}


async def deployments(api: ApiClient) -> dict[str, dict[str, Any]]:
    deps = await api.list_objects(DEPLOYMENTS, NS, {LABEL_SERVING: "gpt"})
    return {d["metadata"]["name"]: d for d in deps}


async def make_ready(api: ApiClient, name: str) -> None:
    """Play the Deployment controller: every wanted replica is ready."""
    dep = await api.get(DEPLOYMENTS, NS, name)
    assert dep is not None
    n = dep["spec"].get("replicas", 1)
    await api.patch_status(DEPLOYMENTS, NS, name, {"replicas": n, "readyReplicas": n, "availableReplicas": n})


async def canary_pod(api: ApiClient, revision: str, port: int) -> None:
    """Play the kubelet: one ready canary pod at 127.0.0.1:<port>."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{revision}-pod",
            "namespace": NS,
            "labels": {LABEL_SERVING: "gpt", LABEL_REVISION: revision},
        },
        "spec": {
            "containers": [
                {"name": "server", "image": "x", "ports": [{"name": "http", "containerPort": port}]}
            ]
        },
    }
    await api.create(pod)
    await api.patch_status(
        PODS,
        NS,
        pod["metadata"]["name"],
        {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    )


async def wait_status(api: ApiClient, check: Any, what: str, timeout: float = 30) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        st = await status(api)
        return st if check(st) else None

    return await wait_for(probe, timeout=timeout, what=what)


async def test_create_makes_deployment_services_hpa(cluster: tuple[Any, ApiClient]) -> None:
    _, api = cluster
    await api.create(serving(autoscaling={"minReplicas": 2, "maxReplicas": 6, "target": 8}))
    deps = await wait_for(lambda: deployments(api), what="a revision Deployment")
    (rev,) = deps
    assert rev.startswith("gpt-")
    svcs = {s["metadata"]["name"] for s in await api.list_objects(SERVICES, NS, {LABEL_SERVING: "gpt"})}
    assert svcs == {"gpt", rev}
    hpa = await api.get(HPAS, NS, rev)
    assert hpa is not None and hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 6
    await api.patch_status(DEPLOYMENTS, NS, rev, {"replicas": 2, "readyReplicas": 2})
    st = await wait_status(api, lambda s: s.get("phase") == "Ready", "Ready")
    assert st["url"] == "http://gpt.default.svc"
    assert st["stableRevision"] == rev and st["replicas"] == 2
    assert st["selector"] == f"{LABEL_SERVING}=gpt"


async def test_canary_steps_then_rollback_on_failing_analysis(
    cluster: tuple[Any, ApiClient], stub: tuple[MetricsStub, int]
) -> None:
    _, api = cluster
    metrics, port = stub
    rollout = {
        # Step 2's pause leaves the test time to turn the errors on before its verdict (step start
        # times have one-second resolution, so a 1s pause can end almost at once).
        "steps": [{"weight": 25, "pause": "1s"}, {"weight": 50, "pause": "4s"}],
        "analysis": {"maxErrorRate": 0.05, "minRequests": 50},
    }
    body = serving(replicas=4, port=port, rollout=rollout)
    await api.create(body)
    (stable,) = await wait_for(lambda: deployments(api), what="stable Deployment")
    await make_ready(api, stable)
    await wait_status(api, lambda s: s.get("phase") == "Ready", "stable Ready")

    # Spec change → canary; healthy metrics pass step 1.
    obj = await api.get(MODELSERVINGS, NS, "gpt")
    assert obj is not None
    new = copy.deepcopy(obj["spec"])
    new["env"] = [{"name": "VERSION", "value": "2"}]
    await api.patch(MODELSERVINGS, NS, "gpt", {"spec": new})
    deps = await wait_for(lambda: _two(api), what="canary Deployment")
    (canary,) = set(deps) - {stable}
    assert deps[canary]["spec"]["replicas"] == 1  # ceil(4 x 25%)
    await make_ready(api, canary)
    await canary_pod(api, canary, port)
    st = await wait_status(api, lambda s: _weights(s) == {stable: 75, canary: 25}, "step 1 at 25%")
    assert st["canaryRevision"] == canary and st["phase"] == "Progressing"

    # Step 2 scales the canary up first, then shifts traffic; now the canary starts failing.
    await wait_for(lambda: _replicas(api, canary, 2), what="canary scaled to 2")
    metrics.errors = 10
    await make_ready(api, canary)
    st = await wait_status(api, lambda s: s.get("canaryRevision") is None, "rollback", timeout=40)
    assert st["stableRevision"] == stable
    assert canary in st["failedRevisions"]
    rolled = next(c for c in st["conditions"] if c["type"] == "RolledBack")
    assert rolled["status"] == "True"
    assert "error rate 10.0% > 5.0% over" in rolled["message"]
    assert rolled["message"].endswith("requests at step 2 (weight 50%)")
    await wait_for(lambda: _gone(api, canary), what="canary Deployment deleted")
    assert _weights(await status(api)) == {stable: 100}


async def _two(api: ApiClient) -> dict[str, dict[str, Any]] | None:
    deps = await deployments(api)
    return deps if len(deps) == 2 else None


async def _replicas(api: ApiClient, name: str, n: int) -> bool:
    dep = await api.get(DEPLOYMENTS, NS, name)
    return dep is not None and dep["spec"].get("replicas") == n


async def _gone(api: ApiClient, name: str) -> bool:
    return await api.get(DEPLOYMENTS, NS, name) is None


def _weights(st: dict[str, Any]) -> dict[str, int]:
    return {r["name"]: r.get("weight", 0) for r in st.get("revisions") or []}


async def test_every_canary_step_holds_its_weight_before_promotion(cluster: tuple[Any, ApiClient]) -> None:
    """25% → 50% → promoted: step 2 gets its own start time and pause (not step 1's)."""
    _, api = cluster
    rollout = {"steps": [{"weight": 25, "pause": "2s"}, {"weight": 50, "pause": "2s"}]}
    await api.create(serving(replicas=4, rollout=rollout))
    (stable,) = await wait_for(lambda: deployments(api), what="stable Deployment")
    await make_ready(api, stable)
    await wait_status(api, lambda s: s.get("phase") == "Ready", "stable Ready")

    await api.patch(MODELSERVINGS, NS, "gpt", {"spec": {"env": [{"name": "VERSION", "value": "2"}]}})
    deps = await wait_for(lambda: _two(api), what="canary Deployment")
    (canary,) = set(deps) - {stable}

    seen: list[int] = []  # the canary's weight each time it changed, until promotion

    async def promoted() -> bool:
        await make_ready(api, canary)  # play the Deployment controller for each scale-up
        st = await status(api)
        weight = _weights(st).get(canary)
        if st.get("canaryRevision") == canary and weight and (not seen or seen[-1] != weight):
            seen.append(weight)
        return st.get("stableRevision") == canary

    await wait_for(promoted, timeout=40, what="promotion")
    assert seen == [25, 50]

    async def events() -> list[dict[str, Any]] | None:  # posted just after the status write
        evs = [e for e in await api.list_objects(EVENTS, NS) if e["involvedObject"]["name"] == "gpt"]
        return evs if any(e["reason"] == "Promoted" for e in evs) else None

    posted = await wait_for(events, what="Promoted event")
    steps = sorted(e["message"] for e in posted if e["reason"] == "CanaryStep")
    assert [m.split(":")[0] for m in steps] == ["step 1/2 (25%)", "step 2/2 (50%)"]


async def test_refused_deployment_shows_in_status(cluster: tuple[Any, ApiClient]) -> None:
    emulator, api = cluster
    message = 'Deployment.apps "gpt-x" is invalid: spec.template.spec.containers[0].image: Invalid value'

    def deployment_writes(req: Any) -> bool:
        return (
            req.headers.get("User-Agent", "").startswith(USER_AGENT)
            and req.resource is not None
            and req.resource.plural == "deployments"
            and str(req.method.value).upper() in ("PATCH", "POST")
        )

    emulator.refuse(deployment_writes, 422, "Invalid", message)
    await api.create(serving())
    st = await wait_status(
        api, lambda s: _condition(s, "Progressing").get("reason") == "CreateFailed", "refusal in status"
    )
    progressing = _condition(st, "Progressing")
    assert progressing["status"] == "False" and message in progressing["message"]
    assert st["message"].startswith("the API server refused Deployment gpt-") and message in st["message"]
    assert await deployments(api) == {}

    async def refusal_events() -> list[dict[str, Any]]:
        events = await api.list_objects(EVENTS, NS)
        return [e for e in events if e["reason"] == "CreateFailed" and e["involvedObject"]["name"] == "gpt"]

    # kopf posts Events from a queue of its own, so the Event may follow the status patch.
    await wait_for(refusal_events, what="a CreateFailed Event on the ModelServing")

    emulator.clear_faults()  # the server accepts it now: the revision is created, the refusal cleared
    (rev,) = await wait_for(lambda: deployments(api), what="the revision Deployment")
    await make_ready(api, rev)
    st = await wait_status(api, lambda s: s.get("phase") == "Ready", "Ready")
    assert _condition(st, "Progressing").get("reason") != "CreateFailed"


def _condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


async def test_template_secret_env_reaches_the_deployment(cluster: tuple[Any, ApiClient]) -> None:
    _, api = cluster
    secret_env = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    await api.create(serving(template={"spec": {
        "imagePullSecrets": [{"name": "regcred"}],
        "containers": [{"name": "server", "env": [secret_env]}]}}))
    deps = await wait_for(lambda: deployments(api), what="a revision Deployment")
    (dep,) = deps.values()
    pod = dep["spec"]["template"]["spec"]
    assert secret_env in pod["containers"][0]["env"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


async def test_keda_served_gives_a_scaled_object_instead_of_an_hpa(cluster: tuple[Any, ApiClient]) -> None:
    from tests.support.kube import declare_resource

    from capstan.kube.modelserving import SCALEDOBJECTS

    emulator, api = cluster
    declare_resource(emulator, "keda.sh/v1alpha1/scaledobjects", "ScaledObject", True, {"status"})
    await api.create(serving(runtime="vllm", autoscaling={
        "minReplicas": 0, "maxReplicas": 3, "metric": "queue", "target": 4,
        "activationQuery": 'sum(gateway_pending{service="gpt"})'}))
    deps = await wait_for(lambda: deployments(api), what="a revision Deployment")
    (rev,) = deps

    async def scaled_object() -> dict[str, Any] | None:
        return await api.get(SCALEDOBJECTS, NS, rev)

    so = await wait_for(scaled_object, what="a ScaledObject")
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["maxReplicaCount"] == 3
    assert [t["name"] for t in so["spec"]["triggers"]] == ["load", "activation"]
    assert await api.get(HPAS, NS, rev) is None


async def test_scale_to_zero_refused_without_keda_runs_once_keda_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """minReplicas 0 where the cluster serves no KEDA: Failed, naming KEDA. KEDA installed afterwards
    (as the message says): the same spec runs within the operator's discovery TTL, with no edit and
    no wait for the minute's resync (the refused pass asks to be run again after the TTL)."""
    from tests.support.kube import declare_resource

    from capstan.config import DISCOVERY_TTL_ENV
    from capstan.kube.modelserving import SCALEDOBJECTS

    monkeypatch.setenv(DISCOVERY_TTL_ENV, "1")
    async with emulated_cluster() as (emulator, url), running_operator(url), api_client(url) as api:
        await api.create(serving(runtime="vllm", autoscaling={
            "minReplicas": 0, "maxReplicas": 3, "metric": "queue", "target": 4,
            "activationQuery": 'sum(gateway_pending{service="gpt"})'}))
        st = await wait_status(api, lambda s: s.get("phase") == "Failed", "Failed without KEDA")
        assert "needs KEDA" in st["message"] and await deployments(api) == {}
        declare_resource(emulator, "keda.sh/v1alpha1/scaledobjects", "ScaledObject", True, {"status"})
        (rev,) = await wait_for(lambda: deployments(api), timeout=10, what="the revision with KEDA")
        so = await wait_for(lambda: api.get(SCALEDOBJECTS, NS, rev), what="a ScaledObject")
        assert so["spec"]["minReplicaCount"] == 0
