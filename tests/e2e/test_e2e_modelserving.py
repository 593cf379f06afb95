"""ModelServing on the real control plane: the Deployment and ReplicaSet controllers make the pods,
kube-scheduler binds them to fake GPU nodes, kwok runs them; Gateway API's HTTPRoute (installed by
``make cluster``) carries the canary weights.

The canary's analysis scrapes its pod's ``/metrics`` at the pod IP. kwok's pod IPs lead nowhere, so
the test plays the network plugin for the canary pod: it sets the pod's IP to 127.0.0.1, where a
stub serves the pod's metrics on the ``http`` container port (spec.port).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from tests.api.bodies import make_modelserving
from tests.e2e.conftest import DISCOVERY_TTL_S
from tests.kube import scenarios as sc
from tests.kube.test_modelserving_kube import MetricsStub
from tests.support.kube import wait_for

from capstan.kube.client import ApiClient
from capstan.kube.resources import DEPLOYMENTS, MODELSERVINGS, PODS, ApiResource
from capstan.labels import LABEL_REVISION, LABEL_SERVING

pytestmark = pytest.mark.e2e

REPLICASETS = ApiResource("apps", "v1", "replicasets", "ReplicaSet")
HTTPROUTES = ApiResource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
NAME = "llm"


@pytest.fixture
async def canary_metrics() -> AsyncIterator[tuple[MetricsStub, int]]:
    """A canary whose requests fail half the time, served on a free port of 127.0.0.1."""
    async with _metrics_server(MetricsStub(per_scrape=100, errors=50)) as served:
        yield served


@pytest.fixture
async def healthy_metrics() -> AsyncIterator[tuple[MetricsStub, int]]:
    """A canary whose requests all succeed, served on a free port of 127.0.0.1."""
    async with _metrics_server(MetricsStub(per_scrape=100, errors=0)) as served:
        yield served


@contextlib.asynccontextmanager
async def _metrics_server(metrics: MetricsStub) -> AsyncIterator[tuple[MetricsStub, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield metrics, port
    finally:
        await runner.cleanup()


async def revisions(env: sc.Env) -> dict[str, dict[str, Any]]:
    """Revision Deployments by name."""
    deps = await env.api.list_objects(DEPLOYMENTS, env.namespace, {LABEL_SERVING: NAME})
    return {d["metadata"]["name"]: d for d in deps if not d["metadata"].get("deletionTimestamp")}


async def serving_status(env: sc.Env) -> dict[str, Any]:
    obj = await env.api.get(MODELSERVINGS, env.namespace, NAME)
    return (obj or {}).get("status") or {}


async def wait_status(env: sc.Env, check: Any, what: str, timeout: float = sc.TIMEOUT) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        st = await serving_status(env)
        return st if check(st) else None

    return await wait_for(probe, timeout, what=what)


def weights(st: dict[str, Any]) -> dict[str, int]:
    return {r["name"]: r.get("weight", 0) for r in st.get("revisions") or []}


async def route_weights(env: sc.Env) -> dict[str, int]:
    route = await env.api.get(HTTPROUTES, env.namespace, NAME)
    (rule,) = (route or {"spec": {"rules": [{"backendRefs": []}]}})["spec"]["rules"]
    return {b["name"]: b["weight"] for b in rule["backendRefs"]}


async def running_pods(env: sc.Env, revision: str, count: int) -> list[dict[str, Any]]:
    """The revision's ``count`` pods once they run (made by its ReplicaSet, bound, started by kwok)."""

    async def probe() -> tuple[list[dict[str, Any]]] | None:
        pods = await env.api.list_pods(env.namespace, {LABEL_REVISION: revision})
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        up = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
        return (live,) if len(live) == count == len(up) else None

    (pods,) = await wait_for(probe, sc.TIMEOUT, what=f"{count} running pods of {revision}")
    return pods


async def assert_made_by_controllers(api: ApiClient, namespace: str, revision: str,
                                     pods: list[dict[str, Any]]) -> None:
    """Deployment → ReplicaSet → Pods, each owned by the one before: the real controllers' work."""
    (rs,) = [r for r in await api.list_objects(REPLICASETS, namespace, {LABEL_REVISION: revision})]
    assert [(o["kind"], o["name"]) for o in rs["metadata"]["ownerReferences"]] == [("Deployment", revision)]
    for pod in pods:
        refs = pod["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"]) for o in refs] == [("ReplicaSet", rs["metadata"]["name"])]
        assert pod["spec"]["nodeName"]  # bound by kube-scheduler


