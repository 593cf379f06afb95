"""Revisions of a ModelServing and the Kubernetes objects that run and route to them.

A revision is one distinct (model, runtime, image, args, resources, placement) content: its name is
``{name}-{hash8}`` of that content, so the same spec always maps to the same revision and any change
to what runs makes a new one. Replicas, autoscaling and rollout settings are not content: changing
them rescales, it does not roll out.

Objects per ModelServing:

- a Deployment and a Service per live revision (the Deployment's pod template is rendered once, when
  the revision is the desired one; older revisions are only rescaled, never re-rendered from a newer
  spec);
- one stable Service selecting every revision's pods: without Gateway API the traffic split is the
  replica proportion behind it;
- with Gateway API: an ``HTTPRoute`` whose parent is the stable Service (GAMMA, east-west through a
  mesh) and whose backendRefs are the per-revision Services with the revision weights. Where no mesh
  implements the route, the stable Service still splits by replicas, sized to the same weights.
- an ``autoscaling/v2`` HorizontalPodAutoscaler per live revision when ``spec.autoscaling`` is set.

Tensor parallelism: a replica of one pod holds ``tensorParallel`` x ``pipelineParallel`` GPUs, so
they share a node (NVLink/NVSwitch on HGX). For more than one GPU the pod also gets a required node
affinity to nodes whose GPU Feature Discovery ``nvidia.com/gpu.count`` can hold it (or nodes
without GFD labels, left to the scheduler's resource fit), so a PCIe-only small node is never
chosen by accident and cluster-autoscaler picks a big enough node group. A replica of several pods
(``gpusPerPod`` below its GPUs: TP=16 on GB200 NVL72, 4 GPUs a node; or one pipeline stage per HGX
node) is a group, a leader and workers, rendered by :mod:`capstan.serving.groups` instead of a
Deployment.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capstan import API_VERSION
from capstan.api.modelserving import ModelServing
from capstan.labels import (
    GPU_COUNT_LABEL,
    GPU_RESOURCE,
    LABEL_REVISION,
    LABEL_SERVING,
    PROMETHEUS_PATH_ANNOTATION,
    PROMETHEUS_PORT_ANNOTATION,
    PROMETHEUS_SCRAPE_ANNOTATION,
)
from capstan.naming import common_labels, dns_label, label_value, owner_reference, short_hash
from capstan.podmerge import merge_template
from capstan.security import (
    DEFAULT_OPERATOR_NAMESPACE,
    REFERENCE_UID,
    container_security_context,
    is_reference_image,
    operator_peer,
    peers,
    pod_security_context,
    service_account_fields,
)
from capstan.security import network_policy as _network_policy
from capstan.serving.adapters import AdapterRef, adapter_pod_parts, max_rank
from capstan.serving.adapters import content as adapter_content
from capstan.serving.adapters import mode as adapter_mode
from capstan.serving.model_source import ModelRef, fetch_job, model_pvc, pod_parts
from capstan.serving.runtimes import ArgsContext, Runtime, runtime_for

CONTAINER = "server"
PORT_NAME = "http"
SERVICE_PORT = 80
# A canary that is not Available after this long is rolled back (model loading included).
PROGRESS_DEADLINE_S = 1200
# Up to 20 minutes to load weights before liveness may kill the server.
STARTUP_PERIOD_S = 10
STARTUP_FAILURES = 120
# Bumped when the rendering of a revision changes: an operator upgrade then rolls out a new
# revision through the canary steps instead of editing the stable Deployment in place.
RENDER_VERSION = 2  # 2: secure pod defaults (securityContext, no ServiceAccount token)
GATEWAY_API = "gateway.networking.k8s.io/v1"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"


@dataclass(frozen=True)
class Revision:
    """The desired revision: its name, content hash and what it serves."""

    name: str
    hash: str
    model: ModelRef
    runtime: Runtime
    adapters: tuple[AdapterRef, ...] = ()


def content(ms: ModelServing, model: ModelRef, adapters: Sequence[AdapterRef] = ()) -> dict[str, Any]:
    """Everything that decides what a revision's pods run (and nothing that only scales them).

    Adapters count by their volumes only where the runtime loads them at run time (the operator
    loads and unloads them on the running servers), in full where they are on the command line."""
    spec = ms.spec.wire()
    for key in ("replicas", "autoscaling", "rollout", "model", "networkPolicy", "adapters", "routing"):
        spec.pop(key, None)
    return {"v": RENDER_VERSION, "name": ms.metadata.name, "model": model.identity, **spec,
            **adapter_content(ms, list(adapters))}


def revision_hash(ms: ModelServing, model: ModelRef, adapters: Sequence[AdapterRef] = ()) -> str:
    """Eight hex digits of the revision content."""
    return short_hash(json.dumps(content(ms, model, adapters), sort_keys=True, separators=(",", ":")))


def revision_name(ms: ModelServing, digest: str) -> str:
    """``{name}-{hash8}`` as a DNS-1035 label (it names a Service too), for any legal name."""
    return dns_label(ms.metadata.name, suffix=f"-{digest}")


def desired_revision(ms: ModelServing, model: ModelRef, adapters: Sequence[AdapterRef] = ()) -> Revision:
    """The revision the current spec asks for (``adapters``: the resolved ``spec.adapters``)."""
    digest = revision_hash(ms, model, adapters)
    return Revision(revision_name(ms, digest), digest, model, runtime_for(ms.spec), tuple(adapters))


def stable_service_name(ms: ModelServing) -> str:
    """The Service clients use: ``http://{name}.{ns}.svc``."""
    return dns_label(ms.metadata.name)


