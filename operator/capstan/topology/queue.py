"""Priority queue of gangs with EASY-style backfill around a reservation for the queue head.

Order: priority (high first), then submission time, then name. Gangs are placed in order until
one does not fit: that one is the *head*. The head gets a reservation: the GPUs it would get
soonest. With every running gang's expected end known, running gangs are released in that order
until the head fits (the *shadow time*), and the reservation is pinned to GPUs that free by then
rather than ones idle now where that costs no locality (idle GPUs outside it stay open to every
backfill); otherwise the reservation is the placement that waits on the fewest GPUs held by
others (``place_when_freed``). Gangs behind the head may start (backfill) only on GPUs outside
the reservation, or anywhere if their declared duration ends before the shadow time.

Guarantee kept (the starvation guard): once a gang is the reserved head, no gang behind it in
queue order takes its reserved GPUs unless that gang's declared limit ends by the shadow time, so
the head starts no later than the shadow time when declared limits hold, and in any case as
soon as the gangs holding its reserved GPUs end. The reservation is kept between passes (pass it
back in) and only moves to an earlier (or equally early, less idle) slot, or with unknown run
times to one waiting on strictly fewer busy GPUs, so it is never chased forever. Gangs of higher
priority may still go ahead of it. With ``reserve_after_s`` > 0 a blocked gang becomes eligible
for the reservation only after waiting that long: a gang's wait is then at most
``reserve_after_s`` plus the time until its reserved GPUs free, once the gangs ahead of it have
started. ``locality_wait_s`` adds delay scheduling: a Preferred gang that could fit inside one
narrow domain waits up to that long (and at most ``locality_wait_fraction`` of its declared run
time) for room there before it is placed wider; such a voluntary wait reserves nothing. With
``locality_slowdown`` (run-time multiplier per span level) the wait is cost-based instead: a gang
waits only while the expected time until a narrower domain holds it, from running gangs'
expected ends, is shorter than the run time spreading now would cost it (times
``locality_wait_fraction``). Without it (the default, and the operator's path: it knows no run
times) there is no cost-based wait.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from .gang import (
    GangRequest,
    PlacementResult,
    _releases_until_fit,
    narrowest_level,
    place_gang,
    place_when_freed,
)
from .inventory import Inventory, _freeze
from .levels import CLUSTER_LEVEL, display_level


@dataclass(frozen=True)
class RunningGang:
    """A placed gang still holding GPUs; ``expected_end`` (seconds) is None when unknown."""

    result: PlacementResult
    started: float = 0.0
    expected_end: float | None = None


@dataclass(frozen=True)
class Reservation:
    """GPUs held back for the queue head: where it will run and when it is expected to start."""

    head: str
    placement: PlacementResult  # the head's future placement (nodes per rank)
    shadow_time: float | None  # expected start; None when running gangs' ends are unknown

    def gpus_by_node(self) -> dict[str, int]:
        """Reserved GPUs per node."""
        return self.placement.gpus_by_node()


@dataclass(frozen=True)
class Decision:
    """What the queue did with one request this pass."""

    request: GangRequest
    result: PlacementResult
    backfilled: bool = False  # started while a gang ahead of it waits
    reservation: Reservation | None = None  # set on the blocked head only
    # a gang that fits now but waits for room in a narrower domain: that level (defragmentation
    # may make the room; see :meth:`wanted`)
    waits_for: str | None = None

    def wanted(self) -> GangRequest:
        """The request as what it waits for: held to ``waits_for`` when it waits for locality."""
        if self.waits_for is None:
            return self.request
        return replace(self.request, policy="Required", max_domain=self.waits_for)

    @property
    def name(self) -> str:
        """The request's name."""
        return self.request.name

    @property
    def placed(self) -> bool:
        """Whether the gang starts now."""
        return self.result.placed

    @property
    def reason(self) -> str:
        """Why the gang waits (empty when placed)."""
        return self.result.reason