async def create_serving(api: ApiClient, ns: str, port: int, steps: list[dict[str, Any]]) -> None:
    """A 2-replica ModelServing whose canary analysis scrapes ``port``."""
    await api.create(
        make_modelserving(NAME)
        .namespace(ns)
        .uri("hf://org/model")
        .replicas(2)
        .spec(
            tensorParallel=1,
            port=port,
            rollout={"steps": steps, "analysis": {"maxErrorRate": 0.05, "minRequests": 10}},
        )
        .obj()
    )


async def start_canary(env: sc.Env, api: ApiClient, stable: str) -> str:
    """Change the spec; the canary revision's pod runs and answers its analysis at 127.0.0.1."""
    obj = await api.get(MODELSERVINGS, env.namespace, NAME)
    assert obj is not None
    spec = copy.deepcopy(obj["spec"])
    spec["env"] = [{"name": "VERSION", "value": "2"}]
    await api.patch(MODELSERVINGS, env.namespace, NAME, {"spec": spec})
    revs = await wait_for(lambda: _two(env), sc.TIMEOUT, what="a canary Deployment")
    (canary,) = set(revs) - {stable}
    (canary_pod,) = await running_pods(env, canary, 1)  # ceil(2 x 25%) = ceil(2 x 50%) = 1
    await assert_made_by_controllers(api, env.namespace, canary, [canary_pod])
    await api.patch_status(PODS, env.namespace, canary_pod["metadata"]["name"],
                           {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]})
    return canary


async def test_every_canary_step_holds_its_weight_on_the_real_server(
    env: sc.Env, api: ApiClient, healthy_metrics: tuple[MetricsStub, int]
) -> None:
    """Regression: a passed step's ``stepStartedAt`` must be removed from the status (a merge
    patch that leaves it out keeps it), or step 2 counts its pause from step 1 and is skipped."""
    _, port = healthy_metrics
    steps = [{"weight": 25, "pause": "4s"}, {"weight": 50, "pause": "6s"}]
    await create_serving(api, env.namespace, port, steps)
    (stable,) = await wait_for(lambda: revisions(env), sc.TIMEOUT, what="the stable Deployment")
    await wait_status(env, lambda s: s.get("phase") == "Ready", "Ready")
    canary = await start_canary(env, api, stable)
    await wait_status(env, lambda s: weights(s) == {stable: 75, canary: 25}, "step 1 at 25%")
    assert await wait_for(lambda: _route_is(env, {stable: 75, canary: 25}), sc.TIMEOUT, what="route 75/25")
    st = await wait_status(env, lambda s: weights(s) == {stable: 50, canary: 50}, "step 2 at 50%")
    assert st["canaryRevision"] == canary and st["phase"] == "Progressing"
    assert await wait_for(lambda: _route_is(env, {stable: 50, canary: 50}), sc.TIMEOUT, what="route 50/50")
    held_from = time.monotonic()
    st = await wait_status(env, lambda s: s.get("stableRevision") == canary, "promotion")
    assert time.monotonic() - held_from >= 3.0  # step 2 held its own 6 s pause
    assert await wait_for(lambda: _route_is(env, {canary: 100}), sc.TIMEOUT, what="route to the new stable")
    events = [e for e in await env.api.list_objects(sc.EVENTS, env.namespace)
              if (e.get("involvedObject") or {}).get("name") == NAME]
    steps_started = sorted(e["message"].split(":")[0] for e in events if e.get("reason") == "CanaryStep")
    assert steps_started == ["step 1/2 (25%)", "step 2/2 (50%)"]
    reasons = {e.get("reason") for e in events}
    assert "Promoted" in reasons and "RolledBack" not in reasons


