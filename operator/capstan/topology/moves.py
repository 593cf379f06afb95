"""Defragmentation: moving running gangs (checkpoint, restart elsewhere) so a waiting gang fits.

A waiting gang that would fit by GPU count but not by shape (the idle GPUs are scattered over
partly used nodes) gets whole nodes: the one-worker gangs on the nodes cheapest to clear move onto
other partly used nodes. The idea is Gandiva's (Xiao et al., OSDI'18), which migrates jobs to
undo fragmentation.

Only gangs the caller marks movable are considered, and only after they have run ``min_run_s``
since their last (re)start, so no gang is moved over and over. A move must pay for itself: when
the running gangs' expected ends are known, the waiting gang's gain (its GPUs x how much sooner it
starts than at its soonest slot without moves) must exceed the modelled cost (each mover's GPUs x
its restart downtime plus the work it loses since its last checkpoint). :func:`plan_locality_moves`
does the same for a gang that would start now but spread over a wider domain than it could fit in:
the moves clear room in the narrower domain when the run time that saves it (its GPUs x declared
run time x the slowdown difference) exceeds their cost. While another gang waits for GPUs, a
locality move's movers restart on the nodes the gang would have spread over, so the move changes
only where that gang runs: it leaves no whole node behind that the waiting gangs would then take,
which would fill the scattered slots one-worker jobs arriving next need (defragmentation for the
waiting gangs, :func:`plan_defragmentation`, is a separate choice). Every move names its destination;
the caller restarts the gang there (it resumes from its checkpoint). Pure and deterministic, like
the rest of :mod:`capstan.topology`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from .gang import GangRequest, PlacementResult, _most_for, fits, narrowest_level, place_gang, placed_level
from .inventory import Inventory
from .levels import CLUSTER_LEVEL, display_level
from .queue import RunningGang, _reserve_by_end_times, _shape, queue_order


@dataclass(frozen=True)
class MovableGang:
    """A running gang the operator may move: its request, where it runs, and since when."""

    request: GangRequest  # shape and constraints; ``request.name`` names the gang
    result: PlacementResult  # where it runs now
    running_since: float  # when its current gang started running (seconds, the queue's clock)


@dataclass(frozen=True)
class Move:
    """Restart gang ``gang`` on ``to``; ``for_gang`` is the waiting gang this makes room for,
    ``for_level`` the domain level the room is made in when the move is for locality (that gang
    fits now, spread: it is held to that level until the moves are done)."""

    gang: str
    to: PlacementResult
    reason: str
    for_gang: str | None = None
    for_level: str | None = None


@dataclass(frozen=True)
class MovePolicy:
    """Limits on moves."""

    min_run_s: float = 600.0  # a gang runs at least this long between moves
    # the modelled cost of a move, per GPU moved: the gang is down ``restart_s`` (stop, reschedule,
    # load the checkpoint) and redoes the work since its last checkpoint, expected half of
    # ``checkpoint_every_s`` (at most what it has run)
    restart_s: float = 300.0
    checkpoint_every_s: float = 1800.0

    def cost_gpu_s(self, gang: MovableGang, now: float) -> float:
        """Modelled GPU-seconds a move of ``gang`` at ``now`` costs (downtime plus lost work)."""
        lost = min(max(0.0, now - gang.running_since), self.checkpoint_every_s / 2)
        return gang.request.total_gpus * (self.restart_s + lost)


def plan_defragmentation(inventory: Inventory, waiting: Sequence[GangRequest],
                         movable: Sequence[MovableGang], now: float,
                         policy: MovePolicy | None = None,
                         running: Sequence[RunningGang] = ()) -> list[Move]:
    """Moves that let the first waiting gang (queue order) blocked only by fragmentation start.

    A waiting gang qualifies when the cluster has enough idle GPUs for it but no placement. The
    nodes to give it are the ones needing the fewest GPUs moved, within the narrowest domain that
    has enough of them (up to ``max_domain`` for a Required gang); the single-node gangs on them
    must all fit elsewhere, off those nodes, and the waiting gang must then fit. When every
    gang in ``running`` (all gangs holding GPUs, movers included) has an ``expected_end``, the
    moves must also pay: the waiting gang's GPUs x (its soonest start without moves - ``now``)
    must exceed the movers' :meth:`MovePolicy.cost_gpu_s`; unknown ends skip that test. Returns
    [] when no waiting gang qualifies; at most one gang is helped per call.
    """
    pol = policy or MovePolicy()
    if not movable:
        return []
    by_node = _MoversByNode(inventory, movable, now, pol)
    for req in queue_order(waiting):
        if req.gpus_per_worker == 0 or req.total_gpus > inventory.free_gpus:
            continue
        if fits(inventory, req):
            continue  # it waits by choice (a reservation, a locality wait), not for want of shape
        moved = _clear_room(inventory, req, by_node)
        if moved and _pays(inventory, req, [m for _, m in moved], running, now, pol):
            return [mv for mv, _ in moved]
    return []


def plan_locality_moves(inventory: Inventory, pending: Sequence[GangRequest],
                        movable: Sequence[MovableGang], now: float, slowdown: Mapping[str, float],
                        policy: MovePolicy | None = None) -> list[Move]:
    """Moves that let the first pending gang (queue order) that would start now, but spread over a
    wider domain than one it could fit in, start in the narrower domain instead.

    Considers Preferred multi-worker gangs that declare ``expected_duration_s``. The narrowest
    level first: the moves (as :func:`plan_defragmentation` picks them) must cost less
    (:meth:`MovePolicy.cost_gpu_s`) than the run time the narrower domain saves the gang, its
    GPUs x ``expected_duration_s`` x (``slowdown`` of the level it would span now - that of the
    narrower one). Each move's ``for_level`` names that level; the caller holds the gang to it
    (``policy="Required"``, ``max_domain=for_level``) until the moves are done. When some gang in
    ``pending`` does not fit now (it waits for GPUs), the movers restart on the nodes the gang
    would have spread over where they fit there (else wherever they fit best), so the move frees
    no whole node for the waiting gangs. Returns [] when no gang qualifies; at most one gang is
    helped per call.
    """
    pol = policy or MovePolicy()
    if not movable:
        return []
    by_node = _MoversByNode(inventory, movable, now, pol)
    congested: bool | None = None  # whether some pending gang waits for GPUs; found when needed
    levels = inventory.levels
    tried: set[tuple[object, ...]] = set()  # shapes with no paying moves: same answer this call
    for req in queue_order(pending):
        dur = req.expected_duration_s
        if req.policy != "Preferred" or req.workers < 2 or req.gpus_per_worker == 0 or not dur:
            continue
        shape = (_shape(req), dur)
        if shape in tried:
            continue
        tried.add(shape)
        spread = placed_level(inventory, req)
        if spread is None:
            continue  # it waits anyway: plan_defragmentation's case
        ideal = narrowest_level(inventory, req)
        if ideal is None or levels.index(ideal) >= levels.index(spread):
            continue
        s_now = slowdown.get(spread, 1.0)
        onto: set[str] | None = None
        for li in range(levels.index(ideal), levels.index(spread)):
            level = levels.levels[li].name
            gain = req.total_gpus * dur * (s_now - slowdown.get(level, 1.0))
            if gain <= 0:
                continue
            if congested is None:
                congested = _any_blocked(inventory, pending)
            if congested and onto is None:
                onto = set(place_gang(inventory, req).nodes)  # where it would go now
            moved = _clear_room(inventory, replace(req, policy="Required", max_domain=level), by_node,
                                onto if congested else None)
            if moved and sum(pol.cost_gpu_s(m, now) for _, m in moved) < gain:
                why = (f"making room for {req.name} in one {display_level(level)} (placed now it would "
                       f"span a {display_level(spread)} and run slower)")
                return [replace(mv, reason=why, for_level=level) for mv, _ in moved]
    return []


def _any_blocked(inv: Inventory, requests: Sequence[GangRequest]) -> bool:
    """Whether some request does not fit in ``inv`` now (it waits for GPUs whatever the others do)."""
    seen: set[object] = set()
    for req in requests:
        shape = _shape(req)
        if shape not in seen:
            seen.add(shape)
            if not fits(inv, req):
                return True
    return False


class _MoversByNode:
    """One-worker gangs that may move now, by the index of the node they run on (in the
    inventory), in the order a node is cleared: fewest GPUs first, then the gang running the
    shortest time (it has the least to lose). Gangs on nodes the inventory does not know are
    left out.

    Grouped when first asked (a pass where no gang needs room cleared groups none), at C speed
    where each node runs one gang, and filtered and ordered only for the nodes asked for: a
    clearing looks at the few domains that can be cheapest, not at every node.
    """

    def __init__(self, inv: Inventory, movable: Sequence[MovableGang], now: float, pol: MovePolicy) -> None:
        self._movable, self._now, self._min_run = movable, now, pol.min_run_s
        self._names = inv._topo.names
        self._last: dict[str, int] | None = None  # node -> its (last) gang; grouped when first asked
        # nodes with more than one gang: every position, in order
        self._several: dict[str, list[int]] = {}
        self._seen: dict[int, list[MovableGang] | None] = {}

    def _group(self) -> dict[str, int]:
        firsts = [m.result.nodes[0] if m.result.nodes else "" for m in self._movable]
        last = self._last = dict(zip(firsts, range(len(firsts)), strict=True))
        if len(last) < len(firsts):
            several: dict[str, list[int]] = {}
            for k, first in enumerate(firsts):
                several.setdefault(first, []).append(k)
            self._several = {n: ks for n, ks in several.items() if len(ks) > 1}
        return last

    def get(self, i: int) -> list[MovableGang] | None:
        """The gangs to move off node ``i``, in clearing order; None when there are none."""
        if i in self._seen:
            return self._seen[i]
        last = self._last if self._last is not None else self._group()
        name = self._names[i]
        at = self._several.get(name)
        if at is None:
            k = last.get(name)
            at = [] if k is None else [k]
        now, min_run = self._now, self._min_run
        gangs = [m for m in map(self._movable.__getitem__, at)
                 if m.request.workers == 1 and m.request.gpus_per_worker > 0 and len(m.result.nodes) == 1
                 and now - m.running_since >= min_run]
        if len(gangs) > 1:
            gangs.sort(key=lambda m: (m.request.total_gpus, -m.running_since, m.request.name))
        out = self._seen[i] = gangs or None
        return out


def _pays(inv: Inventory, req: GangRequest, movers: Sequence[MovableGang],
          running: Sequence[RunningGang], now: float, pol: MovePolicy) -> bool:
    """Whether starting ``req`` now is worth more GPU-seconds than moving ``movers`` costs."""
    if not running or any(r.expected_end is None for r in running):
        return True  # no model of when it would start otherwise: fragmentation alone decides
    slot = _reserve_by_end_times(inv, req, running, parent_tiebreak=True)
    if slot is None or slot.shadow_time is None:
        return True  # nothing known frees room for it: without moves it has no start in sight
    cost = sum(pol.cost_gpu_s(m, now) for m in movers)
    return req.total_gpus * (slot.shadow_time - now) > cost


def _destinations(inv: Inventory, movers: Sequence[MovableGang],
                  onto: set[str] | None) -> list[PlacementResult] | None:
    """Where each of ``movers`` restarts, in order (only on nodes ``onto`` when given); None when
    one does not fit."""
    view, own = inv, False  # own: a view made here, which the next one may take the lists of
    if onto is not None:
        alloc, used = inv._topo.alloc, inv._used
        view = inv.add_usage({n.name: a - u for n, a, u in zip(inv.nodes, alloc, used, strict=True)
                              if a > u and n.name not in onto})
        own = True
    out: list[PlacementResult] = []
    for m in movers:
        to = place_gang(view, replace(m.request, policy="Preferred"))
        if not to.placed:
            return None
        gpus = to.gpus_by_node()
        view = view._with_usage(gpus, check=True, reuse=own)
        own = True
        out.append(to)
    return out


# a node to clear: (GPUs to move off it, its index, the gangs to move); index order is name order
_Clearing = tuple[int, int, list[MovableGang]]


def _cheapest_clearing(inv: Inventory, req: GangRequest,
                       by_node: _MoversByNode) -> list[_Clearing] | None:
    """The nodes to clear for ``req`` (one worker each): in the narrowest level's domain where
    clearing ``req.workers`` of them moves the fewest GPUs (more than none), lowest domain first on
    ties, each domain's cheapest nodes (then by name); None when no domain qualifies."""
    gpw, want = req.gpus_per_worker, req.workers
    elig = inv._eligible(req.tolerations, req.needs_rdma, req.gpu_product, req.avoid_nodes)
    topo = inv._topo
    alloc, used, mine = topo.alloc, inv._used, by_node.get

    def clearings(members: Sequence[int]) -> list[_Clearing]:
        # each node that can take a worker once cleared: what clearing it moves, cheapest first
        out: list[_Clearing] = []
        for i in members:
            a = alloc[i]
            if a < gpw or not elig[i]:
                continue
            u = used[i]
            need = gpw - (a - u if a > u else 0)
            if need <= 0:
                out.append((0, i, []))
                continue
            movers = mine(i)
            if not movers:
                continue
            moved = 0
            for k, m in enumerate(movers):  # in the order a node is cleared
                moved += m.request.total_gpus
                if moved >= need:
                    out.append((moved, i, movers[: k + 1]))
                    break
        out.sort()  # indices are unique: by GPUs moved, then by name
        return out

    names = inv.levels.names
    required = req.policy == "Required"
    allowed = names[: names.index(req.max_domain) + 1] if required else [*names, CLUSTER_LEVEL]
    most = _most_for(inv, req)
    room = inv._room(req.tolerations, req.needs_rdma, req.gpu_product, req.avoid_nodes, gpw)
    for level in allowed:
        if level == CLUSTER_LEVEL:
            domains: list[tuple[int, int, Sequence[int]]] = [(1, 0, range(len(alloc)))]
        else:
            li = names.index(level)
            if most[li] < want:
                continue  # even empty no domain here holds the gang (a node holds one worker or more)
            # a domain moves at least the GPUs its workers need beyond the free ones it has
            # (and more than none): look at domains from that bound up, and stop once it passes
            # the cheapest found; domain ids sort as their keys do, so ties still break by name
            domains = sorted((max(1, want * gpw - free), d, nodes) for d, (free, nodes)
                             in enumerate(zip(room.dfree[li], topo.members(li), strict=True))
                             if len(nodes) >= want)
        best: tuple[int, int, list[_Clearing]] | None = None
        for bound, d, nodes in domains:
            if best is not None and bound > best[0]:
                break
            chosen = clearings(nodes)[:want]
            if len(chosen) == want:
                cost = sum(c[0] for c in chosen)
                if cost and (best is None or (cost, d) < best[:2]):
                    best = (cost, d, chosen)
        if best is not None:
            return best[2]
    return None


