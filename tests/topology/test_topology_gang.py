import pytest
from topo_fixtures import hgx_cluster, node, nvl72_cluster, pod

from capstan.topology import GangRequest, build_inventory, place_gang


def _fill(nodes: dict[str, int]) -> list[dict]:
    return [pod(f"p-{n}", n, g) for n, g in nodes.items() if g]


def test_kep_bestfit_example_3_3_2_1() -> None:
    # nodes that fit 3,3,2,1 one-GPU pods in one rack; 7 pods -> 3+3+1 (KEP 2724 BestFit)
    nodes = [node(n, 8, rack="r", block="b") for n in ("n1", "n2", "n3", "n4")]
    inv = build_inventory(nodes, _fill({"n1": 5, "n2": 5, "n3": 6, "n4": 7}))
    res = place_gang(inv, GangRequest("g", 7, 1, policy="Required", max_domain="rack"))
    assert res.placed
    counts = {n: res.nodes.count(n) for n in set(res.nodes)}
    assert sorted(counts.values(), reverse=True) == [3, 3, 1]
    assert counts["n4"] == 1 and "n3" not in counts
    assert res.nodes[:3] == ["n1"] * 3  # ranks grouped per node, biggest first, ties by name


def test_smallest_level_and_rank_grouping() -> None:
    inv = build_inventory(hgx_cluster(blocks=2, racks=2, nodes_per_rack=4), [])
    res = place_gang(inv, GangRequest("g", 1, 8))
    assert res.placed and res.level == "nvlink"
    res = place_gang(inv, GangRequest("g", 4, 8))
    assert res.placed and res.level == "rack" and len(set(res.nodes)) == 4
    res = place_gang(inv, GangRequest("g", 6, 8))
    assert res.placed and res.level == "block"
    # ranks of one rack are contiguous: 4 from the first rack then 2 from the other
    racks = [n.rsplit("-", 1)[0] for n in res.nodes]
    assert racks == sorted(racks, key=racks.index) and len(set(racks[:4])) == 1


def test_bestfit_prefers_the_fullest_fitting_domain() -> None:
    nodes = hgx_cluster(blocks=1, racks=2, nodes_per_rack=4)
    inv = build_inventory(nodes, _fill({"b0-r1-n0": 8}))  # rack r1 has 24 free, r0 has 32
    res = place_gang(inv, GangRequest("g", 3, 8, policy="Required", max_domain="rack"))
    assert res.placed and res.domain == "b0-r1"


def test_nvl72_clique_preferred_over_rack_of_hgx() -> None:
    nodes = nvl72_cluster(racks=2) + hgx_cluster(blocks=1, racks=1, nodes_per_rack=8, gpus=4)
    inv = build_inventory(nodes, _fill({f"nvl1-n{i:02d}": 4 for i in range(6)}))
    res = place_gang(inv, GangRequest("g", 12, 4, policy="Required", max_domain="nvlink"))
    assert res.placed and res.level == "nvlink"
    # BestFit: the fuller clique (nvl1, 48 free) rather than the empty one
    assert all(n.startswith("nvl1-") for n in res.nodes)
    # 8 workers x 4 fit in one HGX rack but never in one NVLink domain there: the clique wins
    res = place_gang(inv, GangRequest("g", 8, 4))
    assert res.level == "nvlink" and all(n.startswith("nvl") for n in res.nodes)


def test_required_waits_preferred_widens() -> None:
    inv = build_inventory(nvl72_cluster(racks=2), _fill({f"nvl0-n{i:02d}": 4 for i in range(12)}))
    big = GangRequest("g", 20, 4, policy="Required", max_domain="nvlink")
    res = place_gang(inv, big)
    assert not res.placed
    assert res.reason.startswith("needs 80 GPUs (20 workers × 4) within one NVLink domain; "  # noqa: RUF001
                                 "the largest free NVLink domain has 72 free GPUs")
    assert "even empty" in res.reason and "Preferred" in res.reason
    wide = place_gang(inv, GangRequest("g", 20, 4, policy="Preferred"))
    assert wide.placed and wide.level == "block"


