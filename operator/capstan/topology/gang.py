"""All-or-nothing gang placement in the smallest topology domain that fits, BestFit inside.

Semantics follow Kueue Topology Aware Scheduling (KEP 2724) where they apply:

* the narrowest level where *one* domain can hold every worker is chosen;
* among fitting domains at that level, the one left with the fewest free GPUs wins (BestFit:
  keep big free domains whole for big gangs); Capstan breaks ties by the free GPUs of the
  enclosing domains (fuller rack, then fuller block first), then by name;
* inside the domain, children are taken with the most capacity first and the *last* child is the
  smallest one that still fits the remainder (KEP example: nodes fitting 3,3,2,1 workers and a
  7-worker gang -> 3+3+1).

``Required`` never goes past ``max_domain`` (the gang waits); ``Preferred`` widens one level at a
time and finally spans the cluster; ``None`` ignores topology and does BestFit over nodes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, Literal

from .inventory import Inventory, _Room
from .levels import CLUSTER_LEVEL, display_level

Policy = Literal["Required", "Preferred", "None"]
POLICIES: tuple[str, ...] = ("Required", "Preferred", "None")


@dataclass(frozen=True)
class GangRequest:
    """A gang of identical workers to place together.

    ``gpus_per_worker`` = 0 makes a CPU gang (any schedulable node, no topology). ``priority`` is
    higher-first like a PriorityClass value; ``submitted`` (seconds, any epoch) orders equal
    priorities. ``expected_duration_s`` is optional: the queue lets a gang with a known duration
    backfill into reserved GPUs if it ends before the queue head needs them.
    """

    name: str
    workers: int
    gpus_per_worker: int
    policy: Policy = "Preferred"
    max_domain: str = "nvlink"
    needs_rdma: bool = False
    tolerations: Sequence[Mapping[str, Any]] = ()
    priority: int = 0
    submitted: float = 0.0
    gpu_product: str | None = None
    expected_duration_s: float | None = None
    avoid_nodes: frozenset[str] = frozenset()  # nodes quarantined for this gang's job

    @property
    def total_gpus(self) -> int:
        """GPUs the whole gang needs."""
        return self.workers * self.gpus_per_worker


@dataclass(frozen=True)
class PlacementResult:
    """Outcome of :func:`place_gang`.

    ``nodes[r]`` is the node of worker rank ``r`` (rank 0 first; ranks sharing a domain are
    contiguous). ``level`` is the narrowest level whose one domain holds every node ("cluster" if
    none), ``domain`` that domain's label value and ``domain_key`` its unique label path. When
    ``placed`` is false, ``reason`` says what the user can change or wait for.
    """

    name: str
    placed: bool
    nodes: list[str] = field(default_factory=list)
    gpus_per_worker: int = 0
    level: str | None = None
    domain: str | None = None
    domain_key: str | None = None
    reason: str = ""

    def gpus_by_node(self) -> dict[str, int]:
        """GPUs this placement takes on each node."""
        out = dict.fromkeys(self.nodes, self.gpus_per_worker)  # at C speed: most nodes take one worker
        if len(out) < len(self.nodes):  # some take several
            for n, workers in Counter(self.nodes).items():
                out[n] = workers * self.gpus_per_worker
        return out


def _validate(inv: Inventory, req: GangRequest) -> None:
    if req.workers < 1:
        raise ValueError(f"{req.name}: workers must be >= 1, got {req.workers}")
    if req.gpus_per_worker < 0:
        raise ValueError(f"{req.name}: gpus_per_worker must be >= 0, got {req.gpus_per_worker}")
    if req.policy not in POLICIES:
        raise ValueError(f"{req.name}: policy must be one of {POLICIES}, got {req.policy!r}")
    inv.levels.index(req.max_domain)  # raises with the known names


def place_gang(inventory: Inventory, request: GangRequest, *,
               parent_tiebreak: bool = True, fragmentation_aware: bool = True) -> PlacementResult:
    """Place every worker of ``request`` or none; never mutates ``inventory``.

    ``fragmentation_aware`` (default) keeps whole nodes and whole domains free for multi-node
    gangs (the FGD idea, ATC'23): a one-worker gang goes to the node it fills most exactly,
    cluster-wide, so partly used nodes are filled before a whole free node is broken (ties: the
    fuller NVLink domain, rack, ...); a multi-worker gang's domain is the one left with the
    fewest *workers' worth* of room (free GPUs on partly used nodes that no worker of this shape
    can use do not make a domain look emptier than it is), then the fewest free GPUs.
    ``parent_tiebreak=False, fragmentation_aware=False`` is plain Kueue BestFit (fewest free GPUs,
    ties by name); it exists for the benchmark baseline. Deterministic: equal inputs give equal
    results.
    """
    _validate(inventory, request)
    topo = inventory._topo
    elig = inventory._eligible(request.tolerations, request.needs_rdma, request.gpu_product,
                               request.avoid_nodes)
    if request.gpus_per_worker == 0:
        return _place_cpu(inventory, request, elig)

    gpw, want = request.gpus_per_worker, request.workers
    room = _room_for(inventory, request)
    free, cap, dcap, dfree = room.free, room.cap, room.dcap, room.dfree
    if sum(dcap[-1]) < want:  # the widest level's domains hold every node
        return _unplaced(inventory, request, elig, free, cap)

    if request.policy == "None":
        picks = _fill([(-c, free[i], i) for i, c in enumerate(cap) if c], want)
        assign = [(i, k) for i, k in picks]
        # group ranks by domain, widest level first, so neighbouring ranks share a domain
        nlev = len(topo.levels)
        assign.sort(key=lambda ik: (*[topo.dom_keys[li][topo.dom_of[li][ik[0]]] for li in
                                      range(nlev - 1, -1, -1)], topo.nodes[ik[0]].name))
        return _result(inventory, request, assign)

    nlev = len(topo.levels)
    if fragmentation_aware and want == 1:
        return _result(inventory, request, [(_best_node(topo, room), 1)])

    top = inventory.levels.index(request.max_domain) if request.policy == "Required" else nlev
    li = _fit_level(inventory, request, dcap)
    if li is None:
        return _unplaced(inventory, request, elig, free, cap, dcap=dcap, dfree=dfree, top=top)
    chosen = 0  # the cluster root, unless a domain of a level holds the gang
    if li < nlev:
        need = want * gpw
        fits = [d for d, c in enumerate(dcap[li]) if c >= want]

        def score(d: int) -> tuple[int, ...]:
            chain = []
            if parent_tiebreak:
                p = d
                for up in range(li, nlev - 1):
                    p = topo.parent[up][p]
                    chain.append(dfree[up + 1][p])
            if fragmentation_aware:
                return (dcap[li][d] - want, dfree[li][d] - need, *chain, d)
            return (dfree[li][d] - need, *chain, d)

        # the score's leading terms first, at C speed: only domains tied on them can be least
        lead = dcap[li] if fragmentation_aware else dfree[li]
        low = min(map(lead.__getitem__, fits))
        fits = [d for d in fits if lead[d] == low]
        if fragmentation_aware and len(fits) > 1:
            low = min(map(dfree[li].__getitem__, fits))
            fits = [d for d in fits if dfree[li][d] == low]
        chosen = fits[0] if len(fits) == 1 else min(fits, key=score)
    assign = _descend(topo, li, chosen, want, cap=cap, free=free, dcap=dcap, dfree=dfree)
    return _result(inventory, request, assign)


def _fit_level(inventory: Inventory, request: GangRequest, dcap: list[list[int]]) -> int | None:
    """Index of the narrowest level where one domain has room for the whole gang now (the
    number of levels: only the whole cluster), up to what its policy allows; None when none."""
    levels, want = inventory.levels, request.workers
    nlev = len(levels)
    top = levels.index(request.max_domain) if request.policy == "Required" else nlev
    # levels where no domain could hold the gang even empty need no look at what is free; a
    # C-speed scan rules a level out before any per-domain look
    most = _most_for(inventory, request)
    for li in range(min(top, nlev - 1) + 1):
        if most[li] >= want and max(dcap[li], default=0) >= want:
            return li
    return nlev if top == nlev and sum(dcap[-1]) >= want else None


def _room_for(inv: Inventory, req: GangRequest) -> _Room:
    """Free GPUs and room for ``req``'s workers per node and domain (kept with ``inv``)."""
    return inv._room(req.tolerations, req.needs_rdma, req.gpu_product, req.avoid_nodes, req.gpus_per_worker)


