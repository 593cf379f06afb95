"""Rollouts without spare GPUs: borrow them from preemptible TrainingJobs while the rollout lasts.

With ``spec.rollout.borrow: PreemptibleJobs``, while canary pods cannot be scheduled for want of
GPUs, the ModelServing asks running TrainingJobs of its namespace marked ``spec.preemptible`` to
lend theirs: the annotation ``capstan.dev/lent-to: <ModelServing>`` on the job makes its own
reconcile save a checkpoint, stop the gang and hold phase ``Lent`` (condition ``Lent``); the GPUs
its gang held are then free for the canary's pods, and the placement queue keeps them from other
gangs. When the rollout ends (promoted or rolled back), or borrowing is turned off, the annotation
goes and the job returns to the queue, resuming from its checkpoint.

Level-based and pure: the lenders are read from the jobs' annotations each pass, so an operator
restart neither forgets a loan nor makes a second one. Lenders are picked lowest priority first,
then smallest, until they cover the GPUs short, and never beyond what the canary needs in all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from capstan.fields import dig
from capstan.labels import LENT_TO_ANNOTATION
from capstan.topology.inventory import parse_count, pod_gpu_request

#: Phases of a job that holds GPUs it can lend (or is stopping to lend them).
RUNNING_PHASES = ("Running",)


@dataclass(frozen=True)
class Lender:
    """A TrainingJob of the namespace, reduced to what lending needs."""

    name: str
    gpus: int
    priority: int
    phase: str
    lent_to: str
    preemptible: bool

    @property
    def can_lend(self) -> bool:
        """Preemptible, running and lending to nobody."""
        return self.preemptible and self.phase in RUNNING_PHASES and not self.lent_to


def lender_of(body: Mapping[str, Any]) -> Lender | None:
    """The lending view of a TrainingJob dict (None when it has no name)."""
    name = dig(body, "metadata", "name")
    if not name:
        return None
    spec = body.get("spec") or {}
    gpus = parse_count(spec.get("workers", 1)) * parse_count(spec.get("gpusPerWorker", 1))
    return Lender(
        name=str(name),
        gpus=gpus,
        priority=int(spec.get("priority") or 0),
        phase=str(dig(body, "status", "phase") or ""),
        lent_to=str(dig(body, "metadata", "annotations", LENT_TO_ANNOTATION) or ""),
        preemptible=spec.get("preemptible") is True,
    )


def unschedulable_gpus(pods: Sequence[Mapping[str, Any]]) -> int:
    """GPUs requested by pods the scheduler could not place (PodScheduled False, Unschedulable)."""
    total = 0
    for pod in pods:
        if dig(pod, "spec", "nodeName") or dig(pod, "metadata", "deletionTimestamp"):
            continue
        stuck = any(c.get("type") == "PodScheduled" and c.get("status") == "False"
                    and c.get("reason") == "Unschedulable" for c in dig(pod, "status", "conditions") or [])
        if stuck:
            total += pod_gpu_request(pod)
    return total


@dataclass
class BorrowPlan:
    """Loans to make and end in one pass, and what the Borrowing condition says."""

    lend: list[str] = field(default_factory=list)
    give_back: list[str] = field(default_factory=list)
    borrowed: list[str] = field(default_factory=list)  # lenders once this pass is applied
    active: bool = False
    reason: str = "NotNeeded"
    message: str = "no GPUs borrowed"


def plan_borrow(
    ms_name: str, *, allowed: bool, rolling_out: bool, short: int, canary_gpus: int,
    lenders: Sequence[Lender],
) -> BorrowPlan:
    """What to borrow for ModelServing ``ms_name``: ``short`` GPUs its canary's pods lack now,
    ``canary_gpus`` what its canary needs in all (the most ever borrowed), while ``rolling_out``
    and ``allowed`` (``rollout.borrow: PreemptibleJobs``); otherwise every loan ends."""
    mine = sorted((x for x in lenders if x.lent_to == ms_name), key=lambda x: x.name)
    out = BorrowPlan()
    if not (allowed and rolling_out):
        out.give_back = [x.name for x in mine]
        if mine:
            out.message = f"returned the GPUs of {', '.join(out.give_back)}: the rollout ended"
        return out
    # GPUs already promised: lenders still stopping will free theirs shortly.
    stopping = sum(x.gpus for x in mine if x.phase in RUNNING_PHASES)
    need = short - stopping
    held = sum(x.gpus for x in mine)
    chosen = list(mine)
    if need > 0:
        for x in sorted((x for x in lenders if x.can_lend), key=lambda x: (x.priority, x.gpus, x.name)):
            # never beyond what the canary needs in all (one first lender may be bigger than that)
            if need <= 0 or (held and held + x.gpus > canary_gpus):
                continue
            out.lend.append(x.name)
            chosen.append(x)
            need -= x.gpus
            held += x.gpus
    out.borrowed = sorted(x.name for x in chosen)
    if chosen:
        out.active, out.reason = True, "Borrowing"
        out.message = (f"borrowing {held} GPUs from TrainingJobs {', '.join(out.borrowed)} until the "
                       "rollout ends")
        if need > 0:
            out.message += f"; still {need} GPUs short"
    elif short > 0:
        out.reason = "NothingToBorrow"
        out.message = (f"canary pods lack {short} GPUs and no running TrainingJob of the namespace with "
                       "spec.preemptible can lend them")
    return out
