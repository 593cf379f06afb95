"""Property tests: capacity is never overcommitted, gangs are whole, Required holds, heads don't starve."""

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from topo_fixtures import node, pod

from capstan.topology import (
    DEFAULT_LEVELS,
    GangRequest,
    Inventory,
    MovableGang,
    MovePolicy,
    PlacementResult,
    RunningGang,
    build_inventory,
    fits,
    place_gang,
    placed_level,
    releases_until_fit,
    schedule_queue,
)
from capstan.topology.inventory import _Room
from capstan.topology.moves import _cheapest_clearing, _MoversByNode
from capstan.topology.queue import _Releases

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def clusters(draw: st.DrawFn) -> Inventory:
    n = draw(st.integers(1, 24))
    nodes, pods = [], []
    for i in range(n):
        gpus = draw(st.sampled_from([0, 2, 4, 8]))
        rack = draw(st.integers(0, 3))
        clique = draw(st.sampled_from([None, None, f"c{rack}"]))
        rack_label = draw(st.sampled_from([f"r{rack}", f"r{rack}", None]))
        nodes.append(node(f"n{i:02d}", gpus, clique=clique, rack=rack_label, block=f"b{rack // 2}",
                          zone=draw(st.sampled_from(["za", "zb", None])),
                          cordoned=draw(st.booleans()) and draw(st.booleans()),
                          ready=draw(st.integers(0, 9)) > 0, rdma=draw(st.booleans())))
        used = draw(st.integers(0, gpus))
        if used:
            pods.append(pod(f"p{i}", f"n{i:02d}", used))
    return build_inventory(nodes, pods)


gangs = st.builds(
    GangRequest,
    name=st.just("g"),
    workers=st.integers(1, 10),
    gpus_per_worker=st.sampled_from([0, 1, 2, 4, 8]),
    policy=st.sampled_from(["Required", "Preferred", "None"]),
    max_domain=st.sampled_from(DEFAULT_LEVELS.names),
    needs_rdma=st.booleans(),
)


def _check_fits(inv: Inventory, res: PlacementResult) -> None:
    for name, gpus in res.gpus_by_node().items():
        assert gpus <= inv.free(name), (name, gpus, inv.free(name))
        info = inv.node(name)
        assert not info.cordoned and not info.taints


@FAST
@given(clusters(), gangs)
def test_placement_is_whole_and_within_free(inv: Inventory, req: GangRequest) -> None:
    res = place_gang(inv, req)
    if not res.placed:
        assert res.nodes == [] and res.reason
        return
    assert len(res.nodes) == req.workers
    _check_fits(inv, res)
    if req.needs_rdma:
        assert all(inv.node(n).rdma for n in res.nodes)
    after = inv.allocate(res)  # raises on overcommit
    assert after.free_gpus == inv.free_gpus - req.total_gpus
    if req.policy == "Required" and req.gpus_per_worker:
        assert DEFAULT_LEVELS.index(inv.span_level(res.nodes)) <= DEFAULT_LEVELS.index(req.max_domain)
    if req.gpus_per_worker:
        assert res.level == inv.span_level(res.nodes)


@FAST
@given(clusters(), st.lists(gangs, min_size=1, max_size=6), st.data())
def test_queue_never_overcommits_and_head_is_not_delayed(inv: Inventory, reqs: list[GangRequest],
                                                         data: st.DataObject) -> None:
    reqs = [GangRequest(f"g{i}", r.workers, r.gpus_per_worker, r.policy, r.max_domain, r.needs_rdma,
                        submitted=float(i),
                        expected_duration_s=data.draw(st.sampled_from([None, 5.0, 50.0])))
            for i, r in enumerate(reqs)]
    # treat the GPUs already in use as running gangs with known ends
    running = []
    for i, info in enumerate(inv.nodes):
        if inv.used(info.name):
            res = PlacementResult(
                f"run{i}", True, [info.name], inv.used(info.name), level="nvlink", domain="", domain_key=""
            )
            running.append(RunningGang(res, 0.0, data.draw(st.sampled_from([10.0, 20.0, 100.0]))))
    now = 1.0
    note(f"nodes={[(n.name, n.gpus, inv.used(n.name), n.cordoned, n.rdma) for n in inv.nodes]}")
    note(f"running={running}")
    decisions = schedule_queue(inv, reqs, running=running, now=now)
    note(f"decisions={decisions}")
    assert len(decisions) == len(reqs)
    cur = inv
    for d in decisions:
        if d.placed:
            assert len(d.result.nodes) == d.request.workers
            _check_fits(cur, d.result)
            cur = cur.allocate(d.result)
    heads = [d for d in decisions if d.reservation is not None]
    if not heads:
        return
    head = heads[0]
    rsv = head.reservation
    assert rsv is not None
    # at the head's expected start, with long backfills still running and short ones done, the
    # reserved GPUs are free
    shadow = rsv.shadow_time if rsv.shadow_time is not None else float("inf")
    later = cur
    for r in running:
        if r.expected_end is not None and r.expected_end <= shadow:
            later = later.release(r.result)
    if rsv.shadow_time is None:
        # reserved on the empty cluster: everything that is not a backfill ends at some point
        for r in running:
            later = later.release(r.result)
        for d in decisions:
            if d.placed and not d.backfilled:
                later = later.release(d.result)
    for d in decisions:
        dur = d.request.expected_duration_s
        if d.backfilled and dur is not None and now + dur <= shadow:
            later = later.release(d.result)
    for name, gpus in rsv.gpus_by_node().items():
        assert later.free(name) >= gpus, (name, gpus, later.free(name))
    assert place_gang(later, head.request).placed