def _most_for(inv: Inventory, req: GangRequest) -> list[int]:
    """Per level: the most of ``req``'s workers one domain holds with every GPU free (static)."""
    return inv._empty(req.tolerations, req.needs_rdma, req.gpu_product, req.avoid_nodes,
                      req.gpus_per_worker)[1]


def _best_node(topo: Any, room: _Room) -> int:
    """The node for a one-worker gang: least free GPUs left on it, then the fullest enclosing
    domains (NVLink domain, rack, ...; their free GPUs are ``room.dfree``), then name."""
    best = room.tightest(topo.most_alloc)[1]  # the caller checked that some node has room
    n_nodes = len(room.free)
    for dom, df in zip(topo.dom_of, room.dfree, strict=True):  # narrowest level first, as the key reads
        if len(best) == 1:
            break
        if len(df) == n_nodes:
            continue  # one node a domain: each holds the node's free GPUs, the same for every one here
        vals = [df[dom[i]] for i in best]
        low = min(vals)
        best = [i for i, v in zip(best, vals, strict=True) if v == low]
    return best[0]  # in index order: the lowest breaks the last tie


def fits(inventory: Inventory, request: GangRequest) -> bool:
    """Whether :func:`place_gang` would place ``request`` now: its fit test, without choosing nodes."""
    if request.gpus_per_worker == 0:
        return place_gang(inventory, request).placed
    _validate(inventory, request)
    dcap = _room_for(inventory, request).dcap
    nlev = len(inventory.levels)
    top = inventory.levels.index(request.max_domain) if request.policy == "Required" else nlev
    # domains nest: a fit in a narrower domain is a fit in the one above it
    return (max(dcap[top], default=0) if top < nlev else sum(dcap[-1])) >= request.workers