def queue_order(requests: Sequence[GangRequest]) -> list[GangRequest]:
    """Requests in scheduling order: priority descending, then submitted, then name."""
    return sorted(requests, key=lambda r: (-r.priority, r.submitted, r.name))


def schedule_queue(inventory: Inventory, requests: Sequence[GangRequest], *,
                   running: Sequence[RunningGang] = (), now: float = 0.0,
                   reservation: Reservation | None = None, backfill: bool = True,
                   reserve_after_s: float = 0.0, parent_tiebreak: bool = True,
                   fragmentation_aware: bool = True, locality_wait_s: float = 0.0,
                   locality_wait_fraction: float = 1.0,
                   locality_slowdown: Mapping[str, float] | None = None,
                   guard_by_wait: bool = False) -> list[Decision]:
    """One scheduling pass over ``requests``; returns one Decision per request, in queue order.

    ``inventory`` must already count ``running`` gangs as used. Placed decisions should be
    allocated by the caller (``Inventory.allocate``) before the next pass. ``reservation`` is the
    previous pass's head reservation (from ``Decision.reservation``); it is kept while the same
    gang is head and the reserved nodes can still take it. ``backfill=False`` is strict FIFO.
    ``reserve_after_s`` > 0 is a starvation guard instead of an immediate reservation: a head that
    has waited less than that (``now - submitted``) gets none, so everything behind it may start
    where it fits; once it has waited that long it is reserved for as above, so its wait stays
    bounded while short waits cost small gangs nothing. ``fragmentation_aware`` and
    ``parent_tiebreak`` are passed to :func:`place_gang`. ``locality_wait_s`` > 0 turns on delay
    scheduling for Preferred multi-worker gangs (see the module text); 0 (default) is off.

    ``locality_slowdown`` (level name -> run-time multiplier of a gang spanning that level, e.g.
    ``{"nvlink": 1.0, "rack": 1.15, ...}``) makes that wait cost-based instead: a Preferred
    multi-worker gang with a declared ``expected_duration_s`` that would be placed now at a wider
    level than the narrowest one it could ever fit in waits iff, releasing running gangs in order
    of ``expected_end``, one narrower domain holds it by a time ``t`` with
    ``t - now < locality_wait_fraction * (slowdown(level now) - slowdown(narrower level))
    * expected_duration_s`` (the narrower level minimising ``t + slowdown * duration`` is chosen;
    a fraction below 1 trades some locality for fewer GPUs left idle while a gang waits). The wait reserves
    nothing, so GPUs it leaves free stay open to every other gang; it is re-decided every pass.
    It needs every running gang's ``expected_end``; ``locality_wait_s`` > 0 then caps the time
    since submission during which a gang may wait this way. None (default) leaves it off (the
    operator has no durations), and ``locality_wait_s`` alone keeps the fixed wait.

    ``guard_by_wait`` (with ``reserve_after_s`` > 0) makes the starvation guard follow the blocked
    gang itself: a gang that declares ``expected_duration_s`` becomes eligible for the reservation
    once it has waited ``reserve_after_s`` and as long as it will run (a gang longer than that
    bound is held back by a short wait no more than a short gang is), and any gang is reserved for
    only once it has also waited at least as long as the reservation would still make it wait
    (shadow time - now, when running gangs' ends are known): a reservation holds GPUs idle and
    keeps gangs behind out until its shadow time, so a gang is made to cost others that only when
    its own wait has grown as large. A head already reserved for keeps its reservation, so its
    wait stays bounded: about twice the longest of ``reserve_after_s``, its run time and the
    longest declared limit running, once gangs ahead of it have started.
    """
    # the locality wait places a gang to see how wide it would start; the queue then places the
    # same gang on the same inventory: remember the last answers (identity-checked) for that
    placed_on: dict[tuple[int, int], tuple[Inventory, GangRequest, PlacementResult]] = {}

    def place(at: Inventory, req: GangRequest) -> PlacementResult:
        seen = placed_on.get((id(at), id(req)))
        if seen is not None and seen[0] is at and seen[1] is req:
            return seen[2]
        res = place_gang(at, req, parent_tiebreak=parent_tiebreak, fragmentation_aware=fragmentation_aware)
        if len(placed_on) > 64:
            placed_on.clear()
        placed_on[id(at), id(req)] = (at, req, res)
        return res

    inv = inventory
    masked: Inventory | None = None  # inv minus the reservation: what backfill may use
    head: Reservation | None = None
    decisions: list[Decision] = []
    fail_masked: dict[object, str] = {}  # shape -> reason; valid because free GPUs only shrink
    fail_open: dict[object, str] = {}

    ideal: dict[object, str | None] = {}
    cost_based = locality_slowdown is not None
    # gangs started this pass hold GPUs too: the cost-based wait must see when they end
    ends = [r.expected_end for r in running]
    known_ends = None not in ends
    # running gangs by expected end, sorted once: the live view adds the gangs started here, the
    # head's reservation releases only the ones running before the pass
    ended: list[_Releases] = []  # built when first needed

    def by_end() -> _Releases:
        if not ended:
            ended.append(_Releases(running, ends))
        return ended[0]

    live = by_end().copy() if cost_based and known_ends else None
    # once a start has made inv a view of this pass's own (read only through inv), the next start
    # takes over its lists instead of copying them; masked is always the pass's own
    inv_own = False

    def start(shown: GangRequest, req: GangRequest, res: PlacementResult) -> None:
        # every start takes its GPUs from the open view and, past a reserved head, the masked one
        nonlocal inv, masked, inv_own
        gpus = res.gpus_by_node()
        inv = inv._with_usage(gpus, check=True, reuse=inv_own)
        inv_own = True
        if live is not None:
            live.add(_started(req, res, now, locality_slowdown))
        if masked is not None:
            masked = masked._take_usage(gpus)
        decisions.append(Decision(shown, res, backfilled=masked is not None))

    for orig in queue_order(requests):
        req = orig
        if (live is not None and orig.policy == "Preferred" and orig.workers > 1
                and orig.gpus_per_worker > 0 and orig.expected_duration_s is not None
                and (locality_wait_s <= 0 or now - orig.submitted < locality_wait_s)
                and not _known_not_to_fit(key := _shape(orig), fail_open,
                                          None if masked is None else fail_masked)):
            assert locality_slowdown is not None
            if key not in ideal:
                ideal[key] = narrowest_level(inventory, orig)
            wait = _locality_wait(inv if masked is None else masked, orig, ideal[key], live, place, now=now,
                                  slowdown=locality_slowdown, fraction=locality_wait_fraction)
            if wait is not None:
                level, at, spread, gain = wait
                decisions.append(Decision(orig, _waiting(orig, (
                    f"waiting for room in one {display_level(level)}, expected in {at - now:.0f}s; "
                    f"placed now it would span a {display_level(spread)} and run about {gain:.0f}s "
                    f"longer")), waits_for=level))
                continue
        elif (locality_wait_s > 0 and not cost_based and orig.policy == "Preferred" and orig.workers > 1
                and orig.gpus_per_worker > 0):
            limit = locality_wait_s
            if orig.expected_duration_s is not None:
                limit = min(limit, locality_wait_fraction * orig.expected_duration_s)
            if now - orig.submitted < limit:
                key = _shape(orig)
                if key not in ideal:
                    ideal[key] = narrowest_level(inventory, orig)
                if ideal[key] is not None:
                    # delay scheduling: only the narrowest domain it could ever fit in, for now
                    req = replace(orig, policy="Required", max_domain=ideal[key] or "")
        if req is not orig:
            shape = _shape(req)
            target = masked if masked is not None else inv
            if shape not in fail_masked:
                res = place(target, req)
                if res.placed:
                    start(orig, req, res)
                    continue
                fail_masked[shape] = (
                    f"waiting up to {limit:.0f}s from submission for room in one "
                    f"{display_level(req.max_domain)} (it would run slower spread wider)")
            decisions.append(Decision(orig, _waiting(orig, fail_masked[shape])))
            continue
        if masked is None:
            shape = _shape(req)
            if shape in fail_open:  # free GPUs only shrink during a pass: still does not fit
                res = _waiting(req, fail_open[shape])
            else:
                res = place(inv, req)
                if res.placed:
                    start(req, req, res)
                    continue
                fail_open[shape] = res.reason
            waited = now - req.submitted
            threshold = reserve_after_s
            if guard_by_wait and req.expected_duration_s is not None and reserve_after_s > 0:
                threshold = max(threshold, req.expected_duration_s)
            if waited < threshold:
                decisions.append(Decision(req, res))  # not waited long enough to hold others back
                continue
            head = _reserve(inventory, inv, req, running, previous=reservation,
                            releases=by_end() if running and known_ends else None,
                            parent_tiebreak=parent_tiebreak, fragmentation_aware=fragmentation_aware)
            if (guard_by_wait and reserve_after_s > 0 and head is not None and head.shadow_time is not None
                    and waited < head.shadow_time - now
                    and (reservation is None or reservation.head != req.name)):
                decisions.append(Decision(req, res))  # its wait is still shorter than what it would cost
                continue
            decisions.append(Decision(req, res, reservation=head))
            if head is not None:  # an impossible head blocks nobody; the next one becomes head
                masked = inv.add_usage(head.gpus_by_node())
            continue

        assert head is not None
        if not backfill:
            decisions.append(Decision(req, _waiting(req, f"waiting behind {head.head} (strict FIFO)")))
            continue
        shape = _shape(req)
        short = (req.expected_duration_s is not None and head.shadow_time is not None
                 and now + req.expected_duration_s <= head.shadow_time)
        if short and shape not in fail_open:
            # ends before the head needs its GPUs: may use reserved ones too
            res = place(inv, req)
            if res.placed:
                start(req, req, res)
                continue
            fail_open[shape] = res.reason
        if shape not in fail_masked:
            res = place(masked, req)
            if res.placed:
                start(req, req, res)
                continue
            if shape not in fail_open:
                open_res = place(inv, req)
                if not open_res.placed:
                    fail_open[shape] = open_res.reason
            fail_masked[shape] = (
                res.reason if shape in fail_open else
                f"fits now, but only on GPUs reserved for the queue head {head.head}; "
                f"waiting so it does not delay that gang")
        decisions.append(Decision(req, _waiting(req, fail_masked[shape])))
    return decisions


