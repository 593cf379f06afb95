"""Topology-aware placement for Capstan: pure functions over plain Kubernetes JSON.

Typical use by the operator::

    levels = config.topology_levels                  # $CAPSTAN_TOPOLOGY_LEVELS or defaults
    inv = build_inventory(node_dicts, pod_dicts, levels)
    res = place_gang(inv, GangRequest("job", workers=4, gpus_per_worker=8, policy="Required"))
    if res.placed: pin pod rank r to res.nodes[r]; status.placement = {domain, nodes}
    else: report res.reason

For many gangs use :func:`schedule_queue` (priority, age, backfill with a head reservation).
No I/O and no Kubernetes client here; results are deterministic.
"""

from .gang import (
    POLICIES,
    GangRequest,
    PlacementResult,
    Policy,
    fits,
    narrowest_level,
    place_gang,
    place_when_freed,
    placed_level,
    releases_until_fit,
)
from .inventory import (
    Inventory,
    NodeInfo,
    build_inventory,
    parse_count,
    pinned_node,
    pod_gpu_request,
    tolerates,
)
from .levels import (
    CLUSTER_LEVEL,
    DEFAULT_LEVELS,
    LEVELS_ENV,
    TopologyLevel,
    TopologyLevels,
    display_level,
    levels_from_env,
    parse_levels,
)
from .moves import MovableGang, Move, MovePolicy, plan_defragmentation, plan_locality_moves
from .policy import (
    DEFAULT_SLOWDOWN,
    QueuePolicy,
    parse_slowdown,
    queue_policy_from_env,
)
from .queue import Decision, Reservation, RunningGang, queue_order, schedule_queue
from .replicas import ReplicaPlacement, place_replicas

__all__ = [
    "CLUSTER_LEVEL",
    "DEFAULT_LEVELS",
    "DEFAULT_SLOWDOWN",
    "LEVELS_ENV",
    "POLICIES",
    "Decision",
    "GangRequest",
    "Inventory",
    "MovableGang",
    "Move",
    "MovePolicy",
    "NodeInfo",
    "PlacementResult",
    "Policy",
    "QueuePolicy",
    "ReplicaPlacement",
    "Reservation",
    "RunningGang",
    "TopologyLevel",
    "TopologyLevels",
    "build_inventory",
    "display_level",
    "fits",
    "levels_from_env",
    "narrowest_level",
    "parse_count",
    "parse_levels",
    "parse_slowdown",
    "pinned_node",
    "place_gang",
    "place_replicas",
    "place_when_freed",
    "placed_level",
    "plan_defragmentation",
    "plan_locality_moves",
    "pod_gpu_request",
    "queue_order",
    "queue_policy_from_env",
    "releases_until_fit",
    "schedule_queue",
    "tolerates",
]
