"""Defragmentation moves: what moves where, and what never moves."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from topo_fixtures import hgx_cluster, node

from capstan.topology import (
    GangRequest,
    Inventory,
    MovableGang,
    MovePolicy,
    PlacementResult,
    RunningGang,
    build_inventory,
    place_gang,
    plan_defragmentation,
    plan_locality_moves,
)

NOW = 10_000.0
ANY_AGE = MovePolicy(min_run_s=0)


def _run(inv: Inventory, name: str, node_name: str, gpus: int, since: float = 0.0,
         **req: object) -> tuple[Inventory, MovableGang]:
    """A one-worker gang of ``gpus`` running on ``node_name``."""
    res = PlacementResult(name, True, [node_name], gpus, level="nvlink", domain=node_name)
    return inv.allocate(res), MovableGang(GangRequest(name, 1, gpus, **req), res, since)  # type: ignore[arg-type]


def _apply(inv: Inventory, gangs: list[MovableGang], moves: list) -> Inventory:  # type: ignore[type-arg]
    by_name = {g.request.name: g for g in gangs}
    for mv in moves:
        inv = inv.release(by_name[mv.gang].result).allocate(mv.to)
    return inv


def test_scattered_idle_gpus_are_gathered_into_a_whole_node() -> None:
    inv = build_inventory([node("n0", clique="a"), node("n1", clique="b"), node("n2", clique="c")], [])
    inv, a = _run(inv, "a", "n0", 4)
    inv, b = _run(inv, "b", "n1", 4)
    inv, c = _run(inv, "c", "n2", 8)
    whole = GangRequest("whole", 1, 8, submitted=1)
    assert inv.free_gpus == 8 and not place_gang(inv, whole).placed

    moves = plan_defragmentation(inv, [whole], [a, b, c], NOW, ANY_AGE)

    assert len(moves) == 1  # one 4-GPU gang moves next to the other
    mv = moves[0]
    assert mv.for_gang == "whole" and "making room for whole" in mv.reason
    (moved,) = [g for g in (a, b) if g.request.name == mv.gang]
    (stays,) = [g for g in (a, b) if g.request.name != mv.gang]
    assert mv.to.nodes == stays.result.nodes  # onto the other partly used node
    after = _apply(inv, [a, b, c], moves)
    res = place_gang(after, whole)
    assert res.placed and res.nodes == moved.result.nodes


def test_nothing_moves_when_the_gang_fits_or_cannot_fit_by_count() -> None:
    inv = build_inventory([node("n0"), node("n1")], [])
    inv, a = _run(inv, "a", "n0", 4)
    fits = GangRequest("fits", 1, 8)
    assert plan_defragmentation(inv, [fits], [a], NOW, ANY_AGE) == []
    inv, b = _run(inv, "b", "n1", 6)
    too_big = GangRequest("big", 1, 8)  # 6 GPUs idle in all: no move makes 8
    assert plan_defragmentation(inv, [too_big], [a, b], NOW, ANY_AGE) == []


def test_young_gangs_and_gangs_that_cannot_land_elsewhere_stay() -> None:
    inv = build_inventory([node("n0"), node("n1")], [])
    inv, a = _run(inv, "a", "n0", 4, since=NOW - 60)
    inv, b = _run(inv, "b", "n1", 4, since=NOW - 60)
    whole = GangRequest("whole", 1, 8)
    # both ran 60 s only: the default policy lets a gang run 10 min between moves
    assert plan_defragmentation(inv, [whole], [a, b], NOW) == []
    assert plan_defragmentation(inv, [whole], [a, b], NOW + 600)  # old enough now
    # a gang that needs its node's product cannot go anywhere else
    inv = build_inventory([node("n0", product="A"), node("n1", product="B")], [])
    inv, a = _run(inv, "a", "n0", 4, gpu_product="A")
    inv, b = _run(inv, "b", "n1", 4, gpu_product="B")
    assert plan_defragmentation(inv, [whole], [a, b], NOW, ANY_AGE) == []


def test_required_gang_gets_room_only_inside_its_max_domain() -> None:
    # two racks of two nodes; each node half busy by a movable gang
    inv = build_inventory(hgx_cluster(blocks=1, racks=2, nodes_per_rack=2), [])
    gangs = []
    for i, name in enumerate(n["metadata"]["name"] for n in hgx_cluster(blocks=1, racks=2, nodes_per_rack=2)):
        inv, g = _run(inv, f"g{i}", name, 4)
        gangs.append(g)
    req = GangRequest("pair", 2, 8, policy="Required", max_domain="rack")
    moves = plan_defragmentation(inv, [req], gangs, NOW, ANY_AGE)
    assert moves
    res = place_gang(_apply(inv, gangs, moves), req)
    assert res.placed and res.level == "rack"
    # an NVLink-bound pair (HGX: one node) can never fit: nothing is moved for it
    nv = GangRequest("nv", 2, 8, policy="Required", max_domain="nvlink")
    assert plan_defragmentation(inv, [nv], gangs, NOW, ANY_AGE) == []


def test_first_waiting_gang_in_queue_order_is_helped() -> None:
    inv = build_inventory([node("n0"), node("n1"), node("n2")], [])
    inv, a = _run(inv, "a", "n0", 4)
    inv, b = _run(inv, "b", "n1", 4)
    inv, c = _run(inv, "c", "n2", 2)
    late = GangRequest("late", 1, 8, submitted=5)
    urgent = GangRequest("urgent", 1, 8, submitted=9, priority=10)
    moves = plan_defragmentation(inv, [late, urgent], [a, b, c], NOW, ANY_AGE)
    assert moves and {m.for_gang for m in moves} == {"urgent"}


gpus_on = st.sampled_from([1, 2, 4])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(gpus_on, max_size=4), min_size=2, max_size=6), st.sampled_from([4, 8]))
def test_moves_never_overcommit_and_always_make_room(loads: list[list[int]], want: int) -> None:
    names = [f"n{i}" for i in range(len(loads))]
    inv = build_inventory([node(n, clique=n) for n in names], [])
    gangs: list[MovableGang] = []
    for name, load in zip(names, loads, strict=True):
        for k, gpus in enumerate(load):
            if inv.free(name) >= gpus:
                inv, g = _run(inv, f"{name}-g{k}", name, gpus)
                gangs.append(g)
    req = GangRequest("waiting", 1, want)
    moves = plan_defragmentation(inv, [req], gangs, NOW, ANY_AGE)
    if not moves:
        return
    assert len({m.gang for m in moves}) == len(moves)  # each gang moves once
    after = _apply(inv, gangs, moves)
    assert all(0 <= after.used(n) <= 8 for n in names)
    assert after.free_gpus == inv.free_gpus  # moves only rearrange
    assert place_gang(after, req).placed


def test_moves_only_when_the_waiting_gang_gains_more_than_the_movers_lose() -> None:
    inv = build_inventory([node("n0", clique="a"), node("n1", clique="b"), node("n2", clique="c")], [])
    inv, a = _run(inv, "a", "n0", 4, since=NOW - 3600)
    inv, b = _run(inv, "b", "n1", 4, since=NOW - 3600)
    inv, c = _run(inv, "c", "n2", 8)
    whole = GangRequest("whole", 1, 8, submitted=1)
    pol = MovePolicy(min_run_s=0, restart_s=300, checkpoint_every_s=1800)
    # a move costs 4 GPUs x (300 s down + 900 s of lost work) = 4,800 GPU-seconds
    assert pol.cost_gpu_s(a, NOW) == 4 * (300 + 900)

    def running(end_c: float) -> list[RunningGang]:
        return [RunningGang(g.result, g.running_since, end) for g, end in ((a, NOW + 50_000),
                                                                           (b, NOW + 50_000), (c, end_c))]

    # c ends in 100 s: waiting costs the 8-GPU gang 800 GPU-seconds, less than a move: no move
    assert plan_defragmentation(inv, [whole], [a, b, c], NOW, pol, running(NOW + 100)) == []
    # c runs another 10,000 s: starting now gains 80,000 GPU-seconds: the move pays
    assert len(plan_defragmentation(inv, [whole], [a, b, c], NOW, pol, running(NOW + 10_000))) == 1
    # an unknown end: no model of the gain, fragmentation alone decides (as without running gangs)
    unknown = [*running(NOW + 100)[:2], RunningGang(c.result, 0.0, None)]
    assert len(plan_defragmentation(inv, [whole], [a, b, c], NOW, pol, unknown)) == 1


def _two_racks() -> tuple[Inventory, list[MovableGang]]:
    """Racks A (a0, a1) and B (b0, b1) of 4-GPU nodes, one block: a 2 x 4-GPU gang fits now only
    over a1 + b0 (spread over the block); moving the 1-GPU gang on a0 onto b1 frees rack A."""
    nodes = [node(f"{r}{n}", 4, clique=r.upper(), rack=r.upper(), block="blk")
             for r in "ab" for n in range(2)]
    inv = build_inventory(nodes, [])
    inv, x = _run(inv, "x", "a0", 1, since=NOW - 3600)
    inv, y = _run(inv, "y", "b1", 3, since=NOW - 3600)
    return inv, [x, y]


SLOWDOWN = {"nvlink": 1.0, "rack": 1.15, "block": 1.3, "zone": 1.6, "cluster": 1.6}


def test_a_gang_about_to_start_spread_gets_room_in_one_domain_when_that_pays() -> None:
    inv, gangs = _two_racks()
    pair = GangRequest("pair", 2, 4, policy="Preferred", expected_duration_s=3600)
    assert place_gang(inv, pair).level == "block"  # it would start now, spread

    moves = plan_locality_moves(inv, [pair], gangs, NOW, SLOWDOWN, ANY_AGE)

    # 8 GPUs x 3,600 s x (1.3 - 1.0) saved > 1 GPU x (300 s down + 900 s lost): x moves off a0
    assert [(m.gang, m.to.nodes, m.for_gang, m.for_level) for m in moves] == [("x", ["b1"], "pair", "nvlink")]
    assert "making room for pair in one NVLink domain" in moves[0].reason
    held = GangRequest("pair", 2, 4, policy="Required", max_domain="nvlink", expected_duration_s=3600)
    assert not place_gang(inv, held).placed  # held to its domain, it waits for the move
    res = place_gang(_apply(inv, gangs, moves), held)
    assert res.placed and sorted(res.nodes) == ["a0", "a1"]


def test_no_locality_move_when_it_costs_more_than_it_saves_or_nothing_says_so() -> None:
    inv, gangs = _two_racks()
    # 8 GPUs x 300 s x 0.3 = 720 GPU-seconds saved < 1,200 the move costs
    short = GangRequest("short", 2, 4, policy="Preferred", expected_duration_s=300)
    assert plan_locality_moves(inv, [short], gangs, NOW, SLOWDOWN, ANY_AGE) == []
    # no declared run time: no model of what spreading costs
    unknown = GangRequest("unknown", 2, 4, policy="Preferred")
    assert plan_locality_moves(inv, [unknown], gangs, NOW, SLOWDOWN, ANY_AGE) == []
    # a gang that fits in one domain now, or a one-worker gang, gets no move
    inv2 = inv.release(gangs[0].result)
    pair = GangRequest("pair", 2, 4, policy="Preferred", expected_duration_s=3600)
    assert plan_locality_moves(inv2, [pair], gangs[1:], NOW, SLOWDOWN, ANY_AGE) == []
    one = GangRequest("one", 1, 4, policy="Preferred", expected_duration_s=3600)
    assert plan_locality_moves(inv, [one], gangs, NOW, SLOWDOWN, ANY_AGE) == []
    # movers too young to move stay: the default policy lets a gang run 10 min between moves
    assert plan_locality_moves(inv, [pair], gangs, NOW - 3600 + 60, SLOWDOWN) == []


def test_locality_movers_take_the_gangs_spread_nodes_while_another_gang_waits() -> None:
    inv, gangs = _two_racks()
    pair = GangRequest("pair", 2, 4, policy="Preferred", expected_duration_s=3600, submitted=1)
    assert sorted(place_gang(inv, pair).nodes) == ["a1", "b0"]  # spread over the block
    # three whole nodes: does not fit now (only a1 and b0 are whole), so it waits for GPUs
    big = GangRequest("big", 3, 4, policy="Preferred", expected_duration_s=3600, submitted=2)
    assert not place_gang(inv, big).placed

    alone = plan_locality_moves(inv, [pair], gangs, NOW, SLOWDOWN, ANY_AGE)
    busy = plan_locality_moves(inv, [pair, big], gangs, NOW, SLOWDOWN, ANY_AGE)

    # with nothing waiting, x joins the partly used b1 and b0 stays whole
    assert [(m.gang, m.to.nodes) for m in alone] == [("x", ["b1"])]
    # while big waits, x takes b0, a node pair would have spread over: the move leaves big no
    # whole node it would not have had anyway, and b1's idle GPU stays open to one-worker jobs
    assert [(m.gang, m.to.nodes, m.for_level) for m in busy] == [("x", ["b0"], "nvlink")]
    after = _apply(inv, gangs, busy)
    held = GangRequest("pair", 2, 4, policy="Required", max_domain="nvlink", expected_duration_s=3600)
    assert sorted(place_gang(after, held).nodes) == ["a0", "a1"]
    assert after.free("b1") == 1