def _started(req: GangRequest, res: PlacementResult, now: float,
             slowdown: Mapping[str, float] | None) -> RunningGang:
    """A gang started this pass, as running, with its expected end when known."""
    end = None
    if req.expected_duration_s is not None and slowdown is not None:
        end = now + req.expected_duration_s * slowdown.get(res.level or CLUSTER_LEVEL, 1.0)
    return RunningGang(res, now, end)


def _locality_wait(inv: Inventory, req: GangRequest, ideal: str | None, running: _Releases,
                   place: Callable[[Inventory, GangRequest], PlacementResult], *,
                   now: float, slowdown: Mapping[str, float],
                   fraction: float) -> tuple[str, float, str, float] | None:
    """Cost-based delay scheduling for one gang: (narrower level to wait for, expected start there,
    level it would span now, run time it would lose placed now), or None to place it now.

    Waits only when the gang fits now, but wider than ``ideal`` (the narrowest level where one
    domain could ever hold it), and the expected wait for some narrower level, from running gangs'
    expected ends, is shorter than ``fraction`` x the extra run time spreading would cost it.
    """
    dur = req.expected_duration_s
    if ideal is None or dur is None or not running.order or running.unknown_end:
        return None
    now_res = place(inv, req)
    if not now_res.placed:
        return None  # it waits anyway; the queue's head logic handles it
    levels = inv.levels
    spread = now_res.level or CLUSTER_LEVEL
    li_now, li_best = levels.index(spread), levels.index(ideal)
    s_now = slowdown.get(spread, 1.0)
    best: tuple[float, str, float] | None = None  # (expected completion, level, start)
    for li in range(li_best, li_now):
        level = levels.levels[li].name
        gain = dur * (s_now - slowdown.get(level, 1.0))
        if gain <= 0:
            continue
        # a wait of fraction x gain or longer never counts: no need to look for a fit after that
        at = running.soonest_fit(inv, replace(req, policy="Required", max_domain=level),
                                 before=now + fraction * gain)
        if at is None:
            continue
        wait = at - now
        done = wait + dur * slowdown.get(level, 1.0)
        if wait < fraction * gain and (best is None or done < best[0]):
            best = (done, level, at)
    if best is None:
        return None
    return best[1], best[2], spread, dur * (s_now - slowdown.get(best[1], 1.0))


