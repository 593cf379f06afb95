"""The Event type planners return; the kube shell posts them as core/v1 Events."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to emit on the reconciled object."""

    type: str  # Normal | Warning
    reason: str
    message: str
