"""The real operator against an emulated API server that serves the Gateway API Inference Extension:
a vLLM ModelServing behind a Gateway gets an InferencePool, an endpoint picker (Deployment, Service,
ServiceAccount, Role, RoleBinding) and an HTTPRoute to the pool; turning the routing off removes
them and keeps the revision; without the extension's CRDs the HTTPRoute goes to the Services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.api.bodies import make_modelserving
from tests.support.kube import declare_resource, emulated_cluster, running_operator, wait_for
from tests.support.kube import test_client as api_client

from capstan.kube.client import ApiClient
from capstan.kube.modelserving import HTTPROUTES, INFERENCEPOOLS, ROLEBINDINGS, ROLES, SERVICEACCOUNTS
from capstan.kube.resources import DEPLOYMENTS, MODELSERVINGS, SERVICES
from capstan.labels import LABEL_SERVING

pytestmark = pytest.mark.timeout(120)
NS = "default"
GATEWAY = {"name": "inference-gw", "namespace": "gateways"}
PICKER_KINDS = (DEPLOYMENTS, SERVICES, SERVICEACCOUNTS, ROLES, ROLEBINDINGS)


def _declare(emulator: Any, inference: bool) -> None:
    declare_resource(emulator, "gateway.networking.k8s.io/v1/httproutes", "HTTPRoute", True, {"status"})
    declare_resource(emulator, "v1/serviceaccounts", "ServiceAccount", True, set())
    declare_resource(emulator, "rbac.authorization.k8s.io/v1/roles", "Role", True, set())
    declare_resource(emulator, "rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True, set())
    if inference:
        declare_resource(emulator, "inference.networking.k8s.io/v1/inferencepools", "InferencePool", True,
                         {"status"})


@pytest.fixture
async def cluster(request: pytest.FixtureRequest,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiClient]:
    # As the chart's routing.endpointPickers: true sets it (the operator reads it at start).
    monkeypatch.setenv("CAPSTAN_ENDPOINT_PICKERS", "on")
    async with emulated_cluster() as (emulator, url):
        _declare(emulator, inference=getattr(request, "param", True))
        async with running_operator(url), api_client(url) as api:
            yield api


def serving(**spec: Any) -> dict[str, Any]:
    return make_modelserving("gpt").namespace(NS).pvc("models").spec(gpu=False, **spec).obj()


async def revision(api: ApiClient) -> str:
    async def stable() -> str | None:
        obj = await api.get(MODELSERVINGS, NS, "gpt")
        return ((obj or {}).get("status") or {}).get("stableRevision")

    return await wait_for(stable, what="a stable revision")


async def route(api: ApiClient, check: Any, what: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        obj = await api.get(HTTPROUTES, NS, "gpt")
        return obj if obj is not None and check(obj) else None

    return await wait_for(probe, what=what)


def backend_kinds(obj: dict[str, Any]) -> set[str]:
    return {b["kind"] for b in obj["spec"]["rules"][0]["backendRefs"]}


async def test_pool_picker_and_route_are_created_and_removed_when_routing_is_disabled(
        cluster: ApiClient) -> None:
    api = cluster
    await api.create(serving(runtime="vllm", routing={"gateway": GATEWAY}))
    rev = await revision(api)
    epp = f"{rev}-epp"

    async def pool() -> dict[str, Any] | None:
        return await api.get(INFERENCEPOOLS, NS, rev)

    p = await wait_for(pool, what="an InferencePool")
    assert p["spec"]["endpointPickerRef"]["name"] == epp
    assert p["spec"]["selector"]["matchLabels"][LABEL_SERVING] == "gpt"
    for res in PICKER_KINDS:
        obj = await wait_for(lambda res=res: api.get(res, NS, epp), what=f"the picker's {res.kind}")
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "ModelServing"
    r = await route(api, lambda o: backend_kinds(o) == {"InferencePool"}, "an HTTPRoute to the pool")
    assert r["spec"]["parentRefs"][0]["kind"] == "Gateway"

    ms = await api.get(MODELSERVINGS, NS, "gpt")
    assert ms is not None
    (c,) = [c for c in ms["status"]["conditions"] if c["type"] == "InferenceRouting"]
    assert (c["status"], c["reason"]) == ("True", "InferencePool")
    # The picker's Deployment is no revision.
    assert [r_["name"] for r_ in ms["status"]["revisions"]] == [rev]

    await api.patch(MODELSERVINGS, NS, "gpt",
                    {"spec": {"routing": {"gateway": GATEWAY, "inferencePool": "Disabled"}}})

    async def cleaned() -> bool | None:
        left = [await api.get(INFERENCEPOOLS, NS, rev)]
        left += [await api.get(res, NS, epp) for res in PICKER_KINDS]
        return True if all(o is None for o in left) else None

    await wait_for(cleaned, what="the pool and its picker deleted")
    await route(api, lambda o: backend_kinds(o) == {"Service"}, "the HTTPRoute back on the Services")
    assert await api.get(DEPLOYMENTS, NS, rev) is not None  # the revision itself stays
    assert await revision(api) == rev


@pytest.mark.parametrize("cluster", [False], indirect=True)
async def test_without_the_extension_the_route_goes_to_the_services(cluster: ApiClient) -> None:
    api = cluster
    await api.create(serving(runtime="vllm", routing={"gateway": GATEWAY}))
    rev = await revision(api)
    r = await route(api, lambda o: backend_kinds(o) == {"Service"}, "an HTTPRoute to the Services")
    assert [p["kind"] for p in r["spec"]["parentRefs"]] == ["Service", "Gateway"]

    async def reason() -> str | None:
        ms = await api.get(MODELSERVINGS, NS, "gpt")
        conds = ((ms or {}).get("status") or {}).get("conditions") or []
        return next((c["reason"] for c in conds if c["type"] == "InferenceRouting"), None)

    assert await wait_for(reason, what="the InferenceRouting condition") == "NotInstalled"
    assert await api.get(DEPLOYMENTS, NS, f"{rev}-epp") is None