def _known_not_to_fit(shape: object, fail_open: Mapping[object, str],
                      fail_masked: Mapping[object, str] | None) -> bool:
    """Whether a gang of ``shape`` is known this pass not to fit the view it would be placed on:
    the open one, or (``fail_masked`` given) the one less the head's reservation. Free GPUs only
    shrink during a pass, and the masked view never has more than the open one."""
    return shape in fail_open or (fail_masked is not None and shape in fail_masked)


def _waiting(req: GangRequest, reason: str) -> PlacementResult:
    return PlacementResult(req.name, False, gpus_per_worker=req.gpus_per_worker, reason=reason)


def _shape(req: GangRequest) -> object:
    """What placing ``req`` depends on: equal shapes place alike (names aside)."""
    return (req.workers, req.gpus_per_worker, req.policy, req.max_domain, req.needs_rdma,
            req.gpu_product, _freeze(req.tolerations), req.avoid_nodes)


def _reserve(start: Inventory, inv: Inventory, head: GangRequest, running: Sequence[RunningGang], *,
             previous: Reservation | None, parent_tiebreak: bool, fragmentation_aware: bool = True,
             releases: _Releases | None = None) -> Reservation | None:
    """The head's reservation: the previous one while still usable, else the soonest placement.

    ``releases``: ``running`` already in order of expected end (given when every end is known).
    Returns None only if the head cannot fit even on an idle cluster (it blocks nobody then).
    """
    known = releases is not None or (bool(running) and all(r.expected_end is not None for r in running))
    if previous is not None and previous.head == head.name and _still_usable(start, head, previous):
        if known:
            # limits are upper bounds and backfill onto reserved GPUs ends by the shadow time, so a
            # fresh soonest slot is never later than the kept one; move only when it is earlier
            # (gangs ended before their limits) or equally soon with fewer idle GPUs held
            rsv = _reserve_by_end_times(inv, head, running, parent_tiebreak, fragmentation_aware, releases)
            if (rsv is not None and rsv.shadow_time is not None and previous.shadow_time is not None
                    and (rsv.shadow_time, _idle_held(inv, rsv))
                    < (previous.shadow_time, _idle_held(inv, previous))):
                return rsv
            return previous
        # unknown run times: move only to a placement that waits on strictly fewer busy GPUs, so
        # the number of GPUs the head waits for never grows and moves are finite
        res, missing = place_when_freed(inv, head)
        held = sum(max(0, g - inv.free(n)) for n, g in previous.gpus_by_node().items())
        return Reservation(head.name, res, None) if res.placed and missing < held else previous
    if known:
        rsv = _reserve_by_end_times(inv, head, running, parent_tiebreak, fragmentation_aware, releases)
        if rsv is not None:
            return rsv
    res, _ = place_when_freed(inv, head)
    return Reservation(head.name, res, None) if res.placed else None


