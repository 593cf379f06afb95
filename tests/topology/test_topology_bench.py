"""Smoke test: the placement simulator runs in quick mode and reports every metric."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

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
    defrag, mod.DEFRAG = mod.DEFRAG, True  # plain defragmentation is off by default (QueuePolicy.defragment)
    try:
        _defragmentation_move(mod)
    finally:
        mod.DEFRAG = defrag


def _defragmentation_move(mod: ModuleType) -> None:
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


DIRLAB_HEADER = "u_id,user,gpu_num,cpu_num,node_num,interval,run_time,wall_time,new_status\n"


def test_dirlab_trace_reader_sums_intervals_and_skips_cpu_jobs(tmp_path: Path) -> None:
    mod = _load()
    f = tmp_path / "philly_data_training.csv"
    f.write_text(DIRLAB_HEADER + "0,1,1,0,1,0,100,0,Pass\n1,2,8,0,1,50,200,0,Failed\n"
                 "2,2,0,4,1,10,30,0,Pass\n3,3,16,0,2,40,300,0,Killed\n")
    jobs = mod.read_dirlab_csv(f)
    assert [(j.submit, j.gpus, j.duration) for j in jobs] == [(0, 1, 100), (50, 8, 200), (100, 16, 300)]
    bad = tmp_path / "bad.csv"
    bad.write_text("u_id,gpu_num,run_time\n0,1,5\n")
    with pytest.raises(ValueError, match=r"missing column.*interval"):
        mod.read_dirlab_csv(bad)
    bad.write_text(DIRLAB_HEADER + "0,1,one,0,1,0,100,0,Pass\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: .*'one'"):
        mod.read_dirlab_csv(bad)


def test_trace_windows_and_fit_keep_the_shape_and_set_the_load() -> None:
    mod = _load()
    jobs = [mod.TraceJob(10.0 * i, g, 600.0) for i, g in enumerate([1, 2, 4, 8, 64, 1, 1])]
    w1, w2 = mod.trace_windows(jobs, 2, 3)  # the last 6 jobs, rebased
    assert [j.gpus for j in w1] == [2, 4, 8] and w1[0].submit == 0 and w2[0].submit == 0
    fitted, info = mod.fit_trace(w2, cluster_gpus=128, load=0.5)
    assert [j.gpus for j in fitted] == [32, 1, 1]  # capped at a quarter of the cluster
    assert info["offered_load"] == 0.5 and info["capped_to_quarter_cluster"] == 1
    work = sum(j.gpus * j.duration for j in fitted)
    assert abs(work / (fitted[-1].submit * 128) - 0.5) < 1e-3
    # arrivals keep their proportions
    assert fitted[1].submit / fitted[2].submit == w2[1].submit / w2[2].submit
    native, info = mod.fit_trace(w2, cluster_gpus=128, load=None)
    assert [j.submit for j in native] == [j.submit for j in w2] and info["time_scale"] == 1.0


def test_real_trace_replay_reports_each_window_and_cluster_beside_the_baseline(tmp_path: Path) -> None:
    mod = _load()
    rows = [f"{i},{i % 7},{[1, 1, 2, 4, 8, 16][i % 6]},0,1,{60 + 37 * (i % 5)},{300 + 211 * (i % 9)},0,Pass"
            for i in range(80)]
    (tmp_path / "helios_data_training.csv").write_text(DIRLAB_HEADER + "\n".join(rows) + "\n")
    out = mod.main(["--quick", "--only-real", "--real-traces", str(tmp_path), "--windows", "2",
                    "--window-jobs", "30", "--trace-seeds", "1", "--trace-loads", "0.9,native",
                    "--out", str(tmp_path / "out.json")])
    real = out["real_traces"]
    helios = real["traces"]["helios"]
    assert helios["file"] == "helios_data_training.csv" and len(helios["sha256"]) == 64
    assert set(helios["replays"]) == {"load_0.9", "native"}
    for per_window in helios["replays"].values():
        assert set(per_window) == {"w0", "w1"}
        for per_cluster in per_window.values():
            assert set(per_cluster) == {"hgx", "nvl72"}
            for res in per_cluster.values():
                assert res["capstan"]["jobs"] == res["tas_bestfit"]["jobs"] == 30
                verdict = res["capstan_vs_tas_bestfit"]
                assert sorted([*verdict["met"], *verdict["missed"]]) == sorted(mod.TARGET_SLACK)
    assert helios["replays"]["load_0.9"]["w0"]["hgx"]["trace"]["offered_load"] == 0.9
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds none of"):
        mod.main(["--quick", "--only-real", "--real-traces", str(tmp_path / "empty")])


def test_compare_applies_the_issue_tolerances() -> None:
    mod = _load()
    base = {"nvlink_local_share": 0.9, "rack_local_share": 0.9, "allocation_rate": 0.99,
            "mean_queue_delay_s": 1000.0, "p95_queue_delay_s": 4000.0, "mean_jct_s": 10_000.0}
    close = {**base, "allocation_rate": 0.986, "mean_queue_delay_s": 1029.0, "p95_queue_delay_s": 4190.0,
             "mean_jct_s": 10_190.0}
    assert mod.compare(close, base)["missed"] == {}
    worse = {**close, "allocation_rate": 0.984, "mean_jct_s": 10_300.0}
    assert set(mod.compare(worse, base)["missed"]) == {"allocation_rate", "mean_jct_s"}


def test_queue_pass_benchmark_runs_a_whole_operator_pass() -> None:
    """The 10k-node figure's pass, small: it starts gangs and times both halves of the pass, on a new
    index, on a kept one (deciding alike: the bench checks that) and on one patched for a cordon."""
    mod = _load()
    out = mod.queue_pass_benchmark(n_nodes=256, queued=12, repeats=1)
    assert out["nodes"] == 256 and out["queued"] == 12 and out["running"] > 0
    assert 0 < out["started"] <= 12
    assert out["pass_ms"] >= out["schedule_queue_ms"] > 0 and out["locality_moves_ms"] >= 0
    assert out["pass_ms_kept_index"] > 0  # the same pass on the index the operator keeps
    # after a Node was cordoned: the kept index patched (timed in) and the pass on it
    assert out["pass_ms_node_changed"] > out["index_patch_ms"] > 0
    # after Nodes joined and left: the kept index patched for them (timed in) and the pass on it
    assert out["pass_ms_nodes_joined_left"] > out["index_membership_patch_ms"] > 0


def test_snapshot_benchmark_reads_every_job_of_the_cluster() -> None:
    """The 10k-node snapshot figure, small: one Running job a pod, every one of them running and
    movable in the snapshot, the queued ones queued, on a kept node index."""
    mod = _load()
    out = mod.snapshot_benchmark(n_nodes=64, queued=5, repeats=1)
    assert out["queued"] == 5 and out["running"] == out["movable"] == out["jobs"] - 5 > 0
    assert out["first_snapshot_ms"] > out["snapshot_ms"] > 0 and out["snapshot_after_changes_ms"] > 0