def test_required_reason_when_it_would_fit_later() -> None:
    busy = {"nvl0-n00": 4, "nvl0-n01": 4, "nvl1-n00": 4, "nvl1-n01": 4}
    inv = build_inventory(nvl72_cluster(racks=2), _fill(busy))
    res = place_gang(inv, GangRequest("g", 18, 4, policy="Required"))
    assert not res.placed
    assert "the largest free NVLink domain has 64 free GPUs" in res.reason
    assert res.reason.endswith("waiting for GPUs to free up")


def test_reasons_per_node() -> None:
    inv = build_inventory([node("a", 8), node("b", 8)], _fill({"a": 4, "b": 6}))
    assert place_gang(inv, GangRequest("g", 1, 8)).reason.startswith("no node has 8 free GPUs (largest: 4)")
    assert "lower gpusPerWorker" in place_gang(inv, GangRequest("g", 1, 16)).reason
    res = place_gang(inv, GangRequest("g", 4, 2))
    assert res.reason == ("needs 8 GPUs (4 workers × 2); schedulable nodes have room for 3 workers now "  # noqa: RUF001
                          "(2 nodes with ≥2 free GPUs); waiting for GPUs to free up")


def test_rdma_and_exclusions() -> None:
    nodes = [node("a"), node("cordoned", cordoned=True, rdma=True), node("down", ready=False, rdma=True),
             node("tainted", rdma=True,
                  taints=[{"key": "dedicated", "value": "infer", "effect": "NoSchedule"}]),
             node("soft", taints=[{"key": "x", "effect": "PreferNoSchedule"}])]
    inv = build_inventory(nodes, [])
    res = place_gang(inv, GangRequest("g", 1, 8, needs_rdma=True))
    assert not res.placed and res.reason.startswith("no schedulable node with RDMA")
    tol = ({"key": "dedicated", "operator": "Equal", "value": "infer", "effect": "NoSchedule"},)
    res = place_gang(inv, GangRequest("g", 1, 8, needs_rdma=True, tolerations=tol))
    assert res.nodes == ["tainted"]
    res = place_gang(inv, GangRequest("g", 2, 8, policy="None"))
    assert sorted(res.nodes) == ["a", "soft"]  # PreferNoSchedule does not block
    assert not place_gang(inv, GangRequest("g", 3, 8, policy="None")).placed


def test_no_schedulable_node_reason_counts() -> None:
    inv = build_inventory([node("c", cordoned=True), node("d", ready=False),
                           node("t", taints=[{"key": "k", "effect": "NoExecute"}])], [])
    reason = place_gang(inv, GangRequest("g", 1, 1)).reason
    assert reason == "no schedulable node (1 cordoned, 1 tainted without a matching toleration, 1 NotReady)"


def test_cpu_gang_uses_cpu_nodes_first() -> None:
    nodes = [node("gpu", 8), node("cpu1", 0), node("cpu2", 0), node("off", 0, cordoned=True)]
    inv = build_inventory(nodes, [])
    res = place_gang(inv, GangRequest("cpu", 3, 0))
    assert res.placed and res.nodes == ["cpu1", "cpu1", "cpu2"]
    assert inv.allocate(res).free_gpus == 8


def test_gpu_product_filter() -> None:
    inv = build_inventory([node("h", product="H100"), node("a", product="A100")], [])
    assert place_gang(inv, GangRequest("g", 1, 8, gpu_product="A100")).nodes == ["a"]


def test_deterministic_and_validated() -> None:
    inv = build_inventory(hgx_cluster(), [])
    req = GangRequest("g", 5, 4, policy="None")
    assert place_gang(inv, req) == place_gang(inv, req)
    with pytest.raises(ValueError):
        place_gang(inv, GangRequest("g", 0, 8))
    with pytest.raises(ValueError):
        place_gang(inv, GangRequest("g", 1, 8, max_domain="pod"))
