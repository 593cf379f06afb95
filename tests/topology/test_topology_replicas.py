from topo_fixtures import hgx_cluster, nvl72_cluster

from capstan.topology import build_inventory, place_replicas


def test_tp_replicas_on_single_nodes() -> None:
    inv = build_inventory(hgx_cluster(blocks=1, racks=1, nodes_per_rack=2), [])
    out = place_replicas(inv, 4, 4)
    assert out.placed and out.gpus_per_pod == 4
    assert all(len(r) == 1 for r in out.replicas)
    assert out.inventory is not None and out.inventory.free_gpus == 0
    more = place_replicas(out.inventory, 1, 4)
    assert not more.placed and more.reason.startswith("replica 1 of 1: no node has 4 free GPUs")


def test_tp16_replica_spans_nodes_inside_one_clique() -> None:
    inv = build_inventory(nvl72_cluster(racks=2), [])
    out = place_replicas(inv, 8, 16)
    assert out.placed and out.gpus_per_pod == 4
    for rep in out.replicas:
        assert len(rep) == 4
        assert len({inv.domain_of(n, "nvlink") for n in rep}) == 1
    # 72 GPUs per clique: 4 replicas fill one clique (64), never split over two
    out = place_replicas(inv, 9, 16)
    assert not out.placed and len(out.replicas) == 8 and "NVLink domain" in out.reason