# seconds past a sweep's bound still swept (see _Releases.fit_index)
_BOUND_MARGIN_S = 1e-3


def _end_key(gang: RunningGang) -> tuple[float, float, str]:
    return (gang.expected_end or 0.0, gang.started, gang.result.name)


class _Releases:
    """Running gangs in order of expected end, each with the GPUs it gives back when it ends.

    Built once per pass and kept in order as gangs start (``add``), so the cost-based locality
    wait does not sort every running gang again for every waiting gang.
    """

    def __init__(self, running: Iterable[RunningGang], expected: list[float | None] | None = None) -> None:
        """``expected``: the gangs' expected ends, in the same order, when the caller has them."""
        gangs = list(running)
        raw = [r.expected_end for r in gangs] if expected is None else expected
        ends = [e or 0.0 for e in raw]
        # by end alone (floats sort fast), stable, then each run of equal ends by the rest of the
        # key: the order a stable sort by the whole key gives, the position breaking full ties
        at = sorted(range(len(gangs)), key=ends.__getitem__)
        k = 0 if len(set(ends)) < len(ends) else len(at)  # ties at all? (a C-speed test)
        while k < len(at) - 1:
            end, j = ends[at[k]], k + 1
            while j < len(at) and ends[at[j]] == end:
                j += 1
            if j - k > 1:
                at[k:j] = sorted(at[k:j], key=lambda p: (_end_key(gangs[p]), p))
            k = j
        self.order = [gangs[p] for p in at]
        self.ends = [ends[p] for p in at]  # expected ends in order (0.0 where unknown), for bisection
        self._deltas: list[dict[str, int] | None] = [None] * len(self.order)  # built as a sweep needs them
        # the same as (node index, GPUs) pairs for one topology's index, built as a sweep needs them
        self._pairs: list[list[tuple[int, int]] | None] = [None] * len(self.order)
        self._pairs_index: dict[str, int] | None = None
        self._pairs_built = 0  # every entry before this one is built
        self.unknown_end = None in raw

    def copy(self) -> _Releases:
        """The same releases, to add to without changing these."""
        out = _Releases(())
        out.order, out.ends = list(self.order), list(self.ends)
        out._deltas, out._pairs, out._pairs_index = list(self._deltas), list(self._pairs), self._pairs_index
        out._pairs_built = self._pairs_built
        out.unknown_end = self.unknown_end
        return out

    def add(self, gang: RunningGang) -> None:
        """Count a gang started this pass."""
        key = _end_key(gang)
        lo = bisect.bisect_left(self.ends, key[0])
        hi = bisect.bisect_right(self.ends, key[0], lo)
        # after every gang with an equal or lower key, as inserting into the fully keyed order
        at = lo + sum(1 for k in range(lo, hi) if _end_key(self.order[k]) <= key)
        self.order.insert(at, gang)
        self.ends.insert(at, key[0])
        self._deltas.insert(at, None)
        self._pairs.insert(at, None)
        self._pairs_built = min(self._pairs_built, at)
        self.unknown_end = self.unknown_end or gang.expected_end is None

    def deltas(self) -> Iterator[dict[str, int]]:
        """Each gang's GPUs to give back (negative usage per node), in order of expected end."""
        for k, delta in enumerate(self._deltas):
            if delta is None:
                delta = self._deltas[k] = _giveback(self.order[k])
            yield delta

    def _index_pairs(self, index: dict[str, int], upto: int) -> list[list[tuple[int, int]]]:
        """The first ``upto`` gangs' releases as (node index, GPUs) pairs for ``index``: built as
        sweeps first need them, then kept, so a sweep reads a list rather than a generator."""
        if self._pairs_index is not index:  # another topology: node indices differ
            self._pairs = [None] * len(self.order)
            self._pairs_index = index
            self._pairs_built = 0
        all_pairs = self._pairs
        for k in range(self._pairs_built, upto):
            if all_pairs[k] is None:
                res = self.order[k].result
                if len(res.nodes) == 1:  # most gangs: no per-node sums to build
                    i = index.get(res.nodes[0])
                    all_pairs[k] = [] if i is None else [(i, -res.gpus_per_worker)]
                else:
                    all_pairs[k] = [(index[n], -g) for n, g in res.gpus_by_node().items() if n in index]
        self._pairs_built = max(self._pairs_built, upto)
        return all_pairs  # type: ignore[return-value]  # built up to ``upto``

    def fit_index(self, inv: Inventory, req: GangRequest, before: float | None = None) -> int | None:
        """How many gangs must end, in order, before ``req`` fits (at least one); None: never, or
        not with the gangs expected to end before ``before`` alone."""
        upto = len(self.order)
        if before is not None:
            # the sweep need not look past gangs that end too late to count; the margin keeps a
            # caller's own float test (end - now < limit) the judge of ends right at the bound
            upto = bisect.bisect_left(self.ends, before + _BOUND_MARGIN_S)
        pairs = self._index_pairs(inv._topo.index, upto)
        k = _releases_until_fit(inv, req, itertools.islice(pairs, upto))
        return None if k is None or not self.order else max(k, 1)

    def soonest_fit(self, inv: Inventory, req: GangRequest, before: float | None = None) -> float | None:
        """Expected time by which ``req`` fits, releasing gangs at their expected ends; None when
        it never does, or (given ``before``) not with the gangs that end before then."""
        k = self.fit_index(inv, req, before)
        return None if k is None else self.order[k - 1].expected_end