def placed_level(inventory: Inventory, request: GangRequest) -> str | None:
    """The level :func:`place_gang` would place a multi-worker GPU gang at ("cluster" when no one
    domain holds it), without choosing nodes; None when it would not place it.

    A gang goes to the narrowest level where one domain has room for it, so its nodes span that
    level exactly: a narrower domain holding them all would have had room first.
    """
    if request.workers < 2 or request.gpus_per_worker == 0 or request.policy == "None":
        raise ValueError("placed_level answers for multi-worker GPU gangs placed by topology")
    _validate(inventory, request)
    li = _fit_level(inventory, request, _room_for(inventory, request).dcap)
    if li is None:
        return None
    levels = inventory.levels
    return CLUSTER_LEVEL if li == len(levels) else levels.levels[li].name


def releases_until_fit(inventory: Inventory, request: GangRequest,
                       releases: Iterable[Mapping[str, int]]) -> int | None:
    """How many of ``releases`` (GPUs given back per node, applied in order) must happen before
    :func:`place_gang` would place ``request``: 0 if it fits now, None if not even after all.

    The same test as :func:`place_gang` (one domain of the widest level the policy allows holds
    ``workers`` whole workers of free GPUs on eligible nodes), swept once over the releases with
    per-domain sums updated as each node frees, instead of a placement per prefix: the queue asks
    this for every gang waiting on locality in every pass. Unknown nodes in a release are ignored,
    as :meth:`Inventory.add_usage` ignores them.
    """
    index = inventory._topo.index
    return _releases_until_fit(inventory, request, (
        [(i, g) for i, g in ((index.get(n), g) for n, g in release.items()) if i is not None]
        for release in releases))


def _releases_until_fit(inventory: Inventory, request: GangRequest,
                        releases: Iterable[Sequence[tuple[int, int]]]) -> int | None:
    """:func:`releases_until_fit` over releases given as (node index, GPUs) pairs."""
    if fits(inventory, request):
        return 0
    if request.gpus_per_worker == 0:  # CPU workers need no GPUs: freeing some changes nothing
        return None
    topo = inventory._topo
    gpw, want = request.gpus_per_worker, request.workers
    room_now = _room_for(inventory, request)
    elig, dcap = room_now.elig, room_now.dcap
    nlev = len(topo.levels)
    top = topo.levels.index(request.max_domain) if request.policy == "Required" else nlev
    # Preferred or None: the whole cluster is the one domain
    dom = topo.dom_of[top] if top < nlev else [0] * len(topo.nodes)
    room = list(dcap[top]) if top < nlev else [sum(dcap[-1])]
    used = list(inventory._used)
    alloc = topo.alloc
    for k, release in enumerate(releases, start=1):
        fits_after = False
        for i, gpus in release:
            if not elig[i]:
                continue
            a, before = alloc[i], used[i]
            after = before + gpus
            if after < 0:
                after = 0
            used[i] = after
            # whole workers this node holds after minus before (free GPUs floor at zero)
            gained = (a - after if a > after else 0) // gpw - (a - before if a > before else 0) // gpw
            if gained:
                d = dom[i]
                room[d] += gained
                fits_after = fits_after or room[d] >= want
        if fits_after:  # checked once the whole release is in: a release only frees GPUs
            return k
    return None


