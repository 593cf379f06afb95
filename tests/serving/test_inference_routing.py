"""Inference-aware routing: vLLM and SGLang revisions behind a named Gateway get an InferencePool and
an endpoint picker each when the cluster serves the Gateway API Inference Extension; otherwise the
HTTPRoute or the Service routes, and the InferenceRouting condition says why."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from sim import Cluster, at, make_ms, run

from capstan.admission.validation import validate
from capstan.labels import LABEL_SERVING
from capstan.serving.inference import DEFAULT_EPP_IMAGE, epp_name

Validate = Callable[[dict[str, Any]], None]
GATEWAY = {"name": "inference-gw", "namespace": "gateways", "sectionName": "http"}
ROUTED = {"gateway": GATEWAY}
STEPS = {"steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "1m"}]}
CRD = Path(__file__).parents[1] / "fixtures/upstream/inference.networking.k8s.io_inferencepools.yaml"
BOTH = {"gateway_api": True, "inference_api": True}
GW_GROUP = "gateway.networking.k8s.io"


@cache
def _pool_schema() -> dict[str, Any]:
    """Upstream's v1 openAPIV3Schema, made strict: an unknown field is an error, as it is for a
    server-side apply with field validation."""
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def pool_valid(obj: dict[str, Any]) -> None:
    """Fail when ``obj`` is not an InferencePool upstream's CRD admits (schema and its CEL rule)."""
    assert (obj["apiVersion"], obj["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    jsonschema.validate(obj, _pool_schema())
    ref = obj["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref  # the CRD's one CEL rule


def of(plan: Any, kind: str) -> list[dict[str, Any]]:
    return [o for o in plan.objects if o["kind"] == kind]


def one(plan: Any, kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in of(plan, kind) if o["metadata"]["name"] == name]
    return obj


def cond(ms: Any) -> Any:
    return next(c for c in ms.status.conditions if c.type == "InferenceRouting")


def changed(ms: Any, **spec: Any) -> Any:
    new = make_ms(generation=ms.metadata.generation + 1, **{**ms.spec.wire(), **spec})
    return new.model_copy(update={"status": ms.status})


def test_vllm_behind_a_gateway_gets_a_pool_a_picker_and_a_route_to_the_pool(k8s_valid: Validate) -> None:
    ms = make_ms(runtime="vllm", replicas=2, routing=ROUTED)
    ms, plan = run(ms, Cluster(), at(0), **BOTH)
    rev = ms.status.stable_revision
    assert rev
    pool = one(plan, "InferencePool", rev)
    pool_valid(pool)
    assert pool["spec"]["selector"]["matchLabels"] == {LABEL_SERVING: "gpt", "capstan.dev/revision": rev}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service", "name": f"{rev}-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}
    assert pool["metadata"]["ownerReferences"][0]["kind"] == "ModelServing"

    picker = [o for o in plan.objects if o["metadata"]["name"] == f"{rev}-epp"]
    kinds = ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    assert sorted(o["kind"] for o in picker) == kinds
    for obj in picker:
        k8s_valid(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "endpoint-picker"
    dep = one(plan, "Deployment", f"{rev}-epp")
    pod = dep["spec"]["template"]
    # The picker's pods are not server pods: the stable Service, the NetworkPolicy and canary
    # analysis select pods by capstan.dev/modelserving.
    assert LABEL_SERVING not in pod["metadata"]["labels"]
    assert pod["spec"]["serviceAccountName"] == f"{rev}-epp"
    (c,) = pod["spec"]["containers"]
    assert c["image"] == DEFAULT_EPP_IMAGE
    args = c["args"]
    assert args[args.index("--pool-name") + 1] == rev and args[args.index("--pool-namespace") + 1] == "ml"
    config = yaml.safe_load(args[args.index("--config-text") + 1])
    assert {p["type"] for p in config["plugins"]} >= {"queue-scorer", "kv-cache-utilization-scorer",
                                                     "prefix-cache-scorer"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    svc = one(plan, "Service", f"{rev}-epp")
    assert svc["spec"]["selector"] == pod["metadata"]["labels"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {9002, 9090}
    role = one(plan, "Role", f"{rev}-epp")
    assert {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
            "verbs": ["get", "list", "watch"]} in role["rules"]
    binding = one(plan, "RoleBinding", f"{rev}-epp")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{rev}-epp", "namespace": "ml"}]

    (route,) = of(plan, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"group": GW_GROUP, "kind": "Gateway", **GATEWAY}]
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": rev, "weight": 100}]
    # In-cluster clients keep the stable Service.
    assert ms.status.url == "http://gpt.ml.svc"
    assert one(plan, "Service", "gpt")["spec"]["selector"] == {LABEL_SERVING: "gpt"}
    c_ = cond(ms)
    assert (c_.status, c_.reason) == ("True", "InferencePool") and "inference-gw" in c_.message


def test_sglang_picker_reads_sglang_metrics_and_the_image_is_a_setting() -> None:
    ms = make_ms(runtime="sglang", routing={"gateway": {"name": "gw"}, "failureMode": "FailClose"})
    image = "ghcr.io/llm-d/llm-d-router-endpoint-picker:0.0.3"
    ms, plan = run(ms, Cluster(), at(0), epp_image=image, **BOTH)
    rev = ms.status.stable_revision
    (c,) = one(plan, "Deployment", f"{rev}-epp")["spec"]["template"]["spec"]["containers"]
    assert c["image"] == image
    config = yaml.safe_load(c["args"][c["args"].index("--config-text") + 1])
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    assert extractor["parameters"] == {"defaultEngine": "sglang"}
    assert one(plan, "InferencePool", rev)["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    # No namespace named: the route's Gateway is in the ModelServing's namespace.
    (route,) = of(plan, "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"group": GW_GROUP, "kind": "Gateway", "name": "gw"}]


def test_canary_gets_its_own_pool_and_picker_and_the_route_weighs_the_two_pools() -> None:
    c = Cluster()
    ms = make_ms(runtime="vllm", replicas=4, rollout=STEPS, routing=ROUTED)
    ms, _ = run(ms, c, at(0), **BOTH)
    ms, _ = run(ms, c, at(1), **BOTH)
    stable = ms.status.stable_revision
    ms = changed(ms, port=8080)  # a new revision, on another port
    ms, _ = run(ms, c, at(10), **BOTH)
    canary = ms.status.canary_revision
    assert canary and canary != stable
    ms, plan = run(ms, c, at(11), **BOTH)  # canary ready: step 1 holds 10%
    assert {p["metadata"]["name"] for p in of(plan, "InferencePool")} == {stable, canary}
    for pool in of(plan, "InferencePool"):
        pool_valid(pool)
    # The stable revision keeps the port it was rendered with.
    assert one(plan, "InferencePool", stable)["spec"]["targetPorts"] == [{"number": 8000}]
    assert one(plan, "InferencePool", canary)["spec"]["targetPorts"] == [{"number": 8080}]
    assert {f"{stable}-epp", f"{canary}-epp"} <= c.names("Deployment")
    (route,) = of(plan, "HTTPRoute")
    backends = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert backends == {stable: 90, canary: 10}
    assert {b["kind"] for b in route["spec"]["rules"][0]["backendRefs"]} == {"InferencePool"}
    # The pickers are no revisions: status lists the two servers only.
    assert [r.name for r in ms.status.revisions] == [stable, canary]

    ms, _ = run(ms, c, at(80), **BOTH)  # pause over: next step (no analysis configured)
    ms, plan = run(ms, c, at(81), **BOTH)
    ms, plan = run(ms, c, at(150), **BOTH)
    ms, plan = run(ms, c, at(151), **BOTH)
    assert ms.status.stable_revision == canary and not ms.status.canary_revision
    ms, plan = run(ms, c, at(152), **BOTH)
    # The replaced revision's pool and picker go with it.
    assert c.names("InferencePool") == {canary}
    assert f"{stable}-epp" not in c.names("Deployment") | c.names("Service") | c.names("Role")
    (route,) = of(plan, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == canary


@pytest.mark.parametrize(("options", "spec", "reason", "mode"), [
    ({"gateway_api": True, "inference_api": False}, {"runtime": "vllm", "routing": ROUTED}, "NotInstalled",
     "HTTPRoute"),
    ({"gateway_api": False, "inference_api": True}, {"runtime": "vllm", "routing": ROUTED}, "NotInstalled",
     "Service"),
    (BOTH, {"runtime": "tgi", "routing": ROUTED}, "RuntimeNotSupported", "HTTPRoute"),
    (BOTH, {"runtime": "capstan", "routing": ROUTED}, "RuntimeNotSupported", "HTTPRoute"),
    (BOTH, {"runtime": "vllm"}, "NoGateway", "HTTPRoute"),
    (BOTH, {"runtime": "vllm", "routing": {"inferencePool": "Disabled", "gateway": GATEWAY}}, "Disabled",
     "HTTPRoute"),
    ({}, {"runtime": "sglang"}, "NoGateway", "Service"),
])
def test_without_everything_a_pool_needs_todays_routing_stays_and_the_condition_says_why(
        options: dict[str, bool], spec: dict[str, Any], reason: str, mode: str, k8s_valid: Validate) -> None:
    ms, plan = run(make_ms(**spec), Cluster(), at(0), **options)
    rev = ms.status.stable_revision
    assert rev and ms.status.phase != "Failed"
    assert not of(plan, "InferencePool") and not of(plan, "Role") and not of(plan, "ServiceAccount")
    assert {o["metadata"]["name"] for o in of(plan, "Deployment")} == {rev}
    c_ = cond(ms)
    assert (c_.status, c_.reason) == ("False", reason)
    routes = of(plan, "HTTPRoute")
    if mode == "Service":
        assert not routes and "Service" in c_.message
        return
    (route,) = routes
    assert "HTTPRoute" in c_.message
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "", "kind": "Service", "name": rev, "port": 80, "weight": 100}]
    parents = route["spec"]["parentRefs"]
    assert parents[0] == {"group": "", "kind": "Service", "name": "gpt", "port": 80}
    # A named Gateway gets the Service-backed route too.
    gateway = (ms.spec.routing.gateway if ms.spec.routing else None) is not None
    assert parents[1:] == ([{"group": GW_GROUP, "kind": "Gateway", **GATEWAY}] if gateway else [])


def test_a_rollout_from_tgi_to_vllm_keeps_the_service_route_until_the_tgi_revision_is_gone() -> None:
    c = Cluster()
    steps = {"steps": [{"weight": 50, "pause": "1m"}]}
    ms = make_ms(runtime="tgi", replicas=2, rollout=steps, routing=ROUTED)
    ms, _ = run(ms, c, at(0), **BOTH)
    ms, _ = run(ms, c, at(1), **BOTH)
    tgi = ms.status.stable_revision
    ms = changed(ms, runtime="vllm")
    ms, plan = run(ms, c, at(10), **BOTH)
    ms, plan = run(ms, c, at(11), **BOTH)
    assert ms.status.canary_revision
    # The TGI revision's runtime is read from its Deployment (the spec says vllm now).
    assert cond(ms).reason == "RuntimeNotSupported" and f"{tgi} runs tgi" in cond(ms).message
    assert not of(plan, "InferencePool")
    for t in (80, 81, 82, 83):
        ms, plan = run(ms, c, at(t), **BOTH)
    assert tgi not in c.names("Deployment") and ms.status.stable_revision != tgi
    assert cond(ms).reason == "InferencePool" and c.names("InferencePool") == {ms.status.stable_revision}


def test_turning_inference_routing_off_removes_pools_and_pickers_not_the_revision() -> None:
    c = Cluster()
    ms, _ = run(make_ms(runtime="vllm", routing=ROUTED), c, at(0), **BOTH)
    ms, _ = run(ms, c, at(1), **BOTH)
    rev = ms.status.stable_revision
    assert c.names("InferencePool") == {rev} and f"{rev}-epp" in c.names("ServiceAccount")
    off = changed(ms, routing={"inferencePool": "Disabled", "gateway": GATEWAY})
    ms, plan = run(off, c, at(2), **BOTH)
    assert ms.status.stable_revision == rev and not ms.status.canary_revision  # no new revision
    gone = {(d.kind, d.name) for d in plan.deletes}
    assert gone == {("InferencePool", rev)} | {(k, f"{rev}-epp") for k in (
        "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding")}
    assert c.names("Deployment") == {rev}
    (route,) = of(plan, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["kind"] == "Service"
    assert cond(ms).reason == "Disabled"


def test_network_policy_admits_the_pickers_only_with_pools() -> None:
    def admitted(**options: bool) -> list[dict[str, Any]]:
        _, plan = run(make_ms(runtime="vllm", routing=ROUTED, networkPolicy={}), Cluster(), at(0), **options)
        (policy,) = of(plan, "NetworkPolicy")
        return [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]

    picker = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "modelserving",
                                              "app.kubernetes.io/instance": "gpt",
                                              "app.kubernetes.io/component": "endpoint-picker"}}}
    assert picker in admitted(**BOTH)
    assert picker not in admitted(gateway_api=True)


def test_required_pool_the_cluster_cannot_serve_fails_naming_the_field() -> None:
    spec = {"runtime": "vllm", "routing": {"inferencePool": "Required", "gateway": GATEWAY}}
    ms, plan = run(make_ms(**spec), Cluster(), at(0), gateway_api=True)
    assert ms.status.phase == "Failed" and "spec.routing.inferencePool" in ms.status.message
    assert not of(plan, "Deployment")
    ms, plan = run(make_ms(**spec), Cluster(), at(0), **BOTH)
    assert ms.status.phase != "Failed" and of(plan, "InferencePool")


def test_an_install_without_picker_rbac_routes_by_httproute_and_refuses_required() -> None:
    ms, plan = run(make_ms(runtime="vllm", routing=ROUTED), Cluster(), at(0), endpoint_pickers=False, **BOTH)
    assert not of(plan, "InferencePool") and not of(plan, "Role")
    assert (cond(ms).status, cond(ms).reason) == ("False", "NotEnabled")
    assert "routing.endpointPickers" in cond(ms).message
    (route,) = of(plan, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["kind"] == "Service"
    spec = {"runtime": "vllm", "routing": {"inferencePool": "Required", "gateway": GATEWAY}}
    ms, plan = run(make_ms(**spec), Cluster(), at(0), endpoint_pickers=False, **BOTH)
    assert ms.status.phase == "Failed" and "routing.endpointPickers" in ms.status.message


def test_epp_names_fit_any_revision_name() -> None:
    name = epp_name("a" * 63)
    assert len(name) <= 63 and name.endswith("-epp")
    assert epp_name("gpt-1234abcd") == "gpt-1234abcd-epp"


def _ms_body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "capstan.dev/v1alpha1", "kind": "ModelServing",
            "metadata": {"name": "gpt", "namespace": "ml"},
            "spec": {"model": {"pvc": {"claimName": "models"}}, **spec}}


@pytest.mark.parametrize(("spec", "field"), [
    ({"runtime": "tgi", "routing": {"inferencePool": "Required", "gateway": GATEWAY}},
     "spec.routing.inferencePool"),
    ({"routing": {"inferencePool": "Required", "gateway": GATEWAY}}, "spec.routing.inferencePool"),
    # A rule on spec.routing (as spec.rollout's maxSurge rule): "spec.routing: gateway: ...".
    ({"runtime": "vllm", "routing": {"inferencePool": "Required"}}, "spec.routing: gateway"),
    ({"runtime": "vllm", "routing": {"gateway": {"name": "Bad_Name"}}}, "spec.routing.gateway.name"),
    ({"runtime": "vllm", "routing": {"gateway": {"name": "gw", "namespace": "a.b"}}},
     "spec.routing.gateway.namespace"),
    ({"runtime": "vllm", "routing": {"gateway": {"name": "gw"}, "failureMode": "Open"}},
     "spec.routing.failureMode"),
    ({"runtime": "vllm", "routing": {"inferencePool": "Always"}}, "spec.routing.inferencePool"),
])
def test_admission_rejects_bad_routing_naming_the_field(spec: dict[str, Any], field: str) -> None:
    errors = validate(_ms_body(**spec))
    assert errors and any(field in e for e in errors), errors


def test_admission_refuses_a_required_pool_the_cluster_does_not_serve() -> None:
    body = _ms_body(runtime="sglang", routing={"inferencePool": "Required", "gateway": GATEWAY})
    assert validate(body) == [] and validate(body, inference=True) == []
    (error,) = validate(body, inference=False)
    assert error.startswith("spec.routing.inferencePool: Required needs the Gateway API Inference Extension")
    # Auto never needs it: it falls back.
    assert validate(_ms_body(runtime="sglang", routing={"gateway": GATEWAY}), inference=False) == []
    # An install whose operator may not create pickers refuses Required too, saying how to allow it.
    (error,) = validate(body, inference=True, endpoint_pickers=False)
    assert error.startswith("spec.routing.inferencePool: Required needs endpoint pickers")
    assert "routing.endpointPickers" in error
