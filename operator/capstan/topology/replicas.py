"""Tensor-parallel serving replicas: every replica's GPUs inside one NVLink domain.

A replica that fits on one node becomes one pod there. A bigger one (e.g. TP=16 on GB200 NVL72,
4 GPUs per node) becomes a gang of ``gpus_per_replica / gpus_per_pod`` pods inside one
``nvidia.com/gpu.clique``, placed with ``Required`` at the ``nvlink`` level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .gang import GangRequest, place_gang
from .inventory import Inventory


@dataclass(frozen=True)
class ReplicaPlacement:
    """Outcome of :func:`place_replicas`.

    ``replicas[k]`` lists the node of each pod of replica ``k`` (one entry per pod, each pod taking
    ``gpus_per_pod`` GPUs). ``placed`` is true only if all requested replicas were placed; the
    ones that fit are still listed, so a caller may scale up partially. ``inventory`` is the
    input inventory with the listed replicas allocated.
    """

    placed: bool
    replicas: list[list[str]] = field(default_factory=list)
    gpus_per_pod: int = 0
    reason: str = ""
    inventory: Inventory | None = None


def place_replicas(inventory: Inventory, replicas: int, gpus_per_replica: int, *,
                   gpus_per_pod: int | None = None, tolerations: Sequence[Mapping[str, Any]] = (),
                   needs_rdma: bool = False, gpu_product: str | None = None,
                   name: str = "replica") -> ReplicaPlacement:
    """Place ``replicas`` replicas of ``gpus_per_replica`` GPUs, each within one NVLink domain.

    ``gpus_per_pod`` defaults to the whole replica when some schedulable node has that many GPUs
    allocatable, else to the largest per-node GPU count that divides the replica (multi-node
    replica inside one clique). Replicas are placed one by one, BestFit, so they pack tightly.
    """
    if replicas < 0 or gpus_per_replica < 1:
        raise ValueError("replicas must be >= 0 and gpus_per_replica >= 1")
    if gpus_per_pod is None:
        gpus_per_pod = _default_pod_size(inventory, gpus_per_replica, tolerations, needs_rdma, gpu_product)
    if gpus_per_pod < 1 or gpus_per_replica % gpus_per_pod:
        return ReplicaPlacement(False, gpus_per_pod=gpus_per_pod, inventory=inventory,
                                reason=f"{gpus_per_replica} GPUs per replica cannot be split into pods of "
                                       f"{gpus_per_pod} GPUs on the schedulable nodes")
    placed: list[list[str]] = []
    inv = inventory
    for k in range(replicas):
        req = GangRequest(f"{name}-{k}", gpus_per_replica // gpus_per_pod, gpus_per_pod, policy="Required",
                          max_domain="nvlink", needs_rdma=needs_rdma, tolerations=tolerations,
                          gpu_product=gpu_product)
        res = place_gang(inv, req)
        if not res.placed:
            return ReplicaPlacement(False, placed, gpus_per_pod, inventory=inv,
                                    reason=f"replica {k + 1} of {replicas}: {res.reason}")
        inv = inv.allocate(res)
        placed.append(res.nodes)
    return ReplicaPlacement(True, placed, gpus_per_pod, inventory=inv)


def _default_pod_size(inv: Inventory, gpus: int, tolerations: Sequence[Mapping[str, Any]],
                      needs_rdma: bool, product: str | None) -> int:
    elig = inv._eligible(tolerations, needs_rdma, product)
    sizes = {n.gpus for n, e in zip(inv.nodes, elig, strict=True) if e and n.gpus > 0}
    if not sizes or max(sizes) >= gpus:
        return gpus
    divisors = [s for s in sizes if gpus % s == 0]
    return max(divisors) if divisors else max(sizes)
