"""Pure helpers for status conditions."""

from __future__ import annotations

from datetime import UTC, datetime

from capstan.api.common import Condition, ConditionStatus


def rfc3339(when: datetime) -> str:
    """Format a timestamp the way Kubernetes does (UTC, seconds, trailing Z)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """Parse an RFC 3339 timestamp written by :func:`rfc3339` (or the API server)."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; lastTransitionTime moves only when status changes."""
    old = get_condition(conditions, type_)
    moved = old is None or old.status != status
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=rfc3339(now) if moved or old is None else old.last_transition_time,
        observed_generation=generation,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]


def get_condition(conditions: list[Condition], type_: str) -> Condition | None:
    """The condition of ``type_``, if present."""
    return next((c for c in conditions if c.type == type_), None)
