"""Inference-aware routing: an InferencePool and its endpoint picker per revision.

With the Gateway API Inference Extension (``inference.networking.k8s.io/v1`` InferencePool) a
Gateway hands each request to an endpoint picker (EPP, an Envoy ext-proc server) that chooses the
pod by its queue, KV-cache use and prefix-cache hits, read from the model servers' own metrics.
Capstan renders, per live revision:

- an ``InferencePool`` named like the revision, selecting its pods on their container port;
- the pool's endpoint picker: a Deployment and a Service ``{revision}-epp`` (gRPC ext-proc 9002,
  health 9003, metrics 9090), a ServiceAccount, and a Role/RoleBinding letting it read pods and
  InferencePools (and the extension's InferenceObjectives and InferenceModelRewrites) in the
  namespace;
- one ``HTTPRoute`` attached to the Gateway of ``spec.routing.gateway`` whose backendRefs are the
  pools, weighted by the rollout's traffic split (a canary is a second pool with its own picker).

A pool per revision keeps canary weights exact: one pool over both revisions would let the picker
send any share to either. The picker is told which engine it reads (vLLM or SGLang metric names)
through its configuration; its image is an operator setting (``$CAPSTAN_EPP_IMAGE``).

:func:`routing` decides whether this applies: the runtime is vLLM or SGLang, the cluster serves
InferencePool and HTTPRoute, a gateway is named and ``spec.routing.inferencePool`` is not Disabled;
otherwise the HTTPRoute (or the Service) of :mod:`capstan.serving.revisions` routes, and the
``InferenceRouting`` condition says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import yaml

from capstan.api.condition_types import InferenceRoutingReason as Why
from capstan.api.modelserving import INFERENCE_RUNTIMES, ModelServing
from capstan.labels import LABEL_COMPONENT, LABEL_INSTANCE, LABEL_NAME, LABEL_REVISION
from capstan.naming import dns_label
from capstan.security import container_security_context, pod_security_context
from capstan.serving.revisions import (
    meta,
    revision_selector,
    route,
    serving_labels,
)

INFERENCE_API = "inference.networking.k8s.io/v1"
INFERENCE_GROUP = "inference.networking.k8s.io"
RBAC_API = "rbac.authorization.k8s.io/v1"
#: The endpoint picker Capstan runs unless ``$CAPSTAN_EPP_IMAGE`` names another (the extension's
#: reference picker; llm-d's router speaks the same protocol).
DEFAULT_EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
#: distroless/static:nonroot, the picker's base image.
EPP_UID = 65532
EPP_COMPONENT = "endpoint-picker"
EPP_GRPC_PORT = 9002
EPP_HEALTH_PORT = 9003
EPP_METRICS_PORT = 9090
#: The ext-proc health service the picker answers gRPC probes for.
EPP_HEALTH_SERVICE = "inference-extension"
#: What the picker may read in its namespace (Capstan holds the same, so it may grant it).
EPP_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [INFERENCE_GROUP], "resources": ["inferencepools"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["inference.networking.x-k8s.io"],
     "resources": ["inferenceobjectives", "inferencemodelrewrites"], "verbs": ["get", "list", "watch"]},
)

Mode = Literal["InferencePool", "HTTPRoute", "Service"]


@dataclass(frozen=True)
class Routing:
    """How traffic reaches the revisions, and why (the ``InferenceRouting`` condition)."""

    mode: Mode
    reason: Why
    message: str

    @property
    def pools(self) -> bool:
        """Whether each revision gets an InferencePool and an endpoint picker."""
        return self.mode == "InferencePool"


def routing(ms: ModelServing, *, gateway_api: bool, inference_api: bool,
            runtimes: dict[str, str] | None = None, pickers: bool = True) -> Routing:
    """Whether ``ms`` is routed through InferencePools, an HTTPRoute or the stable Service.

    ``gateway_api``/``inference_api``: the cluster serves HTTPRoute / InferencePool.
    ``pickers``: the operator may create endpoint pickers (their Roles and RoleBindings).
    ``runtimes``: the runtime of each live revision rendered from an older spec (a canary from
    TGI to vLLM keeps the HTTPRoute until the TGI revision is gone)."""
    fallback: Mode = "HTTPRoute" if gateway_api else "Service"
    instead = "HTTPRoute weights" if gateway_api else "the Service (replica split)"
    spec = ms.spec.routing
    if spec is None or spec.inference_pool == "Disabled":
        why = "not asked for (spec.routing.inferencePool: Disabled)" if spec else "no spec.routing.gateway"
        return Routing(fallback, Why.DISABLED if spec else Why.NO_GATEWAY, f"{why}; routing by {instead}")
    other = sorted(f"{rev} runs {rt}" for rev, rt in (runtimes or {}).items() if rt not in INFERENCE_RUNTIMES)
    if ms.spec.runtime not in INFERENCE_RUNTIMES or other:
        what = "; ".join(other) or f"runtime {ms.spec.runtime}"
        return Routing(fallback, Why.RUNTIME_NOT_SUPPORTED,
                       f"{what}: the endpoint picker reads vllm and sglang only; routing by {instead}")
    if spec.gateway is None:
        return Routing(fallback, Why.NO_GATEWAY, f"no spec.routing.gateway; routing by {instead}")
    if not (gateway_api and inference_api):
        apis = (("InferencePool (inference.networking.k8s.io/v1)", inference_api),
                ("HTTPRoute (gateway.networking.k8s.io/v1)", gateway_api))
        missing = " and ".join(what for what, ok in apis if not ok)
        return Routing(fallback, Why.NOT_INSTALLED,
                       f"the cluster does not serve {missing}; routing by {instead}")
    if not pickers:
        return Routing(fallback, Why.NOT_ENABLED,
                       "this Capstan install may not create endpoint pickers (chart: "
                       f"routing.endpointPickers: true grants their Roles); routing by {instead}")
    return Routing("InferencePool", Why.INFERENCE_POOL,
                   f"an InferencePool and endpoint picker per revision behind Gateway {spec.gateway.name}")


def epp_name(revision: str) -> str:
    """The endpoint picker's Deployment, Service, ServiceAccount, Role and RoleBinding name."""
    return dns_label(revision, suffix="-epp")