@FAST
@given(clusters(), gangs)
def test_fits_answers_as_place_gang_does(inv: Inventory, req: GangRequest) -> None:
    # the moves ask only whether a gang fits; the answer must be placement's own
    assert fits(inv, req) == place_gang(inv, req).placed


@FAST
@given(clusters(), gangs, st.booleans())
def test_placed_level_is_the_level_place_gang_spans(inv: Inventory, req: GangRequest, plain: bool) -> None:
    # the locality moves ask only how wide a gang would start; the answer must be placement's own
    assume(req.workers > 1 and req.gpus_per_worker > 0 and req.policy != "None")
    res = place_gang(inv, req, parent_tiebreak=not plain, fragmentation_aware=not plain)
    assert placed_level(inv, req) == (res.level if res.placed else None)


@FAST
@given(clusters(), gangs, st.data())
def test_releases_until_fit_is_the_first_prefix_after_which_the_gang_places(
        inv: Inventory, req: GangRequest, data: st.DataObject) -> None:
    # running work ends node by node, in a drawn order: the sweep must agree with placing after
    # every prefix of those ends
    busy = [n.name for n in inv.nodes if inv.used(n.name)]
    order = data.draw(st.permutations(busy))
    releases = [{name: -data.draw(st.integers(1, inv.used(name)))} for name in order]
    expected = None
    at = inv
    for k in range(len(releases) + 1):
        if k:
            at = at.add_usage(releases[k - 1])
        if place_gang(at, req).placed:
            expected = k
            break
    assert releases_until_fit(inv, req, releases) == expected


@FAST
@given(clusters(), st.lists(gangs, min_size=1, max_size=8), st.data())
def test_placements_on_derived_inventories_match_fresh_ones(
        inv: Inventory, reqs: list[GangRequest], data: st.DataObject) -> None:
    # an inventory derived by allocations and releases carries its parent's per-domain sums
    # forward, and a new one on the same index (the next pass, pods counted again) derives from
    # the sums the index kept; every placement must be what a fresh index of that usage gives
    cur = inv
    for req in reqs:
        pristine = replace(cur._topo, eligible_cache={}, empty_cache={}, room_cache={})
        fresh = Inventory(pristine, list(cur._used))
        got, want = place_gang(cur, req), place_gang(fresh, req)
        assert (got.placed, got.nodes, got.level, got.reason) == (
            want.placed, want.nodes, want.level, want.reason)
        step = data.draw(st.sampled_from(["allocate", "change", "next pass"]))
        if step == "allocate" and got.placed:
            cur = cur.allocate(got)
        elif step == "next pass":
            cur = Inventory(cur._topo, list(cur._used))
        elif cur.nodes:
            name = data.draw(st.sampled_from([n.name for n in cur.nodes]))
            cur = cur.add_usage({name: data.draw(st.integers(-8, 0))})


def _places_as_a_fresh_index(at: Inventory, reqs: list[GangRequest]) -> None:
    pristine = replace(at._topo, eligible_cache={}, empty_cache={}, room_cache={})
    fresh = Inventory(pristine, list(at._used))
    for req in reqs:
        got, want = place_gang(at, req), place_gang(fresh, req)
        assert (got.placed, got.nodes, got.level, got.reason) == (
            want.placed, want.nodes, want.level, want.reason)


