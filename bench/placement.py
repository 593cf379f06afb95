#!/usr/bin/env python
"""Placement benchmark: a discrete-event GPU cluster simulator running several policies on the
same clusters and the same job trace, plus the decision time of the engine at 10,000 nodes.

Policies (all see the same arrivals; a job's GPUs are held from start to end):

* ``capstan``: ``capstan.topology.schedule_queue``: gangs all-or-nothing, smallest topology
  domain that fits (policy Preferred, from the NVLink domain up), BestFit with parent-domain
  tie-breaks; priority/FIFO order with EASY backfill around a sticky reservation for the head.
  Each job declares a run-time limit (true duration x U(1, 2), like Slurm ``--time``): the
  head's reservation is the soonest slot by those limits, and a gang may backfill into reserved
  GPUs when its limit ends before the head's expected start (EASY backfill).
* ``tas_bestfit``: a Kueue-TAS-style baseline: the same placement engine with plain BestFit
  (ties by name, no parent tie-break), each gang all-or-nothing in the smallest fitting domain,
  queue ``BestEffortFIFO``: every pass walks the queue in submission order and starts every gang
  that fits now; no reservation, so gangs behind a blocked one start whenever they fit.
* ``spread``: kube-scheduler-style, no gang semantics: pods are bound one by one in FIFO order to
  the least-allocated node that fits (most free GPUs, ties by name). A gang runs once all its
  pods are bound; partially bound gangs hold their GPUs (the known deadlock hazard). A gang still
  partial ``SPREAD_GIVEBACK_S`` after its first bind gives all GPUs back and re-queues at the
  tail (like a rendezvous timeout and a retry), so the simulation always ends.
* ``random``: whole-gang, FIFO best effort, each worker on a uniformly random node with room.

Run ``python bench/placement.py --json`` (full, ~1-3 min) or ``--quick``; ``--trace FILE`` replays
a CSV of ``submit_time_s,gpus,duration_s``.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "operator") not in sys.path:
    sys.path.insert(0, str(ROOT / "operator"))

from capstan.topology import (  # noqa: E402 -- after the source-root path tweak
    GangRequest,
    Inventory,
    PlacementResult,
    Reservation,
    RunningGang,
    build_inventory,
    place_gang,
    schedule_queue,
)

RESULTS = ROOT / "bench" / "results"
POLICIES = ("capstan", "tas_bestfit", "spread", "random")
# Job runtime multiplier by the narrowest domain holding all of a gang's nodes (assumption).
SLOWDOWN = {"nvlink": 1.0, "rack": 1.15, "block": 1.3, "zone": 1.6, "cluster": 1.6}
SPREAD_GIVEBACK_S = 900.0  # torchrun's default rendezvous timeout is 900 s
RESERVE_AFTER_S = 3600.0  # capstan's starvation guard: reserve for a head once it waited this long
# Users declare a run-time limit (like Slurm --time); capstan's queue uses it, the baselines do not.
ESTIMATE_FACTOR = (1.0, 2.0)  # declared = true duration x U(1, 2)

# Job size mix (GPUs -> probability). Assumption shaped after the public traces: Microsoft Philly
# (Jeon et al., ATC'19: most jobs use 1 GPU, multi-node jobs are few but hold much of the GPU time)
# and SenseTime Helios (Hu et al., SC'21: single-GPU jobs are the majority of jobs, jobs of 8+ GPUs
# dominate GPU time, with a tail to hundreds of GPUs). Not fitted to either trace.
SIZE_MIX = {1: 0.55, 2: 0.08, 4: 0.10, 8: 0.12, 16: 0.06, 32: 0.045, 64: 0.03, 128: 0.012, 256: 0.003}
# Durations: lognormal, median 30 min for 1 GPU growing with log2(size); sigma 1.3 (heavy tail).
DURATION_MEDIAN_S, DURATION_SIGMA, DURATION_CLIP_S = 1800.0, 1.3, (60.0, 3 * 86400.0)


# ---------------------------------------------------------------------------------------------
# clusters and traces


@dataclass(frozen=True)
class Cluster:
    kind: str
    node_gpus: int
    nodes: list[dict[str, Any]]
    describe: str

    @property
    def total_gpus(self) -> int:
        return self.node_gpus * len(self.nodes)


def _node(name: str, gpus: int, labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "rdma/ib": "1"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def hgx_cluster(blocks: int, racks: int, nodes_per_rack: int) -> Cluster:
    """8-GPU HGX/DGX nodes (one NVSwitch domain each) in racks in blocks, one zone."""
    nodes = [_node(f"hgx-b{b}-r{r:02d}-n{n}", 8, {"capstan.dev/rack": f"b{b}-r{r}",
                                                 "capstan.dev/block": f"b{b}",
                                                 "topology.kubernetes.io/zone": "z1"})
             for b in range(blocks) for r in range(racks) for n in range(nodes_per_rack)]
    return Cluster("hgx", 8, nodes, f"{blocks} blocks x {racks} racks x {nodes_per_rack} HGX nodes x 8 GPUs "
                                    f"(NVLink domain = node)")


def nvl72_cluster(blocks: int, racks: int) -> Cluster:
    """GB200 NVL72-style racks: 18 nodes x 4 GPUs, one nvidia.com/gpu.clique per rack."""
    nodes = [_node(f"nvl-b{b}-r{r}-n{n:02d}", 4, {"nvidia.com/gpu.clique": f"uuid.{b}-{r}",
                                                  "capstan.dev/rack": f"b{b}-r{r}",
                                                  "capstan.dev/block": f"b{b}",
                                                  "topology.kubernetes.io/zone": "z1"})
             for b in range(blocks) for r in range(racks) for n in range(18)]
    return Cluster("nvl72", 4, nodes, f"{blocks} blocks x {racks} NVL72 racks x 18 nodes x 4 GPUs "
                                      f"(NVLink domain = rack clique, 72 GPUs)")


@dataclass(frozen=True)
class TraceJob:
    submit: float
    gpus: int
    duration: float


def generate_trace(seed: int, n_jobs: int, cluster_gpus: int, load: float) -> list[TraceJob]:
    """Seeded synthetic trace; Poisson arrivals sized so the offered load is ``load`` x cluster."""
    rng = random.Random(seed)
    max_gpus = max(1, cluster_gpus // 4)  # no job asks for more than a quarter of the cluster
    sizes = [s for s in SIZE_MIX if s <= max_gpus]
    weights = [SIZE_MIX[s] for s in sizes]
    jobs = []
    for _ in range(n_jobs):
        g = rng.choices(sizes, weights)[0]
        median = DURATION_MEDIAN_S * (1 + math.log2(g) / 2)
        d = rng.lognormvariate(math.log(median), DURATION_SIGMA)
        d = min(max(d, DURATION_CLIP_S[0]), DURATION_CLIP_S[1])
        jobs.append((g, d))
    mean_work = sum(g * d for g, d in jobs) / len(jobs)
    rate = load * cluster_gpus / mean_work  # jobs per second
    t, out = 0.0, []
    for g, d in jobs:
        t += rng.expovariate(rate)
        out.append(TraceJob(round(t, 3), g, round(d, 3)))
    return out


def read_trace_csv(path: str | Path) -> list[TraceJob]:
    """Rows of ``submit_time_s,gpus,duration_s`` (header optional); sorted by submit time."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                submit, gpus, dur = float(row[0]), int(float(row[1])), float(row[2])
            except ValueError:
                continue  # header
            if gpus > 0 and dur > 0:
                out.append(TraceJob(submit, gpus, dur))
    return sorted(out, key=lambda j: j.submit)


