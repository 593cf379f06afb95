"""Node quarantine: nodes a job's placement avoids for a while after a failure blamed on them.

Pure. The list lives in ``status.excludedNodes`` (the operator remembers it across restarts), each
entry with its expiry. Capstan's placement queue keeps the job's gang off the nodes still
excluded (:func:`avoided`); a gang the default scheduler places (CPU, Kueue) gets a node-affinity
term that keeps its pods off them (:func:`keep_off`).

Exclusion is per job, not cluster-wide: what blames a node is the job's own pods (their
termination messages, exit reasons), which any user can write; a job must not be able to take
nodes away from other tenants. Nodes that are really broken for everyone go NotReady or get
tainted, and placement already skips those for every job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from capstan.api.conditions import parse_time, rfc3339
from capstan.api.trainingjob import ExcludedNode

MAX_EXCLUDED = 64  # a job blamed on more nodes than this keeps the newest: the status stays small


def still_excluded(excluded: Sequence[ExcludedNode], now: datetime) -> list[ExcludedNode]:
    """The entries of ``excluded`` whose expiry is after ``now``."""
    out = []
    for entry in excluded:
        until = parse_time(entry.until)
        if until is not None and until > now:
            out.append(entry)
    return out


def avoided(excluded: Sequence[ExcludedNode], now: datetime | None) -> frozenset[str]:
    """Names of the nodes placement avoids at ``now`` (None: every listed node)."""
    if now is None:
        return frozenset(e.node for e in excluded)
    return frozenset(e.node for e in still_excluded(excluded, now))


def exclude(
    excluded: Sequence[ExcludedNode],
    new: Iterable[tuple[str, str, str]],
    now: datetime,
    seconds: int,
) -> tuple[list[ExcludedNode], list[ExcludedNode]]:
    """``excluded`` without expired entries, plus ``new`` (node, reason, message) for ``seconds``.

    A node already listed gets the new reason and expiry. Returns (the new list, the entries added
    or renewed). ``seconds`` = 0 excludes nothing.
    """
    kept = {e.node: e for e in still_excluded(excluded, now)}
    added: list[ExcludedNode] = []
    if seconds > 0:
        until = rfc3339(now + timedelta(seconds=seconds))
        for node, reason, message in new:
            entry = ExcludedNode(node=node, reason=reason, message=message[:300], until=until)
            kept.pop(node, None)
            kept[node] = entry  # re-inserted: newest last
            if all(a.node != node for a in added):
                added.append(entry)
    entries = list(kept.values())[-MAX_EXCLUDED:]
    return entries, added


def keep_off(pod: dict[str, Any], nodes: Iterable[str]) -> dict[str, Any]:
    """``pod`` with a required node-affinity term that keeps it off ``nodes`` (unchanged if none).

    Every existing ``nodeSelectorTerm`` (they are ORed) gets the ``metadata.name NotIn`` field
    requirement, so no term lets the pod onto an excluded node.
    """
    names = sorted(set(nodes))
    if not names:
        return pod
    spec = dict(pod.get("spec") or {})
    affinity = dict(spec.get("affinity") or {})
    node_affinity = dict(affinity.get("nodeAffinity") or {})
    required = dict(node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = [dict(t) for t in required.get("nodeSelectorTerms") or []] or [{}]
    rule = {"key": "metadata.name", "operator": "NotIn", "values": names}
    for term in terms:
        term["matchFields"] = [*(term.get("matchFields") or []), rule]
    required["nodeSelectorTerms"] = terms
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = required
    affinity["nodeAffinity"] = node_affinity
    spec["affinity"] = affinity
    return {**pod, "spec": spec}
