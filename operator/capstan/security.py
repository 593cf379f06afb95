"""Secure defaults of every pod Capstan creates, and the NetworkPolicies around them (pure).

Every pod: ``runAsNonRoot: true`` and seccomp ``RuntimeDefault``; every container (init containers
included): ``allowPrivilegeEscalation: false`` and all capabilities dropped (RDMA workers add back
``IPC_LOCK`` only); no ServiceAccount token unless the spec names a ServiceAccount. That is the Pod
Security Standard "restricted" (RDMA workers: see :data:`RDMA_CAPABILITY`).

Which user runs: the kubelet enforces ``runAsNonRoot`` against the image's USER and refuses to start
a container whose image runs as root, or as a user *name* it cannot check. So the UID is set only
where Capstan knows the image: its reference images (built ``USER 10001``) and the third-party images
it picks itself (the vLLM and TGI defaults, the model downloaders), which run as root unless told
otherwise and work as any UID with a writable ``HOME``. A user's own image runs as its own numeric
USER, or as ``spec.securityContext.runAsUser``; an image that would run as root is reported by the
operator with the kubelet's reason (:func:`nonroot_refusal`), never silently made root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from capstan.api.security import NetworkPolicyPeer, PodSecurity
from capstan.fields import dig
from capstan.labels import LABEL_COMPONENT, LABEL_NAMESPACE_NAME

#: UID and GID of Capstan's reference images (workloads/Dockerfile.*), also used for the
#: third-party images Capstan picks: 10000 or more, so it is no account of the node's.
REFERENCE_UID = 10001
#: Repositories of Capstan's reference images (any tag or digest).
REFERENCE_IMAGES = ("ghcr.io/capstan-dev/capstan-trainer", "ghcr.io/capstan-dev/capstan-server")
#: RDMA memory registration pins pages, which needs CAP_IPC_LOCK (unless the node's container
#: runtime grants an unlimited memlock rlimit). It is outside the Pod Security Standards' baseline
#: list of capabilities, so an RDMA job's namespace must allow the "privileged" level.
RDMA_CAPABILITY = "IPC_LOCK"
NETWORK_POLICY_API = "networking.k8s.io/v1"
#: Where the operator runs (the chart sets it from the downward API); its pods carry this label.
OPERATOR_NAMESPACE_ENV = "POD_NAMESPACE"
DEFAULT_OPERATOR_NAMESPACE = "capstan-system"
OPERATOR_POD_LABELS = {LABEL_COMPONENT: "operator"}


def image_repository(image: str) -> str:
    """``image`` without its tag and digest (``registry:5000/a/b:1.0@sha256:..`` → ``registry:5000/a/b``)."""
    name = image.split("@", 1)[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name


def is_reference_image(image: str) -> bool:
    """Whether ``image`` is one of Capstan's reference images (which run as UID 10001)."""
    return image_repository(image) in REFERENCE_IMAGES


def pod_security_context(user: PodSecurity | None, known_uid: int | None) -> dict[str, Any]:
    """The pod's securityContext: runAsNonRoot and seccomp always; the user, group and volume group
    from ``user`` (the spec), field by field, else ``known_uid`` when Capstan knows the image."""
    ctx: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    fields = (("runAsUser", "run_as_user"), ("runAsGroup", "run_as_group"), ("fsGroup", "fs_group"))
    for key, attr in fields:
        value = getattr(user, attr) if user is not None else None
        if value is None:
            value = known_uid
        if value is not None:
            ctx[key] = value
    return ctx


def container_security_context(add: Sequence[str] = (), run_as: int | None = None) -> dict[str, Any]:
    """A container's securityContext: no privilege escalation, every capability dropped but ``add``;
    ``run_as`` sets the container's own UID and GID (images Capstan picks inside a user's pod)."""
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if add:
        caps["add"] = list(add)
    ctx: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": caps}
    if run_as is not None:
        ctx["runAsUser"] = run_as
        ctx["runAsGroup"] = run_as
    return ctx


def service_account_fields(name: str | None) -> dict[str, Any]:
    """Pod spec fields for the ServiceAccount: the named one with its token, or no token at all
    (the namespace's default ServiceAccount is never needed: the workloads do not call the API)."""
    if name:
        return {"serviceAccountName": name}
    return {"automountServiceAccountToken": False}


def nonroot_refusal(pod: Mapping[str, Any]) -> str | None:
    """The kubelet's refusal to start a container of ``pod`` for running as root (or as a user name
    it cannot verify), as ``container NAME: MESSAGE``; None when there is none."""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = dig(cs, "state", "waiting") or {}
        message = str(waiting.get("message") or "")
        if waiting.get("reason") == "CreateContainerConfigError" and (
            "runAsNonRoot" in message or "non-root" in message
        ):
            return f"container {cs.get('name', '?')}: {message}"
    return None


def nonroot_advice(field: str) -> str:
    """What to do about :func:`nonroot_refusal`, naming the spec field that fixes it."""
    return (
        "Capstan runs containers with runAsNonRoot: build the image with a numeric non-root USER "
        f"(e.g. USER 10001), or set {field}.runAsUser to a non-root UID the image works with"
    )


def _prune(value: Any) -> Any:
    # Empty matchLabels/matchExpressions/except say nothing: leave them out (an empty selector stays).
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if not (isinstance(v, list | dict) and not v and k in (
            "matchLabels", "matchExpressions", "except"))}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def peers(items: Iterable[NetworkPolicyPeer]) -> list[dict[str, Any]]:
    """NetworkPolicy ``from`` entries of the spec's peers."""
    return [_prune(p.wire()) for p in items]


def operator_peer(namespace: str = DEFAULT_OPERATOR_NAMESPACE) -> dict[str, Any]:
    """The Capstan operator's pods in ``namespace``, where the operator runs (canary analysis
    scrapes the servers' /metrics)."""
    return {
        "namespaceSelector": {"matchLabels": {LABEL_NAMESPACE_NAME: namespace}},
        "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
    }


def network_policy(
    meta: dict[str, Any], pod_labels: Mapping[str, str], ingress: list[dict[str, Any]]
) -> dict[str, Any]:
    """An ingress-only NetworkPolicy selecting pods with ``pod_labels``: only ``ingress`` may reach
    them (egress stays open: workers and servers fetch data, models and packages)."""
    return {
        "apiVersion": NETWORK_POLICY_API,
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": dict(pod_labels)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
