import random
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from topo_fixtures import node, nvl72_cluster, pod

from capstan.topology import build_inventory, parse_count, pod_gpu_request, tolerates


def test_parse_count() -> None:
    assert parse_count("8") == 8
    assert parse_count(4) == 4
    assert parse_count("1k") == 1000
    assert parse_count("2Ki") == 2048
    assert parse_count("1500m") == 1
    assert parse_count("junk") == 0
    assert parse_count(None) == 0


def test_inventory_from_realistic_json() -> None:
    nodes = [node("a", rack="r1", block="b1", rdma=True), node("b", rack="r1", block="b1"),
             node("c", ready=False), node("cpu", gpus=0)]
    pods = [pod("p1", "a", 2), pod("p2", "a", 1, phase="Pending"), pod("done", "a", 4, phase="Succeeded"),
            pod("failed", "b", 8, phase="Failed"), pod("unbound", None, 8), pod("ghost", "gone", 8),
            pod("init", "b", 1, init_gpus=3)]
    inv = build_inventory(nodes, pods)
    assert [n.name for n in inv.nodes] == ["a", "b", "cpu"]
    assert inv.not_ready == ("c",)
    assert inv.free("a") == 5 and inv.used("a") == 3
    assert inv.free("b") == 5  # init container needs 3 alone > 1 for the main container
    assert inv.node("a").rdma and not inv.node("b").rdma
    assert inv.node("a").product == "NVIDIA-H100-80GB-HBM3"
    assert inv.total_gpus == 16 and inv.free_gpus == 10
    # no clique label: the node is its own NVLink domain; rack/block keys are label paths
    assert inv.domain_of("a", "nvlink") == "node=a"
    assert inv.domain_of("a", "rack") == "zone=zone-a/block=b1/rack=r1"
    assert inv.domain_of("a", "rack") == inv.domain_of("b", "rack")


def test_sidecar_init_containers_add_up() -> None:
    p = pod("p", "a", 2)
    p["spec"]["initContainers"] = [{"name": "s", "restartPolicy": "Always",
                                    "resources": {"limits": {"nvidia.com/gpu": "1"}}}]
    assert pod_gpu_request(p) == 3


def test_clique_domains_and_span() -> None:
    inv = build_inventory(nvl72_cluster(racks=2), [])
    assert inv.domain_of("nvl0-n00", "nvlink") == inv.domain_of("nvl0-n17", "nvlink")
    assert inv.domain_of("nvl0-n00", "nvlink") != inv.domain_of("nvl1-n00", "nvlink")
    assert inv.span_level(["nvl0-n00", "nvl0-n05"]) == "nvlink"
    assert inv.span_level(["nvl0-n00", "nvl1-n05"]) == "block"


def test_tolerations() -> None:
    taint = ("nvidia.com/gpu", "present", "NoSchedule")
    assert tolerates([{"key": "nvidia.com/gpu", "operator": "Exists"}], taint)
    assert tolerates([{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}], taint)
    assert not tolerates([{"key": "nvidia.com/gpu", "value": "other"}], taint)
    assert not tolerates([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}], taint)
    assert tolerates([{"operator": "Exists"}], taint)
    assert not tolerates([], taint)


def test_allocate_release_are_pure() -> None:
    from capstan.topology import GangRequest, place_gang

    inv = build_inventory([node("a"), node("b")], [])
    res = place_gang(inv, GangRequest("g", 2, 8, policy="None"))
    after = inv.allocate(res)
    assert inv.free_gpus == 16 and after.free_gpus == 0
    assert after.release(res).free_gpus == 16
    import pytest

    with pytest.raises(ValueError):
        after.allocate(res)


def test_counting_pods_again_reads_only_the_ones_that_are_new_objects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import capstan.topology.inventory as inventory

    nodes = [node("n0", 8), node("n1", 8)]
    pods = [pod("a", "n0", 2), pod("b", "n1", 4)]
    inv = build_inventory(nodes, pods)
    read: list[str] = []
    real = inventory.pod_gpu_request

    def counting(p: Mapping[str, Any]) -> int:
        read.append(p["metadata"]["name"])
        return real(p)

    monkeypatch.setattr(inventory, "pod_gpu_request", counting)
    # the watch cache hands out the same object for a pod until it changes: "b" changed (a new
    # object asking for 8), "c" is new, "a" is the object counted before
    again = inv.with_pods([pods[0], pod("b", "n1", 8), pod("c", "n0", 1)])
    assert sorted(read) == ["b", "c"]
    assert [again.free("n0"), again.free("n1")] == [5, 0]
    fresh = build_inventory(nodes, [pods[0], pod("b", "n1", 8), pod("c", "n0", 1)])
    assert [fresh.free("n0"), fresh.free("n1")] == [5, 0]


