from topo_fixtures import hgx_cluster

from capstan.topology import (
    GangRequest,
    RunningGang,
    build_inventory,
    place_gang,
    queue_order,
    schedule_queue,
)


def test_queue_order_priority_then_age() -> None:
    reqs = [GangRequest("old-low", 1, 1, submitted=0),
            GangRequest("new-high", 1, 1, priority=10, submitted=5),
            GangRequest("old-high", 1, 1, priority=10, submitted=1)]
    assert [r.name for r in queue_order(reqs)] == ["old-high", "new-high", "old-low"]


def test_head_reservation_blocks_backfill_on_its_nodes() -> None:
    inv = build_inventory(hgx_cluster(blocks=1, racks=2, nodes_per_rack=2), [])
    # r0 is half busy until t=100, r1 fully busy until t=500
    running = []
    for name, nodes, end in (("a", ["b0-r0-n0"], 100.0), ("b", ["b0-r1-n0", "b0-r1-n1"], 500.0)):
        res = place_gang(inv, GangRequest(name, len(nodes), 8, policy="None"))
        assert res.placed
        res = type(res)(name, True, nodes, 8, "rack", "x", "x")
        inv = inv.allocate(res)
        running.append(RunningGang(res, started=0.0, expected_end=end))
    queue = [GangRequest("big", 2, 8, policy="Required", max_domain="rack", submitted=1),
             GangRequest("small", 1, 8, submitted=2),
             GangRequest("short", 1, 8, submitted=3, expected_duration_s=50)]
    out = {d.name: d for d in schedule_queue(inv, queue, running=running, now=10.0)}
    head = out["big"]
    assert not head.placed and head.reservation is not None
    assert head.reservation.shadow_time == 100.0
    assert sorted(head.reservation.placement.nodes) == ["b0-r0-n0", "b0-r0-n1"]
    # the only free node is reserved for the head: a long backfill must wait, with a clear reason
    assert not out["small"].placed and "reserved for the queue head big" in out["small"].reason
    # one that ends (10 + 50 = 60) before the head's expected start (100) may use it
    assert out["short"].placed and out["short"].backfilled
    # strict FIFO never backfills
    strict = {d.name: d for d in schedule_queue(inv, queue, running=running, now=10.0, backfill=False)}
    assert not strict["short"].placed and "strict FIFO" in strict["short"].reason


def test_reservation_is_sticky_and_head_eventually_runs() -> None:
    inv0 = build_inventory(hgx_cluster(blocks=1, racks=2, nodes_per_rack=2), [])
    inv = inv0
    running: list[RunningGang] = []
    # every node starts busy with a 4-GPU job; ends unknown to the scheduler
    for i, n in enumerate(["b0-r0-n0", "b0-r0-n1", "b0-r1-n0", "b0-r1-n1"]):
        res = place_gang(inv, GangRequest(f"r{i}", 1, 4, policy="None"))
        res = type(res)(f"r{i}", True, [n], 4, "nvlink", n, n)
        inv = inv.allocate(res)
        running.append(RunningGang(res, started=float(i)))
    big = GangRequest("big", 4, 8, submitted=0)
    reservation = None
    t = 10.0
    for step in range(20):
        smalls = [GangRequest(f"s{step}-{k}", 1, 4, submitted=t + k) for k in range(3)]
        out = schedule_queue(inv, [big, *smalls], running=running, now=t, reservation=reservation)
        first = out[0]
        if first.placed:
            break
        reservation = first.reservation
        assert reservation is not None
        for d in out[1:]:
            assert not d.placed  # every GPU is reserved for the 4-node head
        # one running job ends per step
        if running:
            inv = inv.release(running.pop(0).result)
        t += 10
    assert first.placed and step == 4