def _giveback(gang: RunningGang) -> dict[str, int]:
    return {n: -g for n, g in gang.result.gpus_by_node().items()}


def _reserve_by_end_times(inv: Inventory, head: GangRequest, running: Sequence[RunningGang],
                          parent_tiebreak: bool, fragmentation_aware: bool = True,
                          releases: _Releases | None = None) -> Reservation | None:
    """Release running gangs in order of expected end until the head fits: the soonest slot.

    ``releases``: ``running`` already in that order, when the caller has it."""
    if releases is None:
        releases = _Releases(running)
    order = releases.order

    def after(k: int) -> Inventory:
        total: dict[str, int] = {}
        for d in itertools.islice(releases.deltas(), k):
            for n, g in d.items():
                total[n] = total.get(n, 0) + g
        return inv.add_usage(total)

    def place(at: Inventory) -> PlacementResult:
        return place_gang(at, head, parent_tiebreak=parent_tiebreak, fragmentation_aware=fragmentation_aware)

    # one sweep over the releases finds the first prefix after which the head fits
    lo = releases.fit_index(inv, head)
    if lo is None:
        return None  # something we were not told about holds GPUs
    shadow = order[lo - 1].expected_end
    while lo < len(order) and order[lo].expected_end == shadow:
        lo += 1  # everything that ends at the shadow time is free then too
    slot = after(lo)
    res = place(slot)
    # pin the GPUs that free by the shadow time rather than idle ones where that costs no locality:
    # idle GPUs outside the reservation stay open to every backfill, not only to short ones
    busy_now = slot.add_usage({n.name: inv.free(n.name) for n in inv.nodes if inv.free(n.name)})
    freed_only = place(busy_now)
    if freed_only.placed and (inv.levels.index(freed_only.level or CLUSTER_LEVEL)
                              <= inv.levels.index(res.level or CLUSTER_LEVEL)):
        res = freed_only
    return Reservation(head.name, res, shadow)


def _idle_held(inv: Inventory, rsv: Reservation) -> int:
    """GPUs a reservation holds that are free now (idle unless a short gang backfills them)."""
    return sum(min(g, inv.free(n)) for n, g in rsv.gpus_by_node().items())


def _still_usable(inv: Inventory, head: GangRequest, rsv: Reservation) -> bool:
    """Reserved nodes still exist, still admit the head and have the GPUs allocatable."""
    elig = inv._eligible(head.tolerations, head.needs_rdma, head.gpu_product, head.avoid_nodes)
    index = inv._topo.index
    for name, gpus in rsv.gpus_by_node().items():
        i = index.get(name)
        if i is None or not elig[i] or inv.nodes[i].gpus < gpus:
            return False
    return rsv.placement.gpus_per_worker == head.gpus_per_worker and len(rsv.placement.nodes) == head.workers
