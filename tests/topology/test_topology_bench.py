"""Smoke test: the placement simulator runs in quick mode and reports every metric."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench" / "placement.py"


def _load() -> ModuleType:
    name = "capstan_bench_placement"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_placement_bench_quick(tmp_path: Path) -> None:
    mod = _load()
    out_file = tmp_path / "placement.json"
    out = mod.main(["--quick", "--jobs-per-gpu", "1", "--seeds", "2", "--no-decision",
                    "--out", str(out_file)])
    assert json.loads(out_file.read_text()) == json.loads(json.dumps(out))
    assert (tmp_path / "placement.png").stat().st_size > 0
    assert set(out["policies"]) == {"capstan", "tas_bestfit", "spread", "random"}
    for metrics in out["policies"].values():
        for key in ("nvlink_local_share", "rack_local_share", "allocation_rate", "mean_queue_delay_s",
                    "p95_queue_delay_s", "mean_jct_s"):
            assert key in metrics
    for key in ("decision_ms_10k_nodes_64_workers", "assumptions", "cluster", "trace", "notes"):
        assert key in out
    assert set(out["clusters"]) == {"hgx", "nvl72"}
    for per_policy in out["clusters"].values():
        assert set(per_policy) == set(out["policies"])
    assert len(out["seeds"]) == 2 and out["trace"]["hgx"]["jobs"] != out["trace"]["nvl72"]["jobs"]
    pol = out["policies"]
    assert pol["capstan"]["nvlink_local_share"] >= pol["spread"]["nvlink_local_share"]
    assert pol["capstan"]["jobs"] == pol["spread"]["jobs"] > 0


def test_trace_csv_reader(tmp_path: Path) -> None:
    mod = _load()
    f = tmp_path / "t.csv"
    f.write_text("submit_time_s,gpus,duration_s\n10,8,100\n0,1,50\n5,0,10\n")
    jobs = mod.read_trace_csv(f)
    assert [(j.submit, j.gpus, j.duration) for j in jobs] == [(0.0, 1, 50.0), (10.0, 8, 100.0)]


def test_idle_split_accounts_for_every_idle_gpu_second() -> None:
    """allocation_rate plus the two idle shares is all GPU time while jobs wait, for every policy."""
    mod = _load()
    cluster = mod.hgx_cluster(1, 2, 4)
    trace = mod.generate_trace(11, 150, cluster.total_gpus, 0.95)
    for policy in mod.POLICIES:
        m = mod.summarize([mod.Sim(cluster, trace, policy, 11).run()])
        assert m["idle_share_smallest_fits"] >= 0 and m["idle_share_none_fits"] >= 0
        total = m["allocation_rate"] + m["idle_share_smallest_fits"] + m["idle_share_none_fits"]
        assert abs(total - 1.0) < 5e-4, (policy, m)


def test_simulated_defragmentation_move_starts_the_waiting_gang_and_costs_the_mover() -> None:
    """Two half-used nodes, an 8-GPU job waiting: capstan moves a 4-GPU job and pays for it."""
    mod = _load()
    cluster = mod.hgx_cluster(1, 1, 2)
    trace = [mod.TraceJob(0, 4, 20_000), mod.TraceJob(0, 4, 700), mod.TraceJob(1, 4, 20_000),
             mod.TraceJob(800, 8, 1_000)]
    sim = mod.Sim(cluster, trace, "capstan", 1)
    m = sim.run()
    a, _, c, whole = sim.jobs
    assert whole.start == 800  # on the node the move cleared, at once
    assert m["moves"] == 1 and m["moved_jobs"] == 1
    (moved,) = [j for j in (a, c) if j.moves]
    ran = 800 - moved.start
    # down 300 s, and the work since its last 30-min checkpoint (all of it here) is done again
    assert moved.end == moved.start + ran + mod.MOVE_RESTART_S + moved.duration
    # the same trace without moves: the 8-GPU job waits until a 20,000 s job ends
    mod.MIGRATION = False
    try:
        still = mod.Sim(cluster, trace, "capstan", 1)
        m = still.run()
    finally:
        mod.MIGRATION = True
    assert m["moves"] == 0 and still.jobs[3].start == 20_000