# ---------------------------------------------------------------------------------------------
# simulation


@dataclass
class SimJob:
    id: int
    submit: float
    gpus: int
    duration: float
    workers: int
    gpw: int
    start: float | None = None
    end: float | None = None
    level: str | None = None
    result: PlacementResult | None = None
    # spread only: pods bound so far and when the first was bound
    estimate: float = 0.0  # the user's declared run time (capstan only)
    bound: list[str] = field(default_factory=list)
    first_bind: float | None = None
    givebacks: int = 0

    def request(self, with_estimate: bool = False) -> GangRequest:
        return GangRequest(f"j{self.id:06d}", self.workers, self.gpw, policy="Preferred", max_domain="nvlink",
                           submitted=self.submit,
                           expected_duration_s=self.estimate if with_estimate else None)


def gang_shape(gpus: int, node_gpus: int) -> tuple[int, int]:
    """Jobs up to a node are one worker; larger ones use whole nodes (workers x node GPUs)."""
    if gpus <= node_gpus:
        return 1, gpus
    return math.ceil(gpus / node_gpus), node_gpus


class Sim:
    """Event loop shared by all policies; a policy's ``schedule(now)`` starts what it can."""

    def __init__(self, cluster: Cluster, trace: Sequence[TraceJob], policy: str, seed: int) -> None:
        self.cluster = cluster
        self.policy = policy
        self.inv: Inventory = build_inventory(cluster.nodes, [])
        self.total = self.inv.total_gpus
        self.rng = random.Random(seed)
        self.jobs: list[SimJob] = []
        self.dropped = 0
        for i, tj in enumerate(trace):
            if tj.gpus > self.total:
                self.dropped += 1
                continue
            w, g = gang_shape(tj.gpus, cluster.node_gpus)
            # seeded per job, so every policy sees the same estimates
            est = tj.duration * random.Random(seed * 1_000_003 + i).uniform(*ESTIMATE_FACTOR)
            self.jobs.append(SimJob(i, tj.submit, w * g, tj.duration, w, g, estimate=est))
        self.events: list[tuple[float, int, str, int]] = []
        self._seq = 0
        for j in self.jobs:
            self._push(j.submit, "arrive", j.id)
        self.by_id = {j.id: j for j in self.jobs}
        self.pending: list[SimJob] = []
        self.running: dict[int, SimJob] = {}
        self.reservation: Reservation | None = None
        self.alloc_area = 0.0
        self.busy_time = 0.0
        self.useful_area = 0.0
        self.passes = 0

    def _push(self, t: float, kind: str, jid: int) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, jid))

    def run(self) -> dict[str, Any]:
        scheduler: Callable[[float], None] = getattr(self, f"_schedule_{self.policy}")
        now = 0.0
        while self.events:
            t = self.events[0][0]
            if self.pending or self.running:
                dt = t - now
                self.busy_time += dt
                self.alloc_area += dt * (self.total - self.inv.free_gpus)
                self.useful_area += dt * sum(j.gpus for j in self.running.values())
            now = t
            while self.events and self.events[0][0] == t:
                _, _, kind, jid = heapq.heappop(self.events)
                job = self.by_id[jid]
                if kind == "arrive":
                    self.pending.append(job)
                elif kind == "finish":
                    del self.running[jid]
                    assert job.result is not None
                    self.inv = self.inv.release(job.result)
                elif kind == "giveback" and job.start is None and job.bound and job.first_bind is not None \
                        and t - job.first_bind >= SPREAD_GIVEBACK_S - 1e-9:
                    self.inv = self.inv.add_usage({n: -job.gpw for n in job.bound})
                    job.bound, job.first_bind = [], None
                    job.givebacks += 1
                    self.pending.remove(job)
                    self.pending.append(job)  # retry at the tail
            self.passes += 1
            scheduler(now)
        return self._metrics()

    def _start(self, job: SimJob, res: PlacementResult, now: float) -> None:
        job.start, job.result = now, res
        job.level = self.inv.span_level(res.nodes) if len(set(res.nodes)) > 1 else "nvlink"
        job.end = now + job.duration * SLOWDOWN[job.level]
        self.running[job.id] = job
        self._push(job.end, "finish", job.id)

    # -- policies ------------------------------------------------------------------------------
    def _schedule_capstan(self, now: float) -> None:
        if not self.pending:
            return
        reqs = {j.request().name: j for j in self.pending}
        running = [RunningGang(j.result, j.start or 0.0,
                               (j.start or 0.0) + j.estimate * SLOWDOWN[j.level or "nvlink"])
                   for j in self.running.values() if j.result]
        decisions = schedule_queue(self.inv, [j.request(with_estimate=True) for j in self.pending],
                                   running=running, now=now, reservation=self.reservation,
                                   reserve_after_s=RESERVE_AFTER_S)
        self.reservation = None
        for d in decisions:
            if d.placed:
                job = reqs[d.name]
                self.inv = self.inv.allocate(d.result)
                self._start(job, d.result, now)
            elif d.reservation is not None:
                self.reservation = d.reservation
        self.pending = [j for j in self.pending if j.start is None]

    def _schedule_tas_bestfit(self, now: float) -> None:
        failed: set[tuple[int, int]] = set()  # shapes that did not fit this pass stay unfit
        for job in self.pending:
            if (job.workers, job.gpw) in failed:
                continue
            res = place_gang(self.inv, job.request(), parent_tiebreak=False)
            if res.placed:
                self.inv = self.inv.allocate(res)
                self._start(job, res, now)
            else:
                failed.add((job.workers, job.gpw))
        self.pending = [j for j in self.pending if j.start is None]

    def _schedule_random(self, now: float) -> None:
        nodes = self.inv.nodes
        for job in self.pending:
            free = [self.inv.free(n.name) // job.gpw for n in nodes]
            if sum(free) < job.workers:
                continue
            picks: list[str] = []
            for _ in range(job.workers):
                i = self.rng.choice([k for k, c in enumerate(free) if c])
                free[i] -= 1
                picks.append(nodes[i].name)
            picks.sort()
            res = PlacementResult(job.request().name, True, picks, job.gpw)
            self.inv = self.inv.allocate(res)
            self._start(job, res, now)
        self.pending = [j for j in self.pending if j.start is None]

    def _schedule_spread(self, now: float) -> None:
        names = [n.name for n in self.inv.nodes]
        free = [self.inv.free(n) for n in names]
        delta: dict[str, int] = {}
        for job in self.pending:
            if max(free) < job.gpw:
                continue
            while len(job.bound) < job.workers:
                # least-allocated node that fits: most free GPUs, ties by name
                best = max(range(len(names)), key=lambda i: (free[i], -i))
                if free[best] < job.gpw:
                    break
                free[best] -= job.gpw
                delta[names[best]] = delta.get(names[best], 0) + job.gpw
                job.bound.append(names[best])
                if job.first_bind is None:
                    job.first_bind = now
                    self._push(now + SPREAD_GIVEBACK_S, "giveback", job.id)
        self.inv = self.inv.add_usage(delta, check=True)
        for job in self.pending:
            if len(job.bound) == job.workers:
                res = PlacementResult(job.request().name, True, sorted(job.bound), job.gpw)
                self._start(job, res, now)
        self.pending = [j for j in self.pending if j.start is None]

    # -- metrics ------------------------------------------------------------------------------
    def _metrics(self) -> dict[str, Any]:
        done = [j for j in self.jobs if j.end is not None]
        assert len(done) == len(self.jobs), "simulation ended with unfinished jobs"
        multi = [j for j in done if j.workers > 1]
        delays = sorted(j.start - j.submit for j in done if j.start is not None)
        return {
            "jobs": len(done),
            "multi_node_gangs": len(multi),
            "nvlink_local": sum(j.level == "nvlink" for j in multi),
            "rack_local": sum(j.level in ("nvlink", "rack") for j in multi),
            "alloc_area": self.alloc_area,
            "useful_area": self.useful_area,
            "capacity_area": self.busy_time * self.total,
            "delays": delays,
            "jcts": [j.end - j.submit for j in done if j.end is not None],
            "givebacks": sum(j.givebacks for j in done),
            "makespan_s": max(j.end for j in done if j.end is not None) if done else 0.0,
        }


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool raw per-cluster results into the reported metrics."""
    multi = sum(p["multi_node_gangs"] for p in parts)
    delays = sorted(d for p in parts for d in p["delays"])
    jcts = [x for p in parts for x in p["jcts"]]
    cap = sum(p["capacity_area"] for p in parts) or 1.0
    return {
        "nvlink_local_share": round(sum(p["nvlink_local"] for p in parts) / multi, 4) if multi else 0.0,
        "rack_local_share": round(sum(p["rack_local"] for p in parts) / multi, 4) if multi else 0.0,
        "allocation_rate": round(sum(p["alloc_area"] for p in parts) / cap, 4),
        "useful_allocation_rate": round(sum(p["useful_area"] for p in parts) / cap, 4),
        "mean_queue_delay_s": round(statistics.fmean(delays), 1) if delays else 0.0,
        "p95_queue_delay_s": round(_percentile(delays, 0.95), 1),
        "mean_jct_s": round(statistics.fmean(jcts), 1) if jcts else 0.0,
        "jobs": sum(p["jobs"] for p in parts),
        "multi_node_gangs": multi,
        "givebacks": sum(p["givebacks"] for p in parts),
    }


# ---------------------------------------------------------------------------------------------
# decision time at 10,000 nodes


def decision_benchmark(n_nodes: int = 10_000, repeats: int = 15, seed: int = 7) -> dict[str, Any]:
    """Median ms of one ``place_gang`` (64 workers x 8 GPUs) on a busy 10k-node HGX cluster."""
    rng = random.Random(seed)
    racks_per_block, nodes_per_rack = 32, 8
    nodes, pods = [], []
    for i in range(n_nodes):
        rack, block = i // nodes_per_rack, i // (nodes_per_rack * racks_per_block)
        name = f"n{i:05d}"
        nodes.append(_node(name, 8, {"capstan.dev/rack": f"r{rack}", "capstan.dev/block": f"b{block}",
                                     "topology.kubernetes.io/zone": f"z{block % 3}"}))
        used = rng.choice([8, 8, 8, 4, 2, 1, 0, 0])  # ~60% busy, fragmented
        if used:
            pods.append({"spec": {"nodeName": name, "containers": [
                {"resources": {"limits": {"nvidia.com/gpu": str(used)}}}]}, "status": {"phase": "Running"}})
    t0 = time.perf_counter()
    inv = build_inventory(nodes, pods)
    build_ms = (time.perf_counter() - t0) * 1000
    req = GangRequest("big", 64, 8, policy="Preferred")
    times = []
    res = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = place_gang(inv, req)
        times.append((time.perf_counter() - t0) * 1000)
    assert res is not None and res.placed
    return {"decision_ms": round(statistics.median(times), 2), "inventory_build_ms": round(build_ms, 1),
            "placed_level": res.level or ""}


# ---------------------------------------------------------------------------------------------


def write_chart(policies: dict[str, dict[str, Any]], path: Path) -> None:
    """Bar chart of each metric per policy (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["nvlink_local_share", "rack_local_share", "allocation_rate",
               "mean_queue_delay_s", "p95_queue_delay_s", "mean_jct_s"]
    names = list(policies)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f"]
    for ax, metric in zip(axes.flat, metrics, strict=True):
        vals = [policies[n][metric] for n in names]
        ax.bar(names, vals, color=colors[: len(names)])
        ax.set_title(metric + (" (higher is better)" if "share" in metric or "rate" in metric
                               else " (lower is better)"), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        for k, v in enumerate(vals):
            ax.text(k, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("Capstan placement vs baselines (same clusters, same trace)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the final JSON line")
    ap.add_argument("--quick", action="store_true", help="small clusters and a short trace (seconds)")
    ap.add_argument("--trace", help="CSV of submit_time_s,gpus,duration_s to replay instead of the generator")
    ap.add_argument("--jobs", type=int, help="jobs per cluster for the generated trace")
    ap.add_argument("--load", type=float, default=0.9, help="offered load of the generated trace")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "placement.json"))
    ap.add_argument("--no-decision", action="store_true", help="skip the 10k-node decision timing")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    if args.quick:
        clusters = [hgx_cluster(2, 2, 4), nvl72_cluster(1, 2)]
        n_jobs = args.jobs or 250
    else:
        clusters = [hgx_cluster(4, 8, 8), nvl72_cluster(2, 4)]
        n_jobs = args.jobs or 2500

    raw: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in POLICIES}
    trace_info: dict[str, Any] = {}
    for k, cluster in enumerate(clusters):
        if args.trace:
            trace = read_trace_csv(args.trace)
            trace_info[cluster.kind] = {"source": str(args.trace), "jobs": len(trace)}
        else:
            trace = generate_trace(args.seed + k, n_jobs, cluster.total_gpus, args.load)
            trace_info[cluster.kind] = {"source": "generated", "jobs": len(trace), "seed": args.seed + k,
                                        "offered_load": args.load,
                                        "gpu_hours": round(sum(j.gpus * j.duration for j in trace) / 3600, 1)}
        for policy in POLICIES:
            raw[policy][cluster.kind] = Sim(cluster, trace, policy, args.seed).run()

    policies = {p: summarize(list(raw[p].values())) for p in POLICIES}
    by_cluster = {c.kind: {p: summarize([raw[p][c.kind]]) for p in POLICIES} for c in clusters}
    decision = {"decision_ms": None, "inventory_build_ms": None} if args.no_decision else decision_benchmark()
    out: dict[str, Any] = {
        "policies": policies,
        "decision_ms_10k_nodes_64_workers": decision["decision_ms"],
        "inventory_build_ms_10k_nodes": decision["inventory_build_ms"],
        "by_cluster": by_cluster,
        "assumptions": {
            "slowdown_by_span": SLOWDOWN,
            "slowdown_note": "runtime multiplier by the narrowest domain holding all of a gang's nodes; "
                             "single-node jobs x1.0",
            "job_size_mix": {str(k): v for k, v in SIZE_MIX.items()},
            "job_size_source": "synthetic, shaped after Philly (ATC'19) and Helios (SC'21): most jobs 1 GPU, "
                               "heavy tail to 256 GPUs; capped at a quarter of the cluster",
            "duration": f"lognormal, median {DURATION_MEDIAN_S:.0f}s x (1 + log2(gpus)/2), "
                        f"sigma {DURATION_SIGMA}, clipped to {DURATION_CLIP_S}",
            "gang_shape": "jobs <= node GPUs: 1 worker; larger: ceil(gpus/node GPUs) workers x node GPUs",
            "topology": "synthesised: HGX nodes are their own NVLink domain; NVL72 rack = one clique",
            "runtime_knowledge": f"capstan's queue sees a declared run-time limit per job = true duration x "
                                 f"U{ESTIMATE_FACTOR} (x the span slowdown once placed); a limit may "
                                 f"undershoot the slowed run time; baselines ignore it",
            "spread_giveback_s": SPREAD_GIVEBACK_S,
            "allocation_rate": "time-average of allocated/total GPUs while any job waits or runs; for "
                               "spread it counts GPUs held by partially bound gangs "
                               "(useful_allocation_rate does not)",
            "multi_node_gang": "a job with more than one worker",
            "pooled": "top-level policies pool both clusters (jobs and GPU-time); by_cluster has each",
        },
        "cluster": {c.kind: {"describe": c.describe, "nodes": len(c.nodes), "gpus": c.total_gpus}
                    for c in clusters},
        "trace": trace_info,
        "mode": "quick" if args.quick else "full",
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    write_chart(policies, out_path.with_suffix(".png"))
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