def serving_labels(ms: ModelServing, component: str = "server") -> dict[str, str]:
    """Labels on every child of ``ms``."""
    labels = common_labels("modelserving", ms.metadata.name, component)
    labels[LABEL_SERVING] = label_value(ms.metadata.name)
    return labels


def serving_selector(ms: ModelServing) -> dict[str, str]:
    """Selects the pods of every revision of ``ms``."""
    return {LABEL_SERVING: label_value(ms.metadata.name)}


def selector_string(ms: ModelServing) -> str:
    """``serving_selector`` as a label selector string (``status.selector`` for the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in serving_selector(ms).items())


def revision_selector(ms: ModelServing, revision: str) -> dict[str, str]:
    """Selects the pods of one revision."""
    return {**serving_selector(ms), LABEL_REVISION: revision}


def meta(
    ms: ModelServing, name: str, revision: str | None = None, component: str = "server"
) -> dict[str, Any]:
    """Metadata of a child: labels and, when ``ms`` has a uid, a controller ownerReference."""
    labels = serving_labels(ms, component)
    if revision:
        labels[LABEL_REVISION] = revision
    out: dict[str, Any] = {"name": name, "namespace": ms.metadata.namespace, "labels": labels}
    if ms.metadata.uid:
        out["ownerReferences"] = [
            owner_reference(API_VERSION, "ModelServing", ms.metadata.name, ms.metadata.uid)
        ]
    return out


def _resources(ms: ModelServing) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    res = ms.spec.resources
    if res.cpu is not None:
        amounts["cpu"] = str(res.cpu)
    if res.memory is not None:
        amounts["memory"] = str(res.memory)
    if ms.spec.gpu:
        amounts[GPU_RESOURCE] = str(ms.spec.pod_gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _affinity(ms: ModelServing) -> dict[str, Any] | None:
    tp = ms.spec.pod_gpus
    if not ms.spec.gpu or tp <= 1:
        return None
    # nodeSelectorTerms are ORed: nodes GFD says can hold the replica, or nodes GFD never labelled.
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": GPU_COUNT_LABEL, "operator": "Gt", "values": [str(tp - 1)]}
                        ]
                    },
                    {"matchExpressions": [{"key": GPU_COUNT_LABEL, "operator": "DoesNotExist"}]},
                ]
            }
        }
    }


def _probe(path: str, **extra: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT_NAME}, **extra}


def server_pod(ms: ModelServing, rev: Revision) -> dict[str, Any]:
    """The pod template of ``rev``'s servers (of a multi-host replica: the leader's, before
    :mod:`capstan.serving.groups` makes the group's leader and worker templates of it)."""
    spec, rt = ms.spec, rev.runtime
    lora = bool(spec.adapters) and adapter_mode(ms) != ""
    refs = list(rev.adapters)
    ctx = ArgsContext(
        model_path=rev.model.path,
        port=spec.port,
        tensor_parallel=spec.tensor_parallel,
        max_model_len=spec.max_model_len,
        name=ms.metadata.name,
        quantization=spec.quantization,
        lora=lora,
        # Run-time runtimes get their adapters from the operator once ready, never on the command line.
        lora_modules=tuple(sorted((r.name, r.path) for r in refs)) if adapter_mode(ms) == "startup" else (),
        max_lora_rank=max_rank(refs),
        pipeline_parallel=spec.stages,
        nodes=spec.pods_per_replica,
    )
    env = [{"name": k, "value": v} for k, v in (*rt.env, *(rt.lora_env if lora else ()))]
    env += [
        {"name": "CAPSTAN_MODELSERVING", "value": ms.metadata.name},
        {"name": "CAPSTAN_REVISION", "value": rev.name},
    ]
    user_env: list[dict[str, Any]] = [e.wire() for e in spec.env]
    template = spec.template
    server = template.main_container() if template else {}
    # The template's server env (Secrets included) overrides the runtime's defaults by name, as
    # spec.env does; the two never name the same variable (admission rejects that).
    user_env += [dict(e) for e in server.get("env") or []]
    env = [e for e in env if e["name"] not in {u["name"] for u in user_env}] + user_env
    parts = pod_parts(rev.model, rev.name, user_env, server.get("envFrom"))
    lora_parts = adapter_pod_parts(ms, refs, user_env)
    image = spec.image or rt.image
    # The UID is set where Capstan knows the image: its own, or a runtime default it picked.
    known_uid = rt.image_user if spec.image is None else None
    if is_reference_image(image):
        known_uid = REFERENCE_UID
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "args": rt.args(ctx),
        "env": env,
        "ports": [{"name": PORT_NAME, "containerPort": spec.port, "protocol": "TCP"}],
        "readinessProbe": _probe(rt.ready_path, periodSeconds=5, failureThreshold=3),
        "livenessProbe": _probe(rt.health_path, periodSeconds=15, failureThreshold=4, timeoutSeconds=5),
        # Liveness only starts once the server answered health once: loading weights can take minutes.
        "startupProbe": _probe(
            rt.health_path, periodSeconds=STARTUP_PERIOD_S, failureThreshold=STARTUP_FAILURES
        ),
        "volumeMounts": [*parts["mounts"], *lora_parts["mounts"], {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": container_security_context(),
    }
    command = spec.command or list(rt.command)
    if command:
        container["command"] = list(command)
    resources = _resources(ms)
    if resources:
        container["resources"] = resources
    labels = meta(ms, rev.name, rev.name)["labels"]
    pod_meta: dict[str, Any] = {
        "labels": labels,
        "annotations": {
            PROMETHEUS_SCRAPE_ANNOTATION: "true",
            PROMETHEUS_PORT_ANNOTATION: str(spec.port),
            PROMETHEUS_PATH_ANNOTATION: rt.metrics_path,
        },
    }
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security_context(spec.security_context, known_uid),
        # The servers never call the Kubernetes API: no ServiceAccount token in the pod.
        **service_account_fields(None),
        "containers": [container],
        # NCCL between tensor-parallel ranks and vLLM/TGI shard processes share memory through /dev/shm.
        "volumes": [
            *parts["volumes"],
            *lora_parts["volumes"],
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
        "terminationGracePeriodSeconds": 60,
    }
    if parts["init"] or lora_parts["init"]:
        pod_spec["initContainers"] = [*parts["init"], *lora_parts["init"]]
    affinity = _affinity(ms)
    if affinity:
        pod_spec["affinity"] = affinity
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in spec.tolerations]
    pod: dict[str, Any] = {"metadata": pod_meta, "spec": pod_spec}
    if template is not None:
        # The server env is already in place (the download needs it too): merge the rest.
        server_spec = {**template.spec, "containers": [
            {k: v for k, v in c.items() if k != "env"} if c.get("name") == CONTAINER else c
            for c in template.spec.get("containers") or []]}
        pod = merge_template(pod, template.metadata.wire(), server_spec, CONTAINER)
    return pod


