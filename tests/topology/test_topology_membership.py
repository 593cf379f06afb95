"""A kept node index patched for Nodes that joined or left must be the index built anew."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from topo_fixtures import node, pod

from capstan.topology import GangRequest, Inventory, build_inventory, place_gang
from capstan.topology.membership import with_node_changes

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (tolerations, needs RDMA, GPU product, nodes to avoid): constraint sets whose sums get cached
CONSTRAINTS = [((), False, None, frozenset()),
               (({"key": "gpu", "operator": "Exists"},), True, None, frozenset({"n03", "x1"})),
               ((), False, "H100", frozenset())]
Nodes = list[dict[str, Any]]
TAINT = {"key": "gpu", "value": "a100", "effect": "NoSchedule"}


def _node(draw: st.DrawFn, name: str, rack: int, cliques: bool, **kw: Any) -> dict[str, Any]:
    return node(name, draw(st.sampled_from([0, 4, 8])), clique=f"c{rack}" if cliques else None,
                rack=f"r{rack}", block=f"b{rack // 2}", rdma=draw(st.booleans()),
                product=draw(st.sampled_from(["H100", "A100"])),
                taints=[TAINT] if draw(st.integers(0, 4)) == 0 else None, **kw)


@st.composite
def membership_changes(draw: st.DrawFn) -> tuple[Nodes, Nodes, Nodes, list[str]]:
    """Nodes before, Nodes after, the objects that changed or appeared, and the names deleted."""
    cliques = draw(st.booleans())  # NVLink domains of several nodes, or every node its own
    n = draw(st.integers(2, 20))
    racks = draw(st.integers(1, 4))
    before = [_node(draw, f"n{i:02d}", i % racks, cliques, ready=draw(st.integers(0, 6)) > 0)
              for i in range(n)]
    after: dict[str, dict[str, Any]] = {raw["metadata"]["name"]: raw for raw in before}
    changed: list[dict[str, Any]] = []
    gone: list[str] = []
    for i in sorted(set(draw(st.lists(st.integers(0, n - 1), max_size=4)))):
        name, rack = f"n{i:02d}", i % racks
        what = draw(st.sampled_from(["delete", "not ready", "ready", "facts"]))
        if what == "delete":
            del after[name]
            gone.append(name)
            continue
        new = _node(draw, name, rack, cliques, ready=what != "not ready")
        after[name] = new
        changed.append(new)
    for k in range(draw(st.integers(0, 3))):  # new nodes, mostly in racks that exist
        rack = draw(st.sampled_from([*range(racks), racks]))
        name = draw(st.sampled_from([f"n{n + k:02d}", f"m{k}", f"a{k}", f"n{k:02d}x"]))
        if name in after:
            continue
        new = _node(draw, name, rack, cliques, ready=draw(st.integers(0, 4)) > 0)
        after[name] = new
        changed.append(new)
    return before, list(after.values()), changed, gone


def _warm(inv: Inventory) -> None:
    """Cache what passes cache on an index: eligibility, empty and current sums, tightest nodes."""
    for tolerations, rdma, product, avoid in CONSTRAINTS[:2]:
        for gpw in (1, 4, 8):
            inv._empty(tolerations, rdma, product, avoid, gpw)
            room = inv._room(tolerations, rdma, product, avoid, gpw)
            if any(room.cap):
                room.tightest(inv._topo.most_alloc)


def _same_as_built_anew(patched: Inventory, fresh: Inventory, reqs: list[GangRequest]) -> None:
    got, want = patched._topo, fresh._topo
    assert patched.nodes == fresh.nodes and patched.not_ready == fresh.not_ready
    assert patched._used == fresh._used
    for field in ("index", "names", "dom_of", "dom_keys", "dom_values", "children", "parent", "alloc",
                  "most_alloc", "uncordoned", "tainted", "node_domains"):
        assert getattr(got, field) == getattr(want, field), field
    for tolerations, rdma, product, avoid in CONSTRAINTS:
        assert patched._eligible(tolerations, rdma, product, avoid) == fresh._eligible(
            tolerations, rdma, product, avoid)
        for gpw in (1, 4, 8):
            assert patched._empty(tolerations, rdma, product, avoid, gpw) == fresh._empty(
                tolerations, rdma, product, avoid, gpw)
            room, anew = (inv._room(tolerations, rdma, product, avoid, gpw) for inv in (patched, fresh))
            assert room == anew
            if any(anew.cap):
                assert room.tightest(got.most_alloc) == anew.tightest(want.most_alloc)
    for req in reqs:
        assert place_gang(patched, req) == place_gang(fresh, req)


@FAST
@given(membership_changes(), st.data())
def test_an_index_patched_for_nodes_that_joined_or_left_is_the_index_built_anew(
        case: tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[str]],
        data: st.DataObject) -> None:
    before, after, changed, gone = case
    pods = [pod(f"p{i}", raw["metadata"]["name"], data.draw(st.integers(0, 4)))
            for i, raw in enumerate(after)]
    pods.append(pod("pending", None, 2))
    # the pods of the nodes that were there (a pod of a node that joins is counted once it has)
    names = {raw["metadata"]["name"] for raw in before}
    earlier = [p for p in pods if p["spec"].get("nodeName") in names]
    old = build_inventory(before, earlier)
    _warm(old)
    patched = with_node_changes(old, changed, gone)
    event("built anew" if patched is None else "patched")
    if patched is None:  # a domain appears or empties: the caller builds anew
        return
    reqs = [GangRequest("one", 1, data.draw(st.sampled_from([1, 4, 8]))),
            GangRequest("gang", data.draw(st.integers(2, 6)), 4, policy=data.draw(
                st.sampled_from(["Required", "Preferred"])), max_domain="rack")]
    _same_as_built_anew(patched.with_pods(pods), build_inventory(after, pods), reqs)
    # and the old index is untouched: inventories still on it read what they read before
    _same_as_built_anew(old, build_inventory(before, earlier), reqs)


def _rack(cliques: bool) -> list[dict[str, Any]]:
    return [node(f"n{i}", 8, clique=f"c{i // 4}" if cliques else None, rack=f"r{i // 4}", block="b")
            for i in range(8)]


def test_nodes_leaving_and_joining_domains_that_stay_are_patched() -> None:
    for cliques in (False, True):
        nodes = _rack(cliques)
        old = build_inventory(nodes, [pod("p", "n1", 4)])
        _warm(old)
        # n2 deleted, n5 NotReady, a new node joins rack r1, n7 cordoned: all in one patch
        new = node("n45", 8, clique="c1" if cliques else None, rack="r1", block="b")
        cordoned = node("n7", 8, clique="c1" if cliques else None, rack="r1", block="b", cordoned=True)
        not_ready = node("n5", 8, clique="c1" if cliques else None, rack="r1", block="b", ready=False)
        patched = with_node_changes(old, [new, cordoned, not_ready], ["n2"])
        assert patched is not None
        after = [n for n in nodes if n["metadata"]["name"] not in ("n2", "n5", "n7")]
        after += [new, cordoned, not_ready]
        pods = [pod("p", "n1", 4)]
        _same_as_built_anew(patched.with_pods(pods), build_inventory(after, pods),
                            [GangRequest("one", 1, 8),
                             GangRequest("four", 4, 8, policy="Required", max_domain="rack")])
        assert patched.not_ready == ("n5",)
        # n5 back to Ready: it joins again
        back = with_node_changes(patched, [node("n5", 8, clique="c1" if cliques else None, rack="r1",
                                                block="b")], [])
        assert back is not None and back.not_ready == () and back.free("n5") == 8


def test_an_index_is_built_anew_when_a_domain_appears_or_empties() -> None:
    nodes = [node("a", rack="r1"), node("b", rack="r1"), node("c", rack="r2")]
    inv = build_inventory(nodes)
    assert with_node_changes(inv, [node("d", rack="r3")], []) is None  # a new rack
    assert with_node_changes(inv, [], ["c"]) is None  # rack r2 left empty
    assert with_node_changes(inv, [node("c", rack="r2", ready=False)], []) is None  # the same, NotReady
    # an NVLink domain of its own, by a clique label, on a cluster where no node has one
    assert with_node_changes(inv, [node("d", clique="x", rack="r1")], []) is None
    assert with_node_changes(inv, [node("b", rack="r2")], []) is None  # moved to another rack
    kept = with_node_changes(inv, [], ["b"])  # r1 keeps a
    assert kept is not None and [n.name for n in kept.nodes] == ["a", "c"]
    # NVLink domains of two nodes, each down to one: an index of one-node domains is laid out
    # otherwise (the nodes' own lists are its narrowest sums)
    pairs = build_inventory([node(f"n{i}", clique=f"c{i // 2}", rack="r") for i in range(4)])
    assert with_node_changes(pairs, [], ["n1"]) is not None
    assert with_node_changes(pairs, [], ["n1", "n3"]) is None
    # every node its own NVLink domain, one of them by a clique label: its domain sorts after any
    # node's own, so a node joining after it would not be where its domain sorts
    mixed = [node("a", rack="r"), node("b", clique="x", rack="r")]
    inv = build_inventory(mixed)
    assert inv._topo.node_domains
    assert with_node_changes(inv, [node("c", rack="r")], []) is None
    first = with_node_changes(inv, [node("0", rack="r")], [])
    assert first is not None
    _same_as_built_anew(first, build_inventory([*mixed, node("0", rack="r")]), [GangRequest("one", 1, 8)])