def test_counting_pods_again_follows_pods_that_bound_finished_or_left() -> None:
    # a kept index remembers where each pod object held GPUs; the watch cache hands out a new
    # object for a pod that changed, and that one is read afresh
    nodes = [node("n0", 8), node("n1", 8)]
    waiting, running, done = pod("w", None, 4), pod("r", "n0", 2), pod("d", "n1", 8, phase="Succeeded")
    inv = build_inventory(nodes, [waiting, running, done, pod("gone", "nx", 8)])
    assert [inv.free("n0"), inv.free("n1")] == [6, 8]
    # "w" bound to n1, "r" finished, "d" the same object (still done), a pod on an unknown node left
    again = inv.with_pods([pod("w", "n1", 4), pod("r", "n0", 2, phase="Failed"), done])
    assert [again.free("n0"), again.free("n1")] == [8, 4]
    # the same objects as the first count, offered again: counted as then
    assert [inv.with_pods([waiting, running, done]).free(n) for n in ("n0", "n1")] == [6, 8]


def pinned(name: str, node_name: str, gpus: int, **kw: Any) -> dict[str, Any]:
    """A pod Capstan placed on ``node_name`` (one-node ``metadata.name`` affinity), not bound yet."""
    made = pod(name, None, gpus, **kw)
    one_node = {"key": "metadata.name", "operator": "In", "values": [node_name]}
    made["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [one_node]}]}}}
    return made


def test_a_gang_placed_a_moment_ago_holds_its_gpus_before_it_is_bound() -> None:
    nodes = [node("n0", 8), node("n1", 8)]
    either = pinned("either", "n1", 8)
    either["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchFields"][0]["values"] = ["n0", "n1"]  # not pinned to one node
    inv = build_inventory(nodes, [pinned("w", "n1", 4), pinned("done", "n0", 8, phase="Failed"), either])
    assert [inv.free("n0"), inv.free("n1")] == [8, 4]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**9), passes=st.integers(1, 8))
def test_counting_pods_again_after_any_edits_counts_as_a_fresh_count(seed: int, passes: int) -> None:
    """A kept index counts each pass's pods from the last count, by the pod objects new and gone
    since; whatever the watch cache's list went through, every node's free GPUs are those of a
    fresh count. Pods pinned to a node but not bound yet hold their GPUs there too."""
    rng = random.Random(seed)
    nodes = [node(f"n{k}", 8) for k in range(4)]
    serial = iter(range(10**6))

    def new_pod() -> dict[str, Any]:
        where = rng.choice(["n0", "n1", "n2", "n3", "nx", None])
        phase = rng.choice(["Running", "Running", "Failed"])
        made = pod(f"p{next(serial)}", where, rng.randint(0, 2), phase=phase)
        if where is None and rng.random() < 0.5:  # placed by Capstan, not bound by kube-scheduler yet
            return pinned(made["metadata"]["name"], rng.choice(["n1", "n2"]), rng.randint(0, 2))
        return made

    pods = [new_pod() for _ in range(rng.randint(0, 12))]
    kept = build_inventory(nodes, pods)
    for _ in range(passes):
        for _ in range(rng.randint(0, 4)):
            kind = rng.choice(["add", "delete", "replace", "bind", "twice", "relist"])
            k = rng.randrange(len(pods)) if pods else -1
            if kind == "add":
                pods.append(new_pod())
            elif kind == "delete" and pods:
                del pods[k]
            elif kind == "replace" and pods:
                pods[k] = new_pod()
            elif kind == "bind" and pods:
                pods[k] = {**pods[k], "spec": {**pods[k]["spec"], "nodeName": rng.choice(["n0", "n3"])}}
            elif kind == "twice" and pods:
                pods.append(pods[k])  # never from a cache, but counted as a fresh count counts it
            elif kind == "relist":
                rng.shuffle(pods)
        again, fresh = kept.with_pods(pods), build_inventory(nodes, pods)
        assert [again.free(n["metadata"]["name"]) for n in nodes] == [fresh.free(n["metadata"]["name"])
                                                                     for n in nodes]
        kept = again