def narrowest_level(inventory: Inventory, request: GangRequest) -> str | None:
    """Narrowest level at which one domain could hold the whole gang with every GPU free.

    None when that is only the whole cluster (or never): no single domain is big enough.
    """
    gpw = request.gpus_per_worker
    if gpw == 0:
        return None
    for lv, most in zip(inventory.levels, _most_for(inventory, request), strict=True):
        if most >= request.workers:
            return lv.name
    return None


def _fill(items: list[tuple[int, int, int]], want: int) -> list[tuple[int, int]]:
    """Kueue BestFit over (-capacity, free, id) items: biggest first, best-fitting last; ties by id.

    Returns (id, workers) in rank order; assumes the capacities add up to at least ``want``.
    """
    # the items sort as they come (negated capacity first): no key function to call per item
    items.sort()
    out: list[tuple[int, int]] = []
    rem = want
    for pos, (neg, _f, ident) in enumerate(items):
        c = -neg
        if c <= 0:
            break
        if c == rem:  # none after it is bigger: it is the smallest that fits, and first on ties
            out.append((ident, rem))
            return out
        if c > rem:
            # the last domain: the smallest remaining one that fits leaves the least capacity idle
            last = min((-n, f, i) for n, f, i in items[pos:] if -n >= rem)
            out.append((last[2], rem))
            return out
        out.append((ident, c))
        rem -= c
    raise AssertionError("capacity was checked before filling")


def _descend(topo: Any, li: int, dom: int, want: int, *, cap: list[int], free: list[int],
             dcap: list[list[int]], dfree: list[list[int]]) -> list[tuple[int, int]]:
    """Split ``want`` workers down the tree below domain ``dom`` of level ``li`` (nlev = root)."""
    kids = topo.children[li][dom]
    while len(kids) == 1 and li > 0:  # a domain with one child (an NVLink domain of one node): go down
        li -= 1
        kids = topo.children[li][kids[0]]
    if li == 0 or (li == 1 and topo.node_domains):  # the children are nodes
        if len(kids) == 1:
            return [(kids[0], want)]  # the caller checked the room
        return _fill([(-cap[i], free[i], i) for i in kids if cap[i]], want)
    out: list[tuple[int, int]] = []
    dc, df = dcap[li - 1], dfree[li - 1]
    below = topo.children[li - 1]
    # one level above the nodes: split each child's share over its nodes here, without a call
    nodes_below = li == 2 and topo.node_domains
    for child, k in _fill([(-dc[c], df[c], c) for c in kids if dc[c]], want):
        if li == 1 and len(below[child]) == 1:
            out.append((below[child][0], k))  # an NVLink domain of one node: no call for it
        elif nodes_below:
            out.extend(_fill([(-cap[i], free[i], i) for i in below[child] if cap[i]], k))
        else:
            out.extend(_descend(topo, li - 1, child, k, cap=cap, free=free, dcap=dcap, dfree=dfree))
    return out


def _result(inv: Inventory, req: GangRequest, assign: list[tuple[int, int]]) -> PlacementResult:
    every = inv._topo.names
    names = [every[i] for i, _ in assign]
    if any(k != 1 for _, k in assign):  # a node that takes several workers is named once for each
        names = [name for name, (_, k) in zip(names, assign, strict=True) for _ in range(k)]
    level, value, key = _span(inv, [i for i, _ in assign])
    return PlacementResult(
        req.name, True, names, req.gpus_per_worker, level=level, domain=value, domain_key=key
    )


def _span(inv: Inventory, idx: list[int]) -> tuple[str, str, str]:
    """Narrowest (level, domain value, domain key) holding all node indices ``idx``."""
    topo = inv._topo
    for li, lv in enumerate(topo.levels):
        dom = topo.dom_of[li]
        first = dom[idx[0]]
        if len(idx) == 1 or len(set(map(dom.__getitem__, idx))) == 1:  # C speed for a big gang
            return lv.name, topo.dom_values[li][first], topo.dom_keys[li][first]
    return CLUSTER_LEVEL, "", ""


