import pytest
from topo_fixtures import hgx_cluster, nvl72_cluster, pod

from capstan.topology import (
    GangRequest,
    Inventory,
    PlacementResult,
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


def test_one_worker_fills_a_partly_used_node_before_breaking_a_whole_one() -> None:
    # two NVL72-style racks: rack 0 fuller overall but with only whole free nodes left; rack 1
    # emptier with one node partly used. FGD-style packing fills the partial node.
    nodes = nvl72_cluster(racks=2, nodes_per_rack=4)
    pods = [pod(f"p{n}", f"nvl0-n{n:02d}", 4) for n in range(2)] + [pod("q", "nvl1-n00", 3)]
    inv = build_inventory(nodes, pods)
    res = place_gang(inv, GangRequest("one", 1, 1))
    assert res.nodes == ["nvl1-n00"]
    plain = place_gang(inv, GangRequest("one", 1, 1), parent_tiebreak=False, fragmentation_aware=False)
    assert plain.nodes[0].startswith("nvl0-")  # plain BestFit: the domain with the fewest free GPUs


def test_multi_worker_domain_counts_whole_workers_not_stray_gpus() -> None:
    # rack 0: 2 whole free nodes + 6 stray GPUs (14 free); rack 1: 3 whole free nodes (12 free).
    # A 2x4 gang fits both; fragmentation-aware BestFit takes rack 0 (no whole node left over),
    # plain BestFit rack 1 (fewest free GPUs) and leaves rack 1 one whole node instead of three
    nodes = nvl72_cluster(racks=2, nodes_per_rack=4)
    inv = build_inventory(nodes, [pod("p0", "nvl0-n00", 1), pod("p1", "nvl0-n01", 1),
                                  pod("q", "nvl1-n00", 4)])
    res = place_gang(inv, GangRequest("g", 2, 4))
    assert sorted(res.nodes) == ["nvl0-n02", "nvl0-n03"]
    plain = place_gang(inv, GangRequest("g", 2, 4), parent_tiebreak=False, fragmentation_aware=False)
    assert all(n.startswith("nvl1-") for n in plain.nodes)


def test_reservation_pins_gpus_that_free_not_idle_ones() -> None:
    inv = build_inventory(hgx_cluster(blocks=1, racks=2, nodes_per_rack=2), [])
    # rack 0: n0 idle, n1 busy until 100; rack 1: both busy until 100
    running = []
    for name, nodes in (("a", ["b0-r0-n1"]), ("b", ["b0-r1-n0", "b0-r1-n1"])):
        res = PlacementResult(name, True, nodes, 8, level="rack", domain="x", domain_key="x")
        inv = inv.allocate(res)
        running.append(RunningGang(res, started=0.0, expected_end=100.0))
    out = schedule_queue(inv, [GangRequest("big", 2, 8, submitted=0)], running=running, now=10.0)
    rsv = out[0].reservation
    assert rsv is not None and rsv.shadow_time == 100.0
    # rack 1 frees entirely at 100: reserving it leaves the idle node b0-r0-n0 to backfill
    assert sorted(rsv.placement.nodes) == ["b0-r1-n0", "b0-r1-n1"]
    queue = [GangRequest("big", 2, 8, submitted=0), GangRequest("long", 1, 8, submitted=1)]
    small = schedule_queue(inv, queue, running=running, now=10.0)
    assert small[1].placed and small[1].result.nodes == ["b0-r0-n0"]


def test_reserve_after_s_guard() -> None:
    inv = build_inventory(hgx_cluster(blocks=1, racks=1, nodes_per_rack=2), [])
    res = PlacementResult("r", True, ["b0-r0-n0"], 8, level="nvlink", domain="x", domain_key="x")
    inv = inv.allocate(res)
    running = [RunningGang(res, 0.0, 1000.0)]
    queue = [GangRequest("big", 2, 8, submitted=0), GangRequest("small", 1, 8, submitted=1)]
    young = schedule_queue(inv, queue, running=running, now=50.0, reserve_after_s=100.0)
    assert young[0].reservation is None and young[1].placed  # not waited long enough: no hold
    old = schedule_queue(inv, queue, running=running, now=150.0, reserve_after_s=100.0)
    assert old[0].reservation is not None and not old[1].placed


def test_locality_wait_holds_a_gang_for_one_nvlink_domain_then_spreads() -> None:
    nodes = nvl72_cluster(racks=2, nodes_per_rack=4)
    # each rack has 2 whole free nodes: a 3x4 gang fits only across racks
    inv = build_inventory(nodes, [pod(f"p{r}{n}", f"nvl{r}-n{n:02d}", 4) for r in (0, 1) for n in (0, 1)])
    req = GangRequest("g", 3, 4, submitted=0, expected_duration_s=1000)
    waiting = schedule_queue(inv, [req], now=100, locality_wait_s=3600, locality_wait_fraction=0.5)
    assert not waiting[0].placed and "one NVLink domain" in waiting[0].reason
    assert waiting[0].reservation is None  # a voluntary wait holds nobody back
    late = schedule_queue(inv, [req], now=600, locality_wait_s=3600, locality_wait_fraction=0.5)
    assert late[0].placed and late[0].result.level == "block"  # the fixture racks are cliques


SLOWDOWN = {"nvlink": 1.0, "rack": 1.15, "block": 1.3, "zone": 1.6, "cluster": 1.6}


def _two_half_busy_racks(end_r0: float, end_r1: float) -> tuple[Inventory, list[RunningGang]]:
    """Two 4-node NVL72-style racks, 2 nodes of each busy until the given expected ends."""
    inv = build_inventory(nvl72_cluster(racks=2, nodes_per_rack=4), [])
    running = []
    for r, end in ((0, end_r0), (1, end_r1)):
        res = PlacementResult(f"busy{r}", True, [f"nvl{r}-n00", f"nvl{r}-n01"], 4, level="nvlink", domain="x",
                              domain_key="x")
        inv = inv.allocate(res)
        running.append(RunningGang(res, started=0.0, expected_end=end))
    return inv, running


def test_cost_based_locality_wait_waits_when_the_domain_frees_soon() -> None:
    # a 3x4 gang fits now only across racks (x1.3 on a 1000 s job: 300 s lost); rack 0 frees at 200,
    # 100 s from now: waiting is cheaper
    inv, running = _two_half_busy_racks(200.0, 5000.0)
    req = GangRequest("g", 3, 4, submitted=0, expected_duration_s=1000)
    out = schedule_queue(inv, [req], running=running, now=100, locality_slowdown=SLOWDOWN)
    assert not out[0].placed and out[0].reservation is None
    assert "one NVLink domain, expected in 100s" in out[0].reason and "300s longer" in out[0].reason
    # a gang behind it uses the free GPUs now: the voluntary wait holds nothing back
    small = GangRequest("s", 1, 4, submitted=1, expected_duration_s=10_000)
    both = schedule_queue(inv, [req, small], running=running, now=100, locality_slowdown=SLOWDOWN)
    assert not both[0].placed and both[1].placed
    # once rack 0 has freed, the gang runs inside it
    later = inv.release(running[0].result)
    done = schedule_queue(later, [req], running=running[1:], now=200, locality_slowdown=SLOWDOWN)
    assert done[0].placed and done[0].result.level == "nvlink"


def test_a_pass_places_a_shape_that_cannot_start_once_per_view(monkeypatch: pytest.MonkeyPatch) -> None:
    # free GPUs only shrink during a pass: once a shape does not fit, the gangs of that shape
    # behind it wait with its reason and are not placed again (the cost-based locality wait
    # included), so a long queue of one shape costs one placement, not one each
    inv, running = _two_half_busy_racks(200.0, 5000.0)  # 4 whole nodes free: 16 GPUs
    queue = [GangRequest(f"big{k:02d}", 5, 4, submitted=k, expected_duration_s=1000) for k in range(30)]
    # fit the open view, but only on GPUs reserved for the head, and run past its start
    queue += [GangRequest(f"mid{k:02d}", 4, 4, submitted=50 + k, expected_duration_s=10_000)
              for k in range(10)]
    queue.append(GangRequest("small", 2, 4, submitted=99, expected_duration_s=100))
    calls: list[str] = []

    def counted(at: Inventory, req: GangRequest, **kw: object) -> PlacementResult:
        calls.append(req.name)
        return place_gang(at, req, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("capstan.topology.queue.place_gang", counted)
    decisions = schedule_queue(inv, queue, running=running, now=100, locality_slowdown=SLOWDOWN)
    out = {d.name: d for d in decisions}
    # the first is placed on the open view and becomes the head (its reservation places it on the
    # cluster as running gangs end); the second is placed once, on the view less that reservation,
    # where backfill is decided; the 28 behind them are not placed at all
    assert {c for c in calls if c.startswith("big")} == {"big00", "big01"}
    assert calls.count("big01") == 1
    assert out["big00"].reservation is not None
    assert all(not out[f"big{k:02d}"].placed for k in range(30))
    assert {out[f"big{k:02d}"].reason for k in range(2, 30)} == {out["big01"].reason}
    assert "needs 20 GPUs" in out["big29"].reason
    assert calls.count("mid00") == 2 and not any(c.startswith("mid") and c != "mid00" for c in calls)
    reserved = "only on GPUs reserved for the queue head big00"
    assert all(reserved in out[f"mid{k:02d}"].reason for k in range(10))
    # a gang of another shape behind them still starts (it ends before the head's reserved start)
    assert out["small"].placed


def test_cost_based_locality_wait_spreads_when_the_domain_frees_late() -> None:
    # both racks busy for another 900 s > 300 s lost by spreading: place it across racks now
    inv, running = _two_half_busy_racks(1000.0, 1000.0)
    req = GangRequest("g", 3, 4, submitted=0, expected_duration_s=1000)
    out = schedule_queue(inv, [req], running=running, now=100, locality_slowdown=SLOWDOWN)
    assert out[0].placed and out[0].result.level == "block"
    # a longer job loses more by spreading: the same wait pays off for it
    long_req = GangRequest("g", 3, 4, submitted=0, expected_duration_s=5000)
    assert not schedule_queue(inv, [long_req], running=running, now=100, locality_slowdown=SLOWDOWN)[0].placed
    # the fraction scales the gain: a 900 s wait > 0.5 x 1500 s lost, so at 0.5 it spreads
    assert schedule_queue(inv, [long_req], running=running, now=100, locality_slowdown=SLOWDOWN,
                          locality_wait_fraction=0.5)[0].placed


def test_cost_based_locality_wait_needs_durations_and_is_off_by_default() -> None:
    inv, running = _two_half_busy_racks(200.0, 5000.0)
    with_duration = GangRequest("g", 3, 4, submitted=0, expected_duration_s=1000)
    no_duration = GangRequest("g", 3, 4, submitted=0)
    # the operator's path: no slowdowns given -> placed now, wherever it fits
    assert schedule_queue(inv, [with_duration], running=running, now=100)[0].placed
    # no declared duration, or a running gang with an unknown end: nothing to weigh, place now
    assert schedule_queue(inv, [no_duration], running=running, now=100, locality_slowdown=SLOWDOWN)[0].placed
    unknown = [running[0], RunningGang(running[1].result, 0.0, None)]
    assert schedule_queue(inv, [with_duration], running=unknown, now=100,
                          locality_slowdown=SLOWDOWN)[0].placed
    # the cap on time since submission still applies
    assert schedule_queue(inv, [with_duration], running=running, now=100, locality_slowdown=SLOWDOWN,
                          locality_wait_s=50)[0].placed


def test_guard_by_wait_follows_the_blocked_gangs_own_run_time_and_wait() -> None:
    inv = build_inventory(hgx_cluster(blocks=1, racks=1, nodes_per_rack=2), [])
    res = PlacementResult("r", True, ["b0-r0-n0"], 8, level="nvlink", domain="x", domain_key="x")
    inv = inv.allocate(res)
    running = [RunningGang(res, 0.0, 1000.0)]
    queue = [GangRequest("big", 2, 8, submitted=0, expected_duration_s=300),
             GangRequest("small", 1, 8, submitted=1)]

    def at(now: float, **kw: object) -> list:  # type: ignore[type-arg]
        return schedule_queue(inv, queue, running=running, now=now, reserve_after_s=100.0, **kw)  # type: ignore[arg-type]

    # the constant guard alone reserves after 100 s
    assert at(150.0)[0].reservation is not None and not at(150.0)[1].placed
    # following the gang: not before it waited its own 300 s run time
    assert at(150.0, guard_by_wait=True)[0].reservation is None and at(150.0, guard_by_wait=True)[1].placed
    # waited 400 s > its 300 s run, but the reservation would still make it wait 600 s: not yet
    early = at(400.0, guard_by_wait=True)
    assert early[0].reservation is None and early[1].placed
    # waited 700 s >= the 300 s still to wait: reserved, the small gang stays out of its GPUs
    late = at(700.0, guard_by_wait=True)
    assert late[0].reservation is not None and late[0].reservation.shadow_time == 1000.0
    assert not late[1].placed
    # once reserved for, the head keeps its reservation even where the wait test would say no
    kept = schedule_queue(inv, queue, running=running, now=400.0, reserve_after_s=100.0,
                          guard_by_wait=True, reservation=late[0].reservation)
    assert kept[0].reservation == late[0].reservation and not kept[1].placed
    # reserve_after_s=0 stays strict EASY backfill: reserved at once
    assert schedule_queue(inv, queue, running=running, now=1.0, reserve_after_s=0.0,
                          guard_by_wait=True)[0].reservation is not None


def test_a_gang_waiting_for_locality_says_which_domain_it_waits_for() -> None:
    inv, running = _two_half_busy_racks(200.0, 5000.0)
    req = GangRequest("g", 3, 4, submitted=0, expected_duration_s=1000)
    out = schedule_queue(inv, [req], running=running, now=100, locality_slowdown=SLOWDOWN)
    assert out[0].waits_for == "nvlink"
    wanted = out[0].wanted()  # what defragmentation is asked to make room for
    assert wanted.policy == "Required" and wanted.max_domain == "nvlink" and wanted.name == "g"
    placed = schedule_queue(inv.release(running[0].result), [req], running=running[1:], now=200,
                            locality_slowdown=SLOWDOWN)
    assert placed[0].waits_for is None and placed[0].wanted() == req


def test_a_gang_kept_off_nodes_that_does_not_fit_does_not_hold_back_one_of_the_same_shape() -> None:
    # two free nodes; the first gang's job is kept off one of them after failures
    inv = build_inventory(hgx_cluster(blocks=1, racks=1, nodes_per_rack=2), [pod("x", "b0-r0-n1", 8)])
    queue = [GangRequest("kept-off", 1, 8, submitted=1, avoid_nodes=frozenset({"b0-r0-n0"})),
             GangRequest("plain", 1, 8, submitted=2)]
    out = {d.name: d for d in schedule_queue(inv, queue, reserve_after_s=3600.0, now=10.0)}
    assert not out["kept-off"].placed and "excluded for this job" in out["kept-off"].reason
    assert out["plain"].placed and out["plain"].result.nodes == ["b0-r0-n0"]
