"""Pure helpers for status conditions."""

from __future__ import annotations

from datetime import UTC, datetime

from capstan.api.common import Condition, ConditionStatus
from capstan.api.condition_types import Reason

#: Reason of the condition that says the API server refused to create a child (a 4xx).
CREATE_FAILED = Reason.CREATE_FAILED


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
    *,
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


def refusal_on_record(conditions: list[Condition], type_: str, generation: int) -> Condition | None:
    """Condition ``type_`` when it is False/:data:`CREATE_FAILED` for ``generation`` (a refusal
    of the API server to create children of this spec), else None."""
    cond = get_condition(conditions, type_)
    if cond is None or cond.status != "False" or cond.reason != CREATE_FAILED:
        return None
    return cond if cond.observed_generation == generation else None


def keep_from(new: list[Condition], old: list[Condition], types: tuple[str, ...]) -> list[Condition]:
    """``new`` with the conditions of ``types`` exactly as in ``old`` (dropped where ``old`` has
    none), e.g. to keep a refusal on show unchanged while retries fail."""
    previous = {c.type: c for c in old if c.type in types}
    kept = []
    for cond in new:
        if cond.type not in types:
            kept.append(cond)
        elif cond.type in previous:
            kept.append(previous.pop(cond.type))
    return kept + list(previous.values())