def epp_pod_labels(ms: ModelServing, revision: str) -> dict[str, str]:
    """Labels of a revision's picker pods: not the server pods' ``capstan.dev/modelserving``, so
    the stable Service, the NetworkPolicy and canary analysis never select them."""
    labels = serving_labels(ms, EPP_COMPONENT)
    return {k: labels[k] for k in (LABEL_NAME, LABEL_INSTANCE, LABEL_COMPONENT)} | {LABEL_REVISION: revision}


def epp_peer(ms: ModelServing) -> dict[str, Any]:
    """NetworkPolicy peer: every picker of ``ms`` (it scrapes the servers' metrics)."""
    labels = epp_pod_labels(ms, "x")
    del labels[LABEL_REVISION]
    return {"podSelector": {"matchLabels": labels}}


def _config(runtime: str) -> str:
    """The picker's EndpointPickerConfig: queue, KV-cache and prefix-cache scorers over the
    ``runtime``'s metrics (the weights of the extension's default profile)."""
    extractor: dict[str, Any] = {"type": "core-metrics-extractor"}
    if runtime != "vllm":
        extractor["parameters"] = {"defaultEngine": runtime}
    doc = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "queue-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "prefix-cache-scorer"},
            {"type": "metrics-data-source", "parameters": {"scheme": "http", "path": "/metrics"}},
            extractor,
        ],
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": "queue-scorer", "weight": 2},
            {"pluginRef": "kv-cache-utilization-scorer", "weight": 2},
            {"pluginRef": "prefix-cache-scorer", "weight": 3},
        ]}],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def inference_pool(ms: ModelServing, revision: str, port: int) -> dict[str, Any]:
    """The InferencePool of one revision: its pods on container ``port``, and its picker."""
    spec = ms.spec.routing
    failure = spec.failure_mode if spec else "FailOpen"
    return {
        "apiVersion": INFERENCE_API,
        "kind": "InferencePool",
        "metadata": meta(ms, revision, revision, component="route"),
        "spec": {
            "selector": {"matchLabels": revision_selector(ms, revision)},
            "targetPorts": [{"number": port}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": epp_name(revision),
                "port": {"number": EPP_GRPC_PORT},
                "failureMode": failure,
            },
        },
    }