def _place_cpu(inv: Inventory, req: GangRequest, elig: list[bool]) -> PlacementResult:
    """CPU workers: one per node round-robin; only on GPU-less nodes if any (keep GPUs for GPU work)."""
    topo = inv._topo
    cands = ([i for i, e in enumerate(elig) if e and topo.alloc[i] == 0]
             or [i for i, e in enumerate(elig) if e])
    if not cands:
        return PlacementResult(req.name, False, gpus_per_worker=0, reason=_no_node_reason(inv, req))
    assign = [(cands[r % len(cands)], 1) for r in range(req.workers)]
    assign.sort(key=lambda ik: cands.index(ik[0]))  # same node's workers get neighbouring ranks
    return _result(inv, req, assign)


def _no_node_reason(inv: Inventory, req: GangRequest) -> str:
    """Why no node is schedulable for this request at all, counting each exclusion."""
    nodes = inv.nodes
    tol_ok = inv._eligible(req.tolerations, False, None)
    index = inv._topo.index
    if req.needs_rdma and not any(n.rdma for n in nodes if not n.cordoned):
        return "no schedulable node with RDMA (no Ready, uncordoned node has an rdma/* resource)"
    counts = {
        "cordoned": sum(n.cordoned for n in nodes),
        "tainted without a matching toleration": sum(
            1 for n in nodes if not n.cordoned and n.taints and not tol_ok[index[n.name]]),
        "NotReady": len(inv.not_ready),
    }
    if req.needs_rdma:
        counts["without RDMA"] = sum(1 for n in nodes if not n.rdma)
    if req.gpu_product:
        counts[f"not {req.gpu_product}"] = sum(1 for n in nodes if n.product != req.gpu_product)
    if req.avoid_nodes:
        counts["excluded for this job after failures (status.excludedNodes)"] = sum(
            1 for n in nodes if n.name in req.avoid_nodes)
    detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    what = "no schedulable node with RDMA" if req.needs_rdma else "no schedulable node"
    return f"{what}" + (f" ({detail})" if detail else " (the cluster has no Ready nodes)")


def _unplaced(inv: Inventory, req: GangRequest, elig: list[bool], free: list[int], cap: list[int], *,
              dcap: list[list[int]] | None = None, dfree: list[list[int]] | None = None,
              top: int | None = None) -> PlacementResult:
    """Build the not-placed result with the most specific reason a user can act on."""
    topo = inv._topo
    gpw, want = req.gpus_per_worker, req.workers
    shape = f"{want} worker{'s' if want != 1 else ''} × {gpw}"  # noqa: RUF001 -- meant as a times sign

    def out(reason: str) -> PlacementResult:
        kept_off = sum(1 for n in inv.nodes if n.name in req.avoid_nodes) if req.avoid_nodes else 0
        if kept_off and "excluded for this job" not in reason:
            reason += f"; {kept_off} node(s) excluded for this job after failures (status.excludedNodes)"
        return PlacementResult(req.name, False, gpus_per_worker=gpw, reason=reason)

    if not any(elig):
        return out(_no_node_reason(inv, req))
    where = " with RDMA" if req.needs_rdma else ""
    # the scans that only name a figure run only when their test fails: a node holds a worker
    # empty (now) exactly when its allocatable (free) GPUs are gpw or more
    if not _most_for(inv, req)[-1]:
        biggest = max(compress(topo.alloc, elig))
        return out(f"no schedulable node{where} has {gpw} GPUs allocatable (largest: {biggest}); "
                   f"lower gpusPerWorker")
    total_cap = sum(cap)
    if not total_cap:
        return out(f"no node{where} has {gpw} free GPUs (largest: {max(free)}); waiting for GPUs to free up")
    if total_cap < want:
        n_fit = len(cap) - cap.count(0)
        return out(f"needs {want * gpw} GPUs ({shape}); schedulable nodes{where} have room for "
                   f"{total_cap} worker{'s' if total_cap != 1 else ''} now ({n_fit} nodes with ≥{gpw} "
                   f"free GPUs); waiting for GPUs to free up")
    assert dcap is not None and dfree is not None and top is not None
    lv = topo.levels.levels[top]
    label = display_level(lv.name)
    # the domain with the most room, then the most free GPUs, then the lowest id (at C speed first)
    dc, dfr = dcap[top], dfree[top]
    roomiest = max(dc)
    best = dc.index(roomiest)
    if dc.count(roomiest) > 1:
        tied = [d for d, c in enumerate(dc) if c == roomiest]
        best = max(tied, key=lambda d: (dfr[d], -d))
    msg = (f"needs {want * gpw} GPUs ({shape}) within one {label}; the largest free {label} "
           f"has {dfree[top][best]} free GPUs")
    if dcap[top][best] * gpw != dfree[top][best]:
        msg += f" (room for {dcap[top][best]} worker{'s' if dcap[top][best] != 1 else ''})"
    # would it ever fit? capacity of each domain with nothing running
    most_empty = _most_for(inv, req)[top]
    if most_empty < want:
        msg += (f"; even empty, no {label} holds {want} such workers (max {most_empty}): "
                f"raise maxDomain above {lv.name} or use policy Preferred")
    else:
        msg += "; waiting for GPUs to free up"
    return out(msg)


