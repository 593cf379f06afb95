"""Status writes shared by every kind: the full-status merge patch and the invalid-spec report."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from capstan.api.common import ApiModel, Condition
from capstan.api.conditions import set_condition
from capstan.api.loading import InvalidResource
from capstan.kube.apply import ApiClient, Resource


async def fetch_live(
    api: ApiClient, res: Resource, namespace: str, name: str, uid: str | None
) -> dict[str, Any] | None:
    """The object to reconcile, or None when it is gone, replaced (another uid) or being deleted."""
    body = await api.get(res, namespace, name)
    meta = (body or {}).get("metadata") or {}
    if body is None or (uid and meta.get("uid") != uid) or meta.get("deletionTimestamp"):
        return None
    return body


def status_patch(status: ApiModel) -> dict[str, Any]:
    """The merge patch that makes ``.status`` equal ``status`` (unset fields are removed)."""
    wire = status.wire()
    return {f.alias or n: wire.get(f.alias or n) for n, f in type(status).model_fields.items()}


async def report_invalid(
    api: ApiClient,
    res: Resource,
    body: Mapping[str, Any],
    exc: InvalidResource,
    logger: kopf.Logger,
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
    conditions = set_condition(conditions, condition, "False", "InvalidSpec", message, now, generation)
    patch = {
        "phase": phase or raw.get("phase") or "Pending",
        "message": f"invalid spec: {message}",
        "observedGeneration": generation,
        "conditions": [c.wire() for c in conditions],
    }
    if any(raw.get(k) != v for k, v in patch.items()):
        await api.patch_status(res, meta.get("namespace"), meta["name"], patch)
    if old is None or old.reason != "InvalidSpec" or old.message != message:
        logger.warning("invalid spec: %s", message)
        await api.post_event(body, "InvalidSpec", message, "Warning")