def endpoint_picker(ms: ModelServing, revision: str, runtime: str, image: str) -> list[dict[str, Any]]:
    """A revision's picker: ServiceAccount, Role, RoleBinding, Service and Deployment."""
    name = epp_name(revision)
    ns = ms.metadata.namespace
    labels = epp_pod_labels(ms, revision)

    def m() -> dict[str, Any]:
        return meta(ms, name, revision, component=EPP_COMPONENT)

    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": m()}
    role = {"apiVersion": RBAC_API, "kind": "Role", "metadata": m(), "rules": [dict(r) for r in EPP_RULES]}
    binding = {
        "apiVersion": RBAC_API,
        "kind": "RoleBinding",
        "metadata": m(),
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": m(),
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [
                {"name": "grpc-ext-proc", "port": EPP_GRPC_PORT, "targetPort": "grpc",
                 "protocol": "TCP", "appProtocol": "http2"},
                {"name": "http-metrics", "port": EPP_METRICS_PORT, "targetPort": "metrics",
                 "protocol": "TCP"},
            ],
        },
    }

    def probe(**extra: int) -> dict[str, Any]:
        return {"grpc": {"port": EPP_HEALTH_PORT, "service": EPP_HEALTH_SERVICE}, **extra}

    container = {
        "name": "epp",
        "image": image,
        "args": [
            "--pool-name", revision,
            "--pool-namespace", ns,
            "--pool-group", INFERENCE_GROUP,
            "--grpc-port", str(EPP_GRPC_PORT),
            "--grpc-health-port", str(EPP_HEALTH_PORT),
            "--metrics-port", str(EPP_METRICS_PORT),
            "--zap-encoder", "json",
            "--tracing=false",
            "--config-text", _config(runtime),
        ],
        "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [
            {"name": "grpc", "containerPort": EPP_GRPC_PORT, "protocol": "TCP"},
            {"name": "grpc-health", "containerPort": EPP_HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": EPP_METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe(periodSeconds=2),
        "livenessProbe": probe(initialDelaySeconds=5, periodSeconds=10),
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "8Gi"}},
        "securityContext": container_security_context(),
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": m(),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "revisionHistoryLimit": 1,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    # It watches pods and its pool: the only Capstan-made pod that calls the API.
                    "serviceAccountName": name,
                    "securityContext": pod_security_context(None, EPP_UID),
                    "containers": [container],
                    # As long as a server's grace period: requests in flight are not cut.
                    "terminationGracePeriodSeconds": 130,
                },
            },
        },
    }
    return [account, role, binding, service, deployment]


def _gateway_parent(ms: ModelServing) -> dict[str, Any]:
    spec = ms.spec.routing
    assert spec is not None and spec.gateway is not None
    gw = spec.gateway
    ref: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw.name}
    if gw.namespace:
        ref["namespace"] = gw.namespace
    if gw.section_name:
        ref["sectionName"] = gw.section_name
    return ref


def pool_route(ms: ModelServing, weights: dict[str, int]) -> dict[str, Any]:
    """The HTTPRoute on the Gateway whose backends are the revisions' InferencePools, weighted."""
    backends = [
        {"group": INFERENCE_GROUP, "kind": "InferencePool", "name": rev, "weight": w}
        for rev, w in sorted(weights.items())
    ]
    return route(ms, [_gateway_parent(ms)], backends)


def gateway_parents(ms: ModelServing) -> list[dict[str, Any]]:
    """Extra parentRefs of the Service-backed HTTPRoute: the named Gateway, if any."""
    spec = ms.spec.routing
    return [_gateway_parent(ms)] if spec is not None and spec.gateway is not None else []


__all__ = [
    "DEFAULT_EPP_IMAGE",
    "EPP_COMPONENT",
    "INFERENCE_API",
    "Routing",
    "endpoint_picker",
    "epp_name",
    "epp_peer",
    "gateway_parents",
    "inference_pool",
    "pool_route",
    "routing",
]