async def test_canary_step_with_httproute_weights_then_rollback(
    env: sc.Env, api: ApiClient, canary_metrics: tuple[MetricsStub, int]
) -> None:
    metrics, port = canary_metrics
    ns = env.namespace
    await create_serving(api, ns, port, [{"weight": 50, "pause": "3s"}])
    (stable,) = await wait_for(lambda: revisions(env), sc.TIMEOUT, what="the stable Deployment")
    pods = await running_pods(env, stable, 2)
    await assert_made_by_controllers(api, ns, stable, pods)
    assert all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1" for p in pods)
    st = await wait_status(env, lambda s: s.get("phase") == "Ready", "Ready")
    assert st["stableRevision"] == stable and st["replicas"] == 2
    assert st["rollout"]["traffic"] == "gateway"
    assert await wait_for(lambda: _route_is(env, {stable: 100}), sc.TIMEOUT, what="route to stable")

    # A spec change makes a canary revision: one step at 50%, on HTTPRoute weights.
    canary = await start_canary(env, api, stable)
    st = await wait_status(env, lambda s: weights(s) == {stable: 50, canary: 50}, "step 1 at 50%")
    assert st["canaryRevision"] == canary and st["phase"] == "Progressing"
    assert await wait_for(lambda: _route_is(env, {stable: 50, canary: 50}), sc.TIMEOUT, what="route 50/50")

    # Half its requests fail: the step's analysis rolls it back.
    st = await wait_status(env, lambda s: s.get("canaryRevision") is None and s.get("failedRevisions"),
                           "rollback")
    assert metrics.total > 0  # the operator scraped the stub at the pod's IP
    assert st["stableRevision"] == stable and st["failedRevisions"] == [canary]
    rolled = next(c for c in st["conditions"] if c["type"] == "RolledBack")
    assert rolled["status"] == "True" and "error rate 50.0% > 5.0%" in rolled["message"]
    assert await wait_for(lambda: _route_is(env, {stable: 100}), sc.TIMEOUT, what="route back to stable")

    async def canary_gone() -> bool:
        left = [*await api.list_objects(REPLICASETS, ns, {LABEL_REVISION: canary}),
                *await api.list_pods(ns, {LABEL_REVISION: canary})]
        return canary not in await revisions(env) and not left

    await wait_for(canary_gone, sc.TIMEOUT, what="the canary's Deployment, ReplicaSet and pod gone")
    assert "RolledBack" in await sc.event_reasons(env, NAME)


async def _route_is(env: sc.Env, wanted: dict[str, int]) -> bool:
    return await route_weights(env) == wanted


async def _two(env: sc.Env) -> dict[str, dict[str, Any]] | None:
    revs = await revisions(env)
    return revs if len(revs) == 2 else None


#: KEDA's ScaledObject CRD, from the Go module cache (go mod download through the Go proxy).
KEDA_MODULE = "github.com/kedacore/keda/v2@v2.17.2"
KEDA_CRD = "config/crd/bases/keda.sh_scaledobjects.yaml"


def keda_crd() -> str:
    """The pinned ScaledObject CRD's YAML (skips the test when go cannot fetch the module)."""
    import json
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not on PATH: it fetches KEDA's CRD from the Go module cache")
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([go, "mod", "download", "-json", KEDA_MODULE], cwd=tmp, capture_output=True,
                             text=True, timeout=300)
    info = json.loads(res.stdout or "{}")
    assert res.returncode == 0 and "Dir" in info, f"go mod download {KEDA_MODULE}: {res.stderr}{info}"
    return (Path(info["Dir"]) / KEDA_CRD).read_text()


async def test_template_secret_env_and_keda_scaled_object_on_the_real_server(
    env: sc.Env, api: ApiClient, cluster: Any
) -> None:
    """spec.template (a Secret env, a sidecar, a pull secret) gives a Deployment the API server
    accepts; with KEDA's ScaledObject CRD installed, the operator creates a ScaledObject the API
    server accepts (its schema is KEDA's own) instead of an HPA."""
    from capstan.kube.modelserving import SCALEDOBJECTS

    crd = keda_crd()
    cluster.kubectl("apply", "--server-side", "-f", "-", stdin=crd)
    cluster.kubectl("wait", "--for=condition=Established", "crd/scaledobjects.keda.sh", "--timeout=60s")
    secret_env = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    try:
        await api.create({
            "apiVersion": "capstan.dev/v1alpha1",
            "kind": "ModelServing",
            "metadata": {"name": NAME, "namespace": env.namespace},
            "spec": {
                "model": {"uri": "hf://org/model"},
                "runtime": "vllm",
                "gpu": False,
                "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "metric": "queue", "target": 4,
                                "activationQuery": 'sum(gateway_pending{service="llm"})'},
                "template": {"spec": {
                    "imagePullSecrets": [{"name": "regcred"}],
                    "containers": [
                        {"name": "server", "env": [secret_env]},
                        {"name": "proxy", "image": "envoyproxy/envoy:v1.31.0"},
                    ]}},
            },
        })
        # The operator may hold a "no KEDA" discovery answer from before the CRD for up to its TTL
        # (the spec is refused meanwhile, and passed again once the TTL is over).
        (rev,) = await wait_for(lambda: revisions(env), DISCOVERY_TTL_S + sc.TIMEOUT,
                                what="the revision Deployment")
        dep = await api.get(DEPLOYMENTS, env.namespace, rev)
        assert dep is not None
        pod = dep["spec"]["template"]["spec"]
        assert secret_env in pod["containers"][0]["env"]
        assert [c["name"] for c in pod["containers"]] == ["server", "proxy"]
        assert secret_env in pod["initContainers"][0]["env"]  # the model download gets the token too

        async def scaled_object() -> dict[str, Any] | None:
            return await api.get(SCALEDOBJECTS, env.namespace, rev)

        so = await wait_for(scaled_object, sc.TIMEOUT, what="a ScaledObject")
        assert so["spec"]["minReplicaCount"] == 0
        assert [t["name"] for t in so["spec"]["triggers"]] == ["load", "activation"]
    finally:
        with contextlib.suppress(Exception):
            await api.delete(MODELSERVINGS, env.namespace, NAME)
        cluster.kubectl("delete", "crd", "scaledobjects.keda.sh", "--wait=true")
        # The operator trusts its discovery answer this long: later tests must see no KEDA.
        await asyncio.sleep(DISCOVERY_TTL_S)


