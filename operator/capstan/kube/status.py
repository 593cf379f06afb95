"""Shared by every kind: the reconcile frame (read, parse, count), status patches, invalid-spec reports."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from capstan.api.common import ApiModel, Condition
from capstan.api.condition_types import Reason
from capstan.api.conditions import set_condition
from capstan.api.loading import InvalidObject, parse_object
from capstan.fields import dig
from capstan.kube.client import ApiClient
from capstan.kube.resources import ApiResource
from capstan.metrics import RECONCILE_SECONDS, RECONCILES


async def fetch_live(
    api: ApiClient, res: ApiResource, namespace: str, name: str, uid: str | None
) -> dict[str, Any] | None:
    """The object to reconcile, or None when it is gone, replaced (another uid) or being deleted."""
    body = await api.get(res, namespace, name)
    meta = dig(body, "metadata") or {}
    if body is None or (uid and meta.get("uid") != uid) or meta.get("deletionTimestamp"):
        return None
    return body


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The RFC 7386 JSON merge patch that turns ``old`` into ``new`` (both JSON objects).

    Keys of ``old`` missing from ``new`` become ``null`` at any depth, objects are diffed
    recursively, anything else (lists included, which merge patches replace whole) is taken from
    ``new`` when it differs. Equal inputs give ``{}``: a repeated patch changes nothing.
    """
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_diff(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value or type(before) is not type(value):
            # A nested null in ``value`` would mean "delete" in a patch: values come from wire()
            # forms, which hold no nulls (exclude_none), so ``value`` is sent as it is.
            patch[key] = value
    return patch


def status_merge_patch(live: Mapping[str, Any] | None, status: ApiModel) -> dict[str, Any]:
    """The merge patch that makes the live ``.status`` (the raw dict read from the server) equal
    ``status``: fields the new status no longer has are removed (``null``) at every depth, so no
    stale value survives (RFC 7386 keeps whatever a patch leaves out). ``{}``: nothing to write.
    """
    return merge_diff(live or {}, status.wire())


async def report_invalid(
    api: ApiClient,
    res: ApiResource,
    body: Mapping[str, Any],
    exc: InvalidObject,
    logger: kopf.Logger,
    *,
    now: datetime,
    condition: str,
    phase: str | None,
) -> None:
    """An invalid spec: condition ``condition`` False/InvalidSpec naming each bad field, the phase
    set to ``phase`` (None keeps the current one, Pending when none), one Warning Event per distinct
    message; children are left as they are.
    """
    meta = body.get("metadata") or {}
    raw = dict(body.get("status") or {})
    message = "; ".join(exc.errors)
    try:
        conditions = [Condition.model_validate(c) for c in raw.get("conditions") or []]
    except ValueError:
        conditions = []
    old = next((c for c in conditions if c.type == condition), None)
    generation = int(meta.get("generation") or 1)
    conditions = set_condition(
        conditions, condition, "False", Reason.INVALID_SPEC, message, now=now, generation=generation
    )
    patch = {
        "phase": phase or raw.get("phase") or "Pending",
        "message": f"invalid spec: {message}",
        "observedGeneration": generation,
        "conditions": [c.wire() for c in conditions],
    }
    if any(raw.get(k) != v for k, v in patch.items()):
        await api.patch_status(res, meta.get("namespace"), meta["name"], patch)
    if old is None or old.reason != Reason.INVALID_SPEC or old.message != message:
        logger.warning("invalid spec: %s", message)
        await api.post_event(body, Reason.INVALID_SPEC, message, "Warning")


async def report_error(
    api: ApiClient,
    res: ApiResource,
    namespace: str,
    name: str,
    uid: str | None,
    *,
    condition: str,
    message: str,
    now: datetime,
) -> bool:
    """A reconcile pass failed unexpectedly: condition ``condition`` False/ReconcileError with
    ``message``, phase and everything else kept. The next good pass of the planner sets the
    condition again. Returns True when the condition changed now (the caller posts an Event then).
    """
    body = await fetch_live(api, res, namespace, name, uid)
    if body is None:
        return False
    raw = body.get("status") or {}
    try:
        conditions = [Condition.model_validate(c) for c in raw.get("conditions") or []]
    except ValueError:
        conditions = []
    old = next((c for c in conditions if c.type == condition), None)
    same = ("False", Reason.RECONCILE_ERROR, message)
    if old is not None and (old.status, old.reason, old.message) == same:
        return False
    generation = int(dig(body, "metadata", "generation") or 1)
    conditions = set_condition(
        conditions, condition, "False", Reason.RECONCILE_ERROR, message, now=now, generation=generation
    )
    await api.patch_status(res, namespace, name, {"conditions": [c.wire() for c in conditions]})
    return True


Step = Callable[[dict[str, Any], Any, datetime], Awaitable[float | None]]


async def reconcile_live(
    kind: str,
    api: ApiClient,
    res: ApiResource,
    *,
    namespace: str,
    name: str,
    uid: str | None,
    logger: kopf.Logger,
    step: Step,
    condition: str,
    phase: str | None,
    on_invalid: Callable[[Mapping[str, Any]], None] | None = None,
    read: Callable[[], Awaitable[dict[str, Any] | None]] | None = None,
) -> float | None:
    """The part of a reconcile every kind shares: read the live object, parse it, run ``step``.

    ``read()`` reads the object (None: gone or being deleted); by default a GET (:func:`fetch_live`).

    ``step(body, parsed, now)`` does the kind's work and returns seconds until the next pass (None:
    only an event wakes it). A gone object returns None; an invalid spec is reported (see
    :func:`report_invalid` for ``condition`` and ``phase``; ``on_invalid(body)`` runs after) and
    returns None. Every pass is counted and timed in ``capstan_reconciles_total`` /
    ``capstan_reconcile_seconds`` by outcome.
    """
    started = time.monotonic()
    outcome = "error"
    try:
        body = await (read() if read is not None else fetch_live(api, res, namespace, name, uid))
        if body is None:
            outcome = "ok"
            return None
        now = datetime.now(UTC)
        try:
            parsed = parse_object(body)
        except InvalidObject as exc:
            await report_invalid(api, res, body, exc, logger, now=now, condition=condition, phase=phase)
            if on_invalid is not None:
                on_invalid(body)
            outcome = "invalid"
            return None
        after = await step(body, parsed, now)
        outcome = "requeue" if after is not None else "ok"
        return after
    finally:
        RECONCILES.labels(kind, outcome).inc()
        RECONCILE_SECONDS.labels(kind, outcome).observe(time.monotonic() - started)
