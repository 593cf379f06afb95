"""kopf registration of the validating webhooks, and the Node lister they check capacity with.

Nodes are listed from the API (cached for :data:`NODE_CACHE_SECONDS`) rather than taken from a
kopf index: both operator replicas serve webhooks, but kopf peering pauses every watch, indexes
included, in the standby replica, whose index would go stale. The list goes through the operator's
own client (``memo.api``: kopf's login, so the same identity and RBAC role as every other call) and
needs the ``nodes list`` permission the placer already has. If the list fails, node checks are
skipped (fail open for capacity only: every schema check still runs) and the response carries a
warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Mapping
from typing import Any

import kopf

from capstan import GROUP, VERSION
from capstan.admission.validation import validate
from capstan.api.loading import clip
from capstan.config import OperatorConfig
from capstan.kube.client import ApiClient
from capstan.kube.resources import NODES as NODES_RESOURCE

log = logging.getLogger(__name__)

NODE_CACHE_SECONDS = 30.0
_PLURALS = {"TrainingJob": "trainingjobs", "ModelServing": "modelservings"}
# Registries already served; weak, so a registry's id reused after it is gone does not count.
_registered: weakref.WeakSet[kopf.OperatorRegistry] = weakref.WeakSet()


class NodeLister:
    """Cached ``GET /api/v1/nodes``: through the operator's client when given, else through the
    ``kubernetes`` client (in a worker thread; a handler called outside a running operator)."""

    def __init__(self, ttl: float = NODE_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._nodes: list[dict[str, Any]] = []
        self._at = float("-inf")

    async def nodes(self, api: ApiClient | None = None) -> list[dict[str, Any]]:
        # No lock: two concurrent refreshes cost one extra list, and an asyncio.Lock made at import
        # would be bound to the first event loop that waits on it (operators restart in tests).
        if time.monotonic() - self._at > self.ttl:
            if api is not None:
                self._nodes = await asyncio.wait_for(api.list_objects(NODES_RESOURCE), 10)
            else:
                self._nodes = await asyncio.to_thread(_list_nodes)
            self._at = time.monotonic()
        return self._nodes


def _list_nodes() -> list[dict[str, Any]]:
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    api = kubernetes.client.CoreV1Api()
    # _preload_content=False: plain JSON dicts with camelCase keys, as the topology code expects.
    resp: Any = api.list_node(_preload_content=False, _request_timeout=10)
    items: list[dict[str, Any]] = json.loads(resp.data).get("items", [])
    return items


NODES = NodeLister()


async def review(body: kopf.Body, warnings: list[str], memo: kopf.Memo | None = None,
                 old: kopf.BodyEssence | None = None, **_: Any) -> None:
    """Reject the object with every problem found; kopf turns the error into a 422 denial."""
    try:
        nodes = await NODES.nodes(memo.get("api") if memo is not None else None)
    except Exception as exc:  # the API being slow must not block every write
        log.warning("admission: cannot list nodes, skipping capacity checks: %s", exc)
        warnings.append(f"capacity checks skipped: cannot list nodes ({type(exc).__name__})")
        nodes = []
    # In a thread: a spec's argsTemplate is rendered, and its budget is wall time the event loop
    # (every other webhook call and every reconcile) must not wait for.
    config: OperatorConfig = (memo.get("config") if memo is not None else None) or OperatorConfig()
    previous = dict(old) if isinstance(old, Mapping) else None
    keda = await _keda(body, memo, warnings)
    inference = await _inference(body, memo, warnings)
    lws = await _lws(body, memo, warnings)
    errors = await asyncio.to_thread(
        validate, dict(body), nodes, config.topology_levels, previous, keda, inference,
        config.endpoint_pickers, lws,
    )
    if errors:
        raise kopf.AdmissionError(f"{describe(body)} is invalid: " + "; ".join(errors), code=422)


async def _served(memo: kopf.Memo | None, warnings: list[str], what: str, *kinds: str) -> bool | None:
    """Whether the API server serves every resource in ``kinds`` (names in
    :mod:`capstan.kube.modelserving`), asked afresh: CRDs installed a moment ago must count, so not
    the reconcile loop's cached answer. None without a client, or when discovery fails (fail open:
    the operator refuses the spec at reconcile instead)."""
    api = memo.get("api") if memo is not None else None
    if api is None:
        return None
    from capstan.kube import modelserving

    try:
        found = await asyncio.wait_for(
            asyncio.gather(*(modelserving.served(api, getattr(modelserving, k)) for k in kinds)), 10)
        return all(found)
    except Exception as exc:
        log.warning("admission: cannot discover %s: %s", what, exc)
        warnings.append(f"{what} check skipped: API discovery failed ({type(exc).__name__})")
        return None


async def _keda(body: Mapping[str, Any], memo: kopf.Memo | None, warnings: list[str]) -> bool | None:
    """Whether the cluster serves KEDA's ScaledObject, asked only for a ModelServing that scales to
    zero (None: not asked, or unknown)."""
    spec = body.get("spec")
    auto = spec.get("autoscaling") if isinstance(spec, Mapping) else None
    if body.get("kind") != "ModelServing" or not isinstance(auto, Mapping) or auto.get("minReplicas") != 0:
        return None
    return await _served(memo, warnings, "KEDA", "SCALEDOBJECTS")


async def _lws(body: Mapping[str, Any], memo: kopf.Memo | None, warnings: list[str]) -> bool | None:
    """Whether the cluster serves LeaderWorkerSet, asked only for an autoscaled ModelServing whose
    replicas may be groups of pods (None: not asked, or unknown)."""
    spec = body.get("spec")
    if body.get("kind") != "ModelServing" or not isinstance(spec, Mapping) or not spec.get("autoscaling"):
        return None
    if not spec.get("gpusPerPod") and (spec.get("pipelineParallel") or 1) == 1:
        return None  # one pod per replica (gpusPerPod unset: one stage per pod)
    return await _served(memo, warnings, "LeaderWorkerSet", "LEADERWORKERSETS")


async def _inference(body: Mapping[str, Any], memo: kopf.Memo | None, warnings: list[str]) -> bool | None:
    """Whether the cluster serves InferencePool and HTTPRoute, asked only for a ModelServing whose
    ``routing.inferencePool`` is Required (None: not asked, or unknown)."""
    spec = body.get("spec")
    route = spec.get("routing") if isinstance(spec, Mapping) else None
    if body.get("kind") != "ModelServing" or not isinstance(route, Mapping) or (
            route.get("inferencePool") != "Required"):
        return None
    return await _served(memo, warnings, "InferencePool", "INFERENCEPOOLS", "HTTPROUTES")


def describe(body: Mapping[str, Any]) -> str:
    """``Kind 'name'`` of an object under review, whatever types its fields have."""
    kind = body.get("kind")
    meta = body.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    shown_kind = clip(kind, 60) if isinstance(kind, str) else "object"
    shown_name = clip(name, 253) if isinstance(name, str) else ""
    return f"{shown_kind} {shown_name!r}"


def unregister(registry: kopf.OperatorRegistry | None = None) -> None:
    """Remove the handlers :func:`register` added to ``registry`` (the default one when None)."""
    from capstan.admission import WEBHOOK_IDS

    reg = registry if registry is not None else kopf.get_default_registry()
    ids = set(WEBHOOK_IDS.values())
    # kopf has no public way to drop a handler; its registry keeps them in one list.
    reg._webhooks._handlers[:] = [h for h in reg._webhooks._handlers if h.id not in ids]
    _registered.discard(reg)


def register(registry: kopf.OperatorRegistry | None = None) -> None:
    """Register the validating handlers (once per registry) under ids that are URL paths."""
    from capstan.admission import WEBHOOK_IDS

    reg = registry if registry is not None else kopf.get_default_registry()
    if reg in _registered:
        return
    for kind, plural in _PLURALS.items():
        kopf.on.validate(
            GROUP,
            VERSION,
            plural,
            id=WEBHOOK_IDS[kind],
            operations=["CREATE", "UPDATE"],
            registry=reg,
        )(review)
    _registered.add(reg)