#: The Gateway API Inference Extension's v1 InferencePool CRD (v1.5.0), kept as a test fixture.
INFERENCEPOOL_CRD = "tests/fixtures/upstream/inference.networking.k8s.io_inferencepools.yaml"


async def test_inference_pool_and_endpoint_picker_on_the_real_server(
    env: sc.Env, api: ApiClient, cluster: Any
) -> None:
    """With the InferencePool CRD installed, a vLLM ModelServing behind a Gateway gets a pool (its
    schema and CEL are upstream's), an endpoint picker whose Role the operator may grant (it holds
    every permission the Role gives: RBAC refuses escalation), and an HTTPRoute to the pool."""
    from pathlib import Path

    from capstan.kube.modelserving import (
        INFERENCEPOOLS,
        ROLEBINDINGS,
        ROLES,
        SERVICEACCOUNTS,
    )
    from capstan.kube.resources import SERVICES

    root = Path(__file__).parents[2]
    cluster.kubectl("apply", "--server-side", "-f", str(root / INFERENCEPOOL_CRD))
    cluster.kubectl("wait", "--for=condition=Established",
                    "crd/inferencepools.inference.networking.k8s.io", "--timeout=60s")
    try:
        await api.create(
            make_modelserving(NAME).namespace(env.namespace).uri("hf://org/model")
            .spec(runtime="vllm", gpu=False, routing={"gateway": {"name": "inference-gw"}}).obj()
        )
        st = await wait_status(env, lambda s: s.get("stableRevision"), "a stable revision")
        rev = st["stableRevision"]
        epp = f"{rev}-epp"

        async def pool() -> dict[str, Any] | None:
            return await api.get(INFERENCEPOOLS, env.namespace, rev)

        # The operator may hold a "no InferencePool" discovery answer from before the CRD for its TTL.
        p = await wait_for(pool, DISCOVERY_TTL_S + sc.TIMEOUT, what="an InferencePool")
        assert p["spec"]["endpointPickerRef"] == {
            "group": "", "kind": "Service", "name": epp, "port": {"number": 9002}, "failureMode": "FailOpen"}
        for res in (SERVICEACCOUNTS, ROLES, ROLEBINDINGS, SERVICES, DEPLOYMENTS):
            await wait_for(lambda res=res: api.get(res, env.namespace, epp), sc.TIMEOUT,
                           what=f"the endpoint picker's {res.kind}")

        async def pool_route() -> dict[str, Any] | None:
            route = await api.get(HTTPROUTES, env.namespace, NAME)
            refs = (route or {}).get("spec", {}).get("rules", [{}])[0].get("backendRefs") or []
            return route if [b.get("kind") for b in refs] == ["InferencePool"] else None

        route = await wait_for(pool_route, sc.TIMEOUT, what="an HTTPRoute to the InferencePool")
        assert route["spec"]["parentRefs"][0]["kind"] == "Gateway"
        # The picker's pod runs (kwok) under its own ServiceAccount; it is not a server pod.
        picker_pods = await wait_for(
            lambda: api.list_pods(env.namespace, {"app.kubernetes.io/component": "endpoint-picker"}),
            sc.TIMEOUT, what="the endpoint picker's pod")
        assert all(LABEL_SERVING not in p["metadata"]["labels"] for p in picker_pods)
        assert picker_pods[0]["spec"]["serviceAccountName"] == epp
        def routed(s: dict[str, Any]) -> bool:
            return any(c["type"] == "InferenceRouting" for c in s.get("conditions") or [])

        st = await wait_status(env, routed, "the InferenceRouting condition")
        (cond,) = [c for c in st["conditions"] if c["type"] == "InferenceRouting"]
        assert (cond["status"], cond["reason"]) == ("True", "InferencePool")
    finally:
        with contextlib.suppress(Exception):
            await api.delete(MODELSERVINGS, env.namespace, NAME)
        # No other test names a gateway: a stale "InferencePool served" answer changes nothing for them.
        cluster.kubectl("delete", "crd", "inferencepools.inference.networking.k8s.io", "--wait=true")
