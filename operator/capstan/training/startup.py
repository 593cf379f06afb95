"""Startup of a placed gang: why workers are not running yet, and when the gang has waited too long.

Pure. A gang Capstan placed pins each pod to a node; a pod that never binds there (the node's GPUs
were taken by a pod Capstan does not own, the node went away before binding) would leave the job
``Starting`` for ever. The lifecycle tears such a gang down after ``spec.startupTimeoutSeconds``
and places it again off the nodes where pods did not bind (:func:`unbound_nodes`); meanwhile the
``Running`` condition shows the scheduler's or the kubelet's own words (:func:`not_running_detail`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from capstan.api.conditions import parse_time

MAX_DETAILS = 3  # workers quoted in a condition message; the rest are counted


class _Worker(Protocol):
    """What these functions read of a worker (capstan.training.lifecycle.WorkerState)."""

    @property
    def rank(self) -> int: ...
    @property
    def phase(self) -> str: ...
    @property
    def node(self) -> str | None: ...
    @property
    def unscheduled(self) -> str: ...
    @property
    def waiting(self) -> str: ...


def not_running_detail(workers: Sequence[_Worker]) -> str:
    """What keeps the not-running ``workers`` from running, worker by worker (a few of them)."""
    parts = []
    for w in sorted(workers, key=lambda w: w.rank)[:MAX_DETAILS]:
        if w.unscheduled:
            parts.append(f"worker {w.rank} not scheduled: {w.unscheduled}")
        elif w.waiting:
            parts.append(f"worker {w.rank} {w.waiting}")
        elif w.node is None:
            parts.append(f"worker {w.rank} not bound to a node yet")
        else:
            parts.append(f"worker {w.rank} {w.phase} on {w.node}")
    more = len(workers) - MAX_DETAILS
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def startup_left(gang_created: str | None, timeout_s: int, now: datetime) -> float | None:
    """Seconds until the gang created at ``gang_created`` misses its startup timeout (None: unknown)."""
    created = parse_time(gang_created)
    if created is None:
        return None
    return timeout_s - (now - created).total_seconds()


def unbound_nodes(workers: Sequence[_Worker], placed: Sequence[str]) -> list[tuple[str, str, str]]:
    """(node, reason, message) for each worker not bound to the node it was placed on."""
    out = []
    for w in workers:
        if w.node is None and w.rank < len(placed):
            said = f": {w.unscheduled}" if w.unscheduled else ""
            out.append((placed[w.rank], "StartupTimeout", f"worker {w.rank} did not bind here{said}"))
    return out