def place_when_freed(inventory: Inventory, request: GangRequest) -> tuple[PlacementResult, int]:
    """Where a gang that does not fit now should wait: the placement needing the fewest busy GPUs.

    Considers capacity as if every GPU were free, at the narrowest level the policy allows where
    one domain could hold the gang, and picks the domain (then nodes) with the most workers that
    fit *now*, so the fewest GPUs held by others must be released first. Returns the placement
    and that number of GPUs still held by others; ``placed`` is false only if the gang cannot fit
    even on an idle cluster. Used for the queue head's reservation when run times are unknown.
    """
    _validate(inventory, request)
    topo = inventory._topo
    gpw, want = request.gpus_per_worker, request.workers
    if gpw == 0:
        res = place_gang(inventory, request)
        return res, 0
    elig = inventory._eligible(request.tolerations, request.needs_rdma, request.gpu_product,
                               request.avoid_nodes)
    used = inventory._used
    cap_all = [a // gpw if e else 0 for a, e in zip(topo.alloc, elig, strict=True)]
    free = [a - u if e and a > u else 0 for a, u, e in zip(topo.alloc, used, elig, strict=True)]
    cap_now = [f // gpw for f in free]
    cand = [i for i, c in enumerate(cap_all) if c]
    nlev = len(topo.levels)
    if sum(cap_all[i] for i in cand) < want:
        return _never_fits(inventory, request, cand)
    if request.policy == "None":
        levels = [nlev]
    elif request.policy == "Required":
        levels = list(range(inventory.levels.index(request.max_domain) + 1))
    else:
        levels = list(range(nlev + 1))
    for li in levels:
        dom = topo.dom_of[li] if li < nlev else [0] * len(topo.nodes)
        n_dom = len(topo.dom_keys[li]) if li < nlev else 1
        tot, now, fr = [0] * n_dom, [0] * n_dom, [0] * n_dom
        for i in cand:
            tot[dom[i]] += cap_all[i]
            now[dom[i]] += cap_now[i]
            fr[dom[i]] += free[i]
        fits = [d for d in range(n_dom) if tot[d] >= want]
        if not fits:
            continue
        best = min(fits, key=lambda d: (max(0, want - now[d]), fr[d], d))
        members = [i for i in cand if dom[i] == best]
        taken: dict[int, int] = {}
        n_now = min(want, now[best])
        if n_now:
            for i, k in _fill([(-cap_now[i], free[i], i) for i in members if cap_now[i]], n_now):
                taken[i] = k
        rem = want - n_now
        # the rest waits on the nodes with the fewest GPUs held by others
        for i in sorted(members, key=lambda i: (used[i], i)):
            if rem <= 0:
                break
            k = min(rem, cap_all[i] - taken.get(i, 0))
            if k > 0:
                taken[i] = taken.get(i, 0) + k
                rem -= k
        missing = sum(max(0, k * gpw - free[i]) for i, k in taken.items())
        order = sorted(taken, key=lambda i: (*[topo.dom_keys[lj][topo.dom_of[lj][i]]
                                               for lj in range(nlev - 1, -1, -1)], i))
        return _result(inventory, request, [(i, taken[i]) for i in order]), missing
    return _never_fits(inventory, request, cand)  # Required and no allowed domain is big enough


def _never_fits(inv: Inventory, req: GangRequest, cand: list[int]) -> tuple[PlacementResult, int]:
    idle = inv.add_usage({inv._topo.nodes[i].name: -inv._used[i] for i in cand})
    res = place_gang(idle, req)
    if res.placed:  # only ineligible nodes were busy; cannot happen, kept for safety
        res = PlacementResult(req.name, False, gpus_per_worker=req.gpus_per_worker, reason="does not fit")
    return res, 0