def _clear_room(inv: Inventory, req: GangRequest, by_node: _MoversByNode,
                onto: set[str] | None = None) -> list[tuple[Move, MovableGang]]:
    """Moves that clear nodes for ``req``, cheapest in GPUs moved in the narrowest domain, each with
    the gang it moves; [] if none. With ``onto`` the movers restart on those nodes where they all
    fit there."""
    best = _cheapest_clearing(inv, req, by_node)
    if best is None:
        return []
    chosen_nodes = {inv.nodes[c[1]].name for c in best}
    movers = [m for c in best for m in c[2]]
    given: dict[str, int] = {}
    for m in movers:
        for n, g in m.result.gpus_by_node().items():
            given[n] = given.get(n, 0) - g
    freed = inv.add_usage(given)  # usage floors at zero either way: as releasing them one by one
    block = {n: freed.node(n).gpus - freed.used(n) for n in chosen_nodes}
    elsewhere = freed.add_usage(block)
    order = sorted(movers, key=lambda m: (-m.request.total_gpus, m.request.name))
    tos = (_destinations(elsewhere, order, onto) if onto is not None else None) or _destinations(
        elsewhere, order, None)
    if tos is None:
        return []
    why = f"making room for {req.name} ({req.total_gpus} GPUs; the idle ones are scattered over nodes)"
    moves = [(Move(m.request.name, to, why, req.name), m) for m, to in zip(order, tos, strict=True)]
    taken = {n: -g for n, g in block.items()}
    for to in tos:
        for n, g in to.gpus_by_node().items():
            taken[n] = taken.get(n, 0) + g
    after = elsewhere.add_usage(taken)
    return moves if fits(after, req) else []


__all__ = ["MovableGang", "Move", "MovePolicy", "plan_defragmentation", "plan_locality_moves"]