def deployment(ms: ModelServing, rev: Revision, replicas: int | None) -> dict[str, Any]:
    """The Deployment of ``rev``; ``replicas`` None leaves the count to its HPA."""
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": revision_selector(ms, rev.name)},
        "progressDeadlineSeconds": PROGRESS_DEADLINE_S,
        "revisionHistoryLimit": 1,
        "template": server_pod(ms, rev),
    }
    if replicas is not None:
        dep_spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(ms, rev.name, rev.name),
        "spec": dep_spec,
    }


def network_policy(
    ms: ModelServing, *, operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
    scrapers: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """The NetworkPolicy around every revision's servers (``spec.networkPolicy``), named like the
    stable Service: the server port (by name, whatever each revision's number) accepts the routing
    layer, the operator's canary analysis (from ``operator_namespace``), the metrics scraper and
    ``scrapers`` (the endpoint pickers of InferencePools). None when the spec asks for none."""
    policy = ms.spec.network_policy
    if policy is None:
        return None
    def rule(sources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"from": sources, "ports": [{"protocol": "TCP", "port": PORT_NAME}]}

    # An empty "from" would admit everyone: peers that are not configured get no rule at all.
    ingress = [rule(peers(policy.clients_from))] if policy.clients_from else []
    ingress.append(rule([operator_peer(operator_namespace), *(scrapers or [])]))
    if policy.metrics_from:
        ingress.append(rule(peers(policy.metrics_from)))
    policy_meta = meta(ms, stable_service_name(ms), component="network-policy")
    return _network_policy(policy_meta, serving_selector(ms), ingress)


def model_claim(ms: ModelServing, rev: Revision) -> dict[str, Any] | None:
    """The revision's model PVC: restored from a TrainingJob snapshot, or the cache a uri is
    fetched into (None for other sources)."""
    return model_pvc(rev.model, rev.name, meta(ms, rev.name, rev.name, component="model"))


def model_fetch(ms: ModelServing, rev: Revision) -> dict[str, Any] | None:
    """The Job that fetches ``rev``'s cached uri into its model PVC (None when not cached). It gets
    the server's env (Secrets included: a model hub's token), service account and pull secrets."""
    template = ms.spec.template
    server = template.main_container() if template else {}
    env = [e.wire() for e in ms.spec.env] + [dict(e) for e in server.get("env") or []]
    job = fetch_job(rev.model, rev.name, meta(ms, rev.name, rev.name, component="model"), env,
                    server.get("envFrom"))
    if job is not None and template is not None:
        pod = job["spec"]["template"]["spec"]
        wire = template.wire().get("spec") or {}
        for key in ("serviceAccountName", "imagePullSecrets"):
            if wire.get(key):
                pod[key] = wire[key]
        if wire.get("serviceAccountName"):
            pod.pop("automountServiceAccountToken", None)  # workload identity may need the token
    return job


def _service(ms: ModelServing, name: str, selector: dict[str, str], revision: str | None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(ms, name, revision),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            # Named target port: revisions with different container ports sit behind one Service.
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def stable_service(ms: ModelServing) -> dict[str, Any]:
    """The Service selecting every revision (traffic split by replica proportion)."""
    return _service(ms, stable_service_name(ms), serving_selector(ms), None)


def revision_service(ms: ModelServing, revision: str) -> dict[str, Any]:
    """The Service of one revision (HTTPRoute backend, direct canary access)."""
    return _service(ms, revision, revision_selector(ms, revision), revision)


def route(ms: ModelServing, parents: list[dict[str, Any]], backends: list[dict[str, Any]]) -> dict[str, Any]:
    """The ModelServing's one HTTPRoute: every path to ``backends``, attached to ``parents``."""
    return {
        "apiVersion": GATEWAY_API,
        "kind": "HTTPRoute",
        "metadata": meta(ms, stable_service_name(ms), None, component="route"),
        "spec": {
            "parentRefs": parents,
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": backends}],
        },
    }


def http_route(
    ms: ModelServing, weights: dict[str, int], gateways: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Gateway API HTTPRoute on the stable Service splitting traffic by revision weight; also
    attached to ``gateways`` (parentRefs of Gateways) when given."""
    stable = {"group": "", "kind": "Service", "name": stable_service_name(ms), "port": SERVICE_PORT}
    backends = [
        {"group": "", "kind": "Service", "name": rev, "port": SERVICE_PORT, "weight": w}
        for rev, w in sorted(weights.items())
    ]
    return route(ms, [stable, *(gateways or [])], backends)


def scaled_bounds(low: int, high: int, weight: int, floor: int = 1) -> tuple[int, int]:
    """``low..high`` scaled to a revision's traffic share: ceil, at least ``floor`` (1: a live
    revision keeps a replica; 0: it may scale to zero) and at least 1 at the top."""
    lo = max(floor, math.ceil(low * weight / 100)) if weight > 0 else 0
    hi = max(lo, 1, math.ceil(high * weight / 100))
    return lo, hi


#: KEDA's ScaledObject (scale to zero, activation); detected by API discovery.
KEDA_API = "keda.sh/v1alpha1"
# Model servers take minutes to load: scale down slowly so a dip does not drop warm replicas.
SCALE_DOWN_WINDOW_S = 300


def _bounds(ms: ModelServing, weight: int, canary: bool) -> tuple[int, int]:
    auto = ms.spec.autoscaling
    assert auto is not None
    # A canary keeps a replica (the rollout analyses it); others may idle at zero with KEDA.
    floor = 0 if auto.min_replicas == 0 and not canary else 1
    return scaled_bounds(auto.min_replicas, auto.max_replicas, weight, floor)


def _load_query(ms: ModelServing, revision: str, series: str) -> str:
    """PromQL: ``series`` summed over the revision's pods (a Deployment's pods are named
    ``{revision}-{template hash}-{suffix}``)."""
    return (f'sum({series}{{namespace="{ms.metadata.namespace}",'
            f'pod=~"{revision}-[a-z0-9]+-[a-z0-9]+"}})')


def autoscaler(
    ms: ModelServing, rev: Revision | str, weight: int, *, canary: bool = False, keda: bool = False,
    prometheus: str = "", target: str = "Deployment",
) -> dict[str, Any]:
    """The autoscaler of one revision's workload (``target``: Deployment, or the LeaderWorkerSet
    of multi-host replicas), bounds scaled to its traffic share: a KEDA ScaledObject when ``keda``
    (its Prometheus trigger queries ``prometheus``), else an HPA."""
    name = rev if isinstance(rev, str) else rev.name
    runtime = runtime_for(ms.spec)
    out = (scaled_object(ms, name, weight, runtime, canary=canary, prometheus=prometheus) if keda
           else hpa(ms, name, weight, runtime, canary=canary))
    if target == "LeaderWorkerSet":
        out["spec"]["scaleTargetRef"] = {"apiVersion": LWS_API_VERSION, "kind": target, "name": name}
    return out


def hpa(ms: ModelServing, revision: str, weight: int, runtime: Runtime | None = None, *,
        canary: bool = False) -> dict[str, Any]:
    """autoscaling/v2 HPA of one revision's Deployment: a Pods metric served by prometheus-adapter
    (the chart's rules name each runtime's load gauge), or CPU utilisation."""
    auto = ms.spec.autoscaling
    assert auto is not None
    rt = runtime or runtime_for(ms.spec)
    lo, hi = _bounds(ms, weight, canary)
    signal = rt.load_signal(auto.metric)
    if signal is not None:
        metric: dict[str, Any] = {
            "type": "Pods",
            "pods": {
                "metric": {"name": signal.adapter_name},
                "target": {"type": "AverageValue",
                           "averageValue": _quantity(auto.target * signal.per_percent)},
            },
        }
    else:
        metric = {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": auto.target}},
        }
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": revision},
        # Without KEDA an HPA never goes below 1 (admission and the planner refuse minReplicas 0).
        "minReplicas": max(lo, 1),
        "maxReplicas": hi,
        "metrics": [metric],
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}},
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta(ms, revision, revision, component="autoscaler"),
        "spec": spec,
    }


def scaled_object(ms: ModelServing, revision: str, weight: int, runtime: Runtime, *, canary: bool = False,
                  prometheus: str = "") -> dict[str, Any]:
    """KEDA ScaledObject of one revision's Deployment: a Prometheus trigger on the runtime's load
    gauge summed over the revision's pods (or a CPU trigger), and with minReplicas 0 a second
    Prometheus trigger on ``autoscaling.activationQuery`` that wakes the revision from zero."""
    auto = ms.spec.autoscaling
    assert auto is not None
    lo, hi = _bounds(ms, weight, canary)
    signal = runtime.load_signal(auto.metric)
    triggers: list[dict[str, Any]] = []
    if signal is not None:
        triggers.append({
            "type": "prometheus",
            "name": "load",
            "metadata": {
                "serverAddress": prometheus,
                "query": _load_query(ms, revision, signal.series),
                "threshold": _number(auto.target * signal.per_percent),
                # No pod, no series: read as 0 (scaled to zero), not as an error.
                "ignoreNullValues": "true",
            },
        })
    else:
        triggers.append({"type": "cpu", "name": "load", "metricType": "Utilization",
                         "metadata": {"value": str(auto.target)}})
    if lo == 0 and auto.activation_query:
        triggers.append({
            "type": "prometheus",
            "name": "activation",
            "metadata": {
                "serverAddress": prometheus,
                "query": auto.activation_query,
                "threshold": _number(auto.target * (signal.per_percent if signal else 1)),
                "activationThreshold": "0",
                "ignoreNullValues": "true",
            },
        })
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": revision},
        "minReplicaCount": lo,
        "maxReplicaCount": hi,
        "cooldownPeriod": SCALE_DOWN_WINDOW_S,
        "advanced": {"horizontalPodAutoscalerConfig": {
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}}}},
        "triggers": triggers,
    }
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": meta(ms, revision, revision, component="autoscaler"),
        "spec": spec,
    }


def _number(value: float) -> str:
    """A KEDA threshold: a plain decimal."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _quantity(value: float) -> str:
    """A Kubernetes quantity: whole units, else milli-units (0.8 → 800m)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"