@FAST
@given(clusters(), st.lists(gangs, min_size=1, max_size=8), st.data())
def test_views_that_hand_their_lists_on_place_as_copies_do(
        inv: Inventory, reqs: list[GangRequest], data: st.DataObject) -> None:
    # a queue pass's own views hand their per-node lists to the next one instead of copying them;
    # the last view, a view made from one before it was handed on (the pass's masked view), the
    # caller's inventory and the next pass over the same index must all place as fresh ones do
    counted = list(inv._used)
    cur, own, side = inv, False, None
    side_at = data.draw(st.integers(0, len(reqs) - 1))
    for step, req in enumerate(reqs):
        res = place_gang(cur, req)
        if step == side_at:
            name = data.draw(st.sampled_from([n.name for n in cur.nodes])) if cur.nodes else "gone"
            side = cur.add_usage({name: data.draw(st.integers(-8, 0))})
            if data.draw(st.booleans()):
                place_gang(side, req)  # sums of its own, derived from cur's before cur hands them on
        if res.placed:
            cur = cur._take_usage(res.gpus_by_node(), check=True) if own else cur.allocate(res)
            own = True
    _places_as_a_fresh_index(cur, reqs)
    if side is not None:
        _places_as_a_fresh_index(side, reqs)
    assert inv._used == counted
    _places_as_a_fresh_index(inv, reqs)
    _places_as_a_fresh_index(Inventory(inv._topo, list(cur._used)), reqs)


@FAST
@given(st.data())
def test_one_worker_gangs_place_as_on_a_fresh_index_after_any_usage_changes(data: st.DataObject) -> None:
    # a one-worker gang goes to a tightest node; those nodes are kept with the sums and patched as
    # usage changes (a few nodes or many, in views handed on or copied): the choice must stay
    # what a fresh index of the same usage makes
    n = data.draw(st.integers(64, 160))  # many nodes: sums derive for changes up to a quarter of them
    nodes = [node(f"n{i:02d}", data.draw(st.sampled_from([4, 8])), rack=f"r{i // 6}", block=f"b{i // 24}")
             for i in range(n)]
    names = [f"n{i:02d}" for i in range(n)]
    one = [GangRequest(f"one{g}", 1, g) for g in (1, 2, 4, 8)]
    cur, own = build_inventory(nodes, []), False
    for _ in range(data.draw(st.integers(1, 6))):
        for req in one:
            place_gang(cur, req)  # every size's sums (and tightest nodes) found, to carry on
        changed = data.draw(st.permutations(names))[: data.draw(st.integers(0, n // 4 + 2))]
        delta = {name: data.draw(st.sampled_from([-8, -4, -1, 1, 4, 8])) for name in changed}
        cur = cur._take_usage(delta) if own else cur.add_usage(delta)
        own = data.draw(st.booleans())
        _places_as_a_fresh_index(cur, one)


@FAST
@given(st.data())
def test_one_worker_gangs_started_one_after_another_go_where_a_fresh_index_sends_each(
        data: st.DataObject) -> None:
    # a queue pass starting one-worker gangs in turn fills the tightest nodes, then the next
    # tightest: the nodes listed by free GPUs are patched start by start, never found again, and
    # each start must still go where a fresh index of the same usage would send it
    n = data.draw(st.integers(8, 40))
    nodes = [node(f"n{i:02d}", data.draw(st.sampled_from([4, 8])), rack=f"r{i // 4}") for i in range(n)]
    pods = [pod(f"p{i}", f"n{i:02d}", data.draw(st.integers(0, 4))) for i in range(n)]
    cur, own = build_inventory(nodes, pods), False
    for k in range(data.draw(st.integers(1, 30))):
        req = GangRequest(f"one{k}", 1, data.draw(st.sampled_from([1, 1, 2, 4])))
        _places_as_a_fresh_index(cur, [req])
        res = place_gang(cur, req)
        if not res.placed:
            break
        cur = cur._take_usage(res.gpus_by_node()) if own else cur.add_usage(res.gpus_by_node())
        own = True  # a view of this run's own from the first start on, as in a queue pass


def test_sums_sharing_free_gpus_stay_right_when_a_view_hands_one_on() -> None:
    # a view far from the counted pods builds its sums from scratch, and a second worker size's
    # sums share the first one's free GPUs; handing the first on must leave the second right
    nodes = [node(f"n{i}", 8, rack=f"r{i // 2}") for i in range(8)]
    inv = build_inventory(nodes, [])
    big, four, pair = GangRequest("big", 4, 8), GangRequest("four", 1, 4), GangRequest("pair", 2, 4)
    for req in (big, four):
        place_gang(inv, req)  # the index keeps both sizes' sums for these pods
    cur = inv.allocate(place_gang(inv, big))  # half the nodes changed: too far to derive from
    for req in (big, four):
        place_gang(cur, req)
    after = cur._take_usage({"n7": 4}, check=True)
    _places_as_a_fresh_index(after, [big, four, pair])
    assert after._room((), False, None, frozenset(), 4) == _Room.build(
        inv._topo, after._used, after._eligible((), False, None), 4)


def test_a_view_that_handed_its_lists_on_cannot_be_read() -> None:
    inv = build_inventory([node("a", 8), node("b", 8)], [pod("p", "a", 2)])
    req = GangRequest("g", 1, 4)
    own = inv.allocate(place_gang(inv, req))  # onto the node it fills most: a
    with pytest.raises(ValueError, match="node a would have 16 GPUs used of 8"):
        own._take_usage({"b": 4, "a": 10}, check=True)
    assert (own.used("a"), own.used("b")) == (6, 0)  # a refused change changes nothing
    after = own._take_usage({"a": 2, "b": 4}, check=True)
    assert (after.used("a"), after.used("b")) == (8, 4)
    with pytest.raises((IndexError, ValueError)):  # loudly, never the new view's numbers
        place_gang(own, req)
    with pytest.raises(IndexError):
        own.free("a")


@FAST
@given(clusters(), st.integers(1, 4), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from(["Required", "Preferred"]), st.sampled_from(DEFAULT_LEVELS.names), st.data())
def test_nodes_to_clear_are_the_cheapest_in_the_narrowest_domain(
        inv: Inventory, workers: int, gpw: int, policy: str, max_domain: str, data: st.DataObject) -> None:
    # every busy GPU belongs to one-GPU or bigger movable gangs on its node; the choice must be
    # what a plain search over every domain of every level gives
    movable: list[MovableGang] = []
    for n in inv.nodes:
        left, k = inv.used(n.name), 0
        while left:
            g = data.draw(st.integers(1, left))
            res = PlacementResult(f"m-{n.name}-{k}", True, [n.name], g)
            since = data.draw(st.sampled_from([0.0, 100.0]))
            movable.append(MovableGang(GangRequest(res.name, 1, g), res, since))
            left, k = left - g, k + 1
    req = GangRequest("w", workers, gpw, policy=policy, max_domain=max_domain)  # type: ignore[arg-type]
    got = _cheapest_clearing(inv, req, _MoversByNode(inv, movable, 1_000.0, MovePolicy(min_run_s=0.0)))
    # the order a node is cleared in, stated again: fewest GPUs first, then the latest started
    by_node: dict[str, list[MovableGang]] = {}
    for m in sorted(movable, key=lambda m: (m.request.total_gpus, -m.running_since, m.request.name)):
        by_node.setdefault(m.result.nodes[0], []).append(m)
    assert (None if got is None else [(c[0], inv.nodes[c[1]].name) for c in got]) == _plain_cheapest(
        inv, req, by_node)


def _plain_cheapest(inv: Inventory, req: GangRequest,
                    by_node: dict[str, list[MovableGang]]) -> list[tuple[int, str]] | None:
    elig = inv._eligible(req.tolerations, req.needs_rdma, req.gpu_product, req.avoid_nodes)
    cost: dict[str, int] = {}
    for n, ok in zip(inv.nodes, elig, strict=True):
        if not ok or n.gpus < req.gpus_per_worker:
            continue
        need, moved = req.gpus_per_worker - inv.free(n.name), 0
        for m in by_node.get(n.name, []) if need > 0 else []:
            moved += m.request.total_gpus
            if moved >= need:
                break
        if moved >= need:
            cost[n.name] = moved
    names = inv.levels.names
    levels = names[: names.index(req.max_domain) + 1] if req.policy == "Required" else [*names, "cluster"]
    for level in levels:
        best: tuple[int, str, list[tuple[int, str]]] | None = None
        keys = {inv.domain_of(n, level) if level != "cluster" else "" for n in cost}
        for key in sorted(keys):
            members = sorted((c, n) for n, c in cost.items()
                             if (inv.domain_of(n, level) if level != "cluster" else "") == key)
            chosen = members[: req.workers]
            total = sum(c for c, _ in chosen)
            if len(chosen) == req.workers and total and (best is None or total < best[0]):
                best = (total, key, chosen)
        if best is not None:
            return best[2]
    return None


@FAST
@given(clusters(), gangs, st.data())
def test_a_bounded_sweep_answers_as_the_full_one_before_its_bound(
        inv: Inventory, req: GangRequest, data: st.DataObject) -> None:
    # the locality wait stops sweeping at gangs that end too late to count: before that bound
    # its answer must be the full sweep's, and past it none (or one at or past the bound)
    running = [RunningGang(PlacementResult(f"r{k}", True, [n.name], inv.used(n.name)), 0.0,
                           float(data.draw(st.integers(1, 50))))
               for k, n in enumerate(inv.nodes) if inv.used(n.name)]
    releases = _Releases(running)
    before = float(data.draw(st.integers(0, 60)))
    full, bounded = releases.soonest_fit(inv, req), releases.soonest_fit(inv, req, before=before)
    if full is not None and full < before:
        assert bounded == full
    else:
        assert bounded is None or bounded >= before


@FAST
@given(clusters(), gangs, st.data())
def test_sweeps_count_gangs_started_after_earlier_sweeps(
        inv: Inventory, req: GangRequest, data: st.DataObject) -> None:
    # a pass keeps one sorted list of releases and adds the gangs it starts as it goes; a sweep
    # after a start must answer as one over all those gangs sorted afresh, wherever a start's end
    # falls among ends an earlier sweep has read
    def gang(name: str, node_name: str, gpus: int) -> RunningGang:
        return RunningGang(PlacementResult(name, True, [node_name], gpus), 0.0,
                           float(data.draw(st.integers(1, 50))))

    running = [gang(f"r{k}", n.name, inv.used(n.name)) for k, n in enumerate(inv.nodes) if inv.used(n.name)]
    live, cur = _Releases(running), inv
    for k in range(data.draw(st.integers(1, 4))):
        assert live.soonest_fit(cur, req) == _Releases(running).soonest_fit(cur, req)
        room = [n.name for n in cur.nodes if cur.free(n.name)]
        if not room:
            break
        name = data.draw(st.sampled_from(room))
        started = gang(f"s{k}", name, data.draw(st.integers(1, cur.free(name))))
        cur = cur.allocate(started.result)
        running.append(started)
        live.add(started)


TAINTS = [{"key": "gpu", "value": "a100", "effect": "NoSchedule"},
          {"key": "maint", "value": "", "effect": "NoExecute"},
          {"key": "soft", "value": "", "effect": "PreferNoSchedule"}]


@FAST
@given(data=st.data())
def test_eligibility_is_each_nodes_own_test(data: st.DataObject) -> None:
    # eligibility is built from lists kept with the index; it must say per node what the rules say
    n = data.draw(st.integers(1, 16))
    nodes = [node(f"n{i:02d}", 8, cordoned=data.draw(st.booleans()), rdma=data.draw(st.booleans()),
                  product=data.draw(st.sampled_from(["H100", "A100"])),
                  taints=data.draw(st.lists(st.sampled_from(TAINTS), max_size=2,
                                            unique_by=lambda t: t["key"])))
             for i in range(n)]
    inv = build_inventory(nodes)
    tolerations = data.draw(st.sampled_from([(), ({"key": "gpu", "operator": "Exists"},),
                                             ({"operator": "Exists"},)]))
    needs_rdma = data.draw(st.booleans())
    product = data.draw(st.sampled_from([None, "H100", "A100"]))
    avoid = frozenset(data.draw(st.lists(st.sampled_from([f"n{i:02d}" for i in range(n)] + ["gone"]))))

    def allowed(raw: dict[str, Any]) -> bool:
        spec, meta = raw["spec"], raw["metadata"]
        hard = [t for t in spec.get("taints") or [] if t["effect"] in ("NoSchedule", "NoExecute")]
        tolerated = all(any(tol.get("operator") == "Exists" and tol.get("key") in (None, t["key"])
                            for tol in tolerations) for t in hard)
        has_rdma = any(k.startswith("rdma/") for k in raw["status"]["allocatable"])
        return (not spec.get("unschedulable") and (has_rdma or not needs_rdma)
                and product in (None, meta["labels"]["nvidia.com/gpu.product"])
                and meta["name"] not in avoid and tolerated)

    by_name = {raw["metadata"]["name"]: raw for raw in nodes}
    got = inv._eligible(tolerations, needs_rdma, product, avoid)
    assert got == [allowed(by_name[info.name]) for info in inv.nodes]


@FAST
@given(clusters(), st.lists(st.sampled_from([1, 2, 4, 8]), min_size=2, max_size=4), st.booleans())
def test_sums_for_another_worker_size_match_sums_built_alone(inv: Inventory, sizes: list[int],
                                                              rdma: bool) -> None:
    # a room for a second worker size shares the first one's free GPUs; it must equal one built alone
    fresh = inv.with_pods(())  # the same index with nothing counted: a new inventory, no sums kept
    used = inv.add_usage({n.name: inv.used(n.name) for n in inv.nodes})
    for gpw in sizes:
        got = used._room((), rdma, None, frozenset(), gpw)
        alone = _Room.build(fresh._topo, used._used, used._eligible((), rdma, None), gpw)
        assert got == alone


@st.composite
def node_changes(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Ready nodes in racks, and the same list with some nodes changed in place (same domains)."""
    n = draw(st.integers(1, 16))
    before = [node(f"n{i:02d}", draw(st.sampled_from([4, 8])),
                   clique=draw(st.sampled_from([None, f"c{i // 4}"])), rack=f"r{i // 4}", block=f"b{i // 8}",
                   rdma=draw(st.booleans()))
              for i in range(n)]
    after = list(before)
    changed = sorted(set(draw(st.lists(st.integers(0, n - 1), max_size=4))))
    for i in changed:
        after[i] = node(f"n{i:02d}", draw(st.sampled_from([0, 4, 8])),
                        clique=before[i]["metadata"]["labels"].get("nvidia.com/gpu.clique"),
                        rack=f"r{i // 4}", block=f"b{i // 8}", rdma=draw(st.booleans()),
                        cordoned=draw(st.booleans()), product=draw(st.sampled_from(["H100", "A100"])),
                        taints=draw(st.lists(st.sampled_from(TAINTS), max_size=2,
                                             unique_by=lambda t: t["key"])))
    return before, after, changed


@FAST
@given(node_changes(), gangs, st.data())
def test_an_index_patched_for_changed_nodes_places_as_one_built_anew(
        case: tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]], req: GangRequest,
        data: st.DataObject) -> None:
    before, after, changed = case
    pods = [pod(f"p{i}", raw["metadata"]["name"], data.draw(st.integers(0, 4)))
            for i, raw in enumerate(before)]
    old = build_inventory(before, pods)
    # eligibility, empty and current sums cached from the old facts: the patch carries them over
    constraints = [((), False, None, frozenset()), (({"key": "gpu", "operator": "Exists"},), True, None,
                                                     frozenset({"n01"})), ((), False, "H100", frozenset())]
    for tolerations, rdma, product, avoid in constraints[:2]:
        for gpw in (4, 8):
            old._room(tolerations, rdma, product, avoid, gpw)
            old._empty(tolerations, rdma, product, avoid, gpw)
    patched = old.with_node_updates([after[i] for i in changed])
    fresh = build_inventory(after, pods)
    assert patched is not None
    patched = patched.with_pods(pods)
    assert patched.nodes == fresh.nodes and patched._used == fresh._used
    for kept in ("alloc", "most_alloc", "uncordoned", "tainted", "node_domains"):
        assert getattr(patched._topo, kept) == getattr(fresh._topo, kept), kept
    for tolerations, rdma, product, avoid in constraints:
        assert patched._eligible(tolerations, rdma, product, avoid) == fresh._eligible(
            tolerations, rdma, product, avoid)
        for gpw in (4, 8):
            assert patched._empty(tolerations, rdma, product, avoid, gpw) == fresh._empty(
                tolerations, rdma, product, avoid, gpw)
            assert patched._room(tolerations, rdma, product, avoid, gpw) == fresh._room(
                tolerations, rdma, product, avoid, gpw)
    assert place_gang(patched, req) == place_gang(fresh, req)


def test_an_index_is_not_patched_for_a_node_that_moved_or_went_away() -> None:
    nodes = [node("a", rack="r1"), node("b", rack="r1")]
    inv = build_inventory(nodes)
    assert inv.with_node_updates([node("b", rack="r2")]) is None  # other domains
    assert inv.with_node_updates([node("b", rack="r1", ready=False)]) is None  # NotReady now
    assert inv.with_node_updates([node("c", rack="r1")]) is None  # not in the index
    assert inv.with_node_updates([node("b", rack="r1", cordoned=True)]) is not None
