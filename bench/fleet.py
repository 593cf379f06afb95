"""Fleet simulation: one day of diurnal LLM traffic served under Capstan's autoscaling against fixed
peak provisioning, side by side: GPU-hours used and the share of requests over the latency target.

The autoscalers are the objects Capstan renders for the ModelServing below
(:func:`capstan.serving.revisions.hpa` and :func:`~capstan.serving.revisions.scaled_object`): their
bounds, target and scale-down window are read from the rendered HPA and ScaledObject, and the
simulation runs the Kubernetes HPA algorithm on them (15 s sync period, 10 % tolerance, scale-up at
once, scale-down to the highest recommendation of the stabilization window) and KEDA's activation
(from zero to one replica when requests wait, back to zero after ``cooldownPeriod`` idle).

Two traces: ``diurnal`` (consumer chat: a quiet night that never empties) and ``office_hours`` (an
internal assistant used 08:00-19:00 only, where scaling to zero pays). Serving model (stated in the
JSON): a replica runs up to ``batch`` requests at once by continuous
batching; a request needs ``service_s`` seconds alone, and each one in a full batch goes ``slowdown``
times slower (decode steps get longer with the batch). Time advances in 1 s steps as a fluid queue:
arrivals are Poisson around the diurnal rate; the replicas serve what their batches allow; a request's
latency is its service time at the current batch plus its wait in the queue (Little's law). A new
replica serves after ``load_s`` seconds (pull, weights into GPU memory) and costs GPUs from the
moment it is asked for. GPU-hours count every replica asked for, loading or serving.

Results go to ``bench/results/fleet.json``. Usage: ``python bench/fleet.py [--json] [--seeds 5]``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator")]

from capstan.api.modelserving import ModelServing  # noqa: E402
from capstan.serving.revisions import hpa, scaled_object  # noqa: E402
from capstan.serving.runtimes import runtime_for  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fleet.json"
DAY_S = 24 * 3600
HPA_SYNC_S = 15
HPA_TOLERANCE = 0.1


@dataclass(frozen=True)
class Workload:
    """The traffic and the server, as the simulation assumes them."""

    peak_rps: float = 24.0  # requests per second at the daily peak
    trough_share: float = 0.05  # the night's rate as a share of the peak
    burst_share: float = 0.15  # +-15 % minute-scale noise on the rate
    service_s: float = 2.0  # one request alone (e.g. 256 tokens at ~130 tok/s)
    batch: int = 16  # requests a replica runs at once
    slowdown: float = 2.0  # per-request time in a full batch, relative to alone
    load_s: float = 120.0  # a new replica's time to serve (image cached, weights loaded)
    slo_s: float = 6.0  # latency target per request
    gpus_per_replica: int = 1
    open_hours: tuple[int, int] | None = None  # no traffic outside [start, end) o'clock


def rate(t: float, w: Workload, noise: float) -> float:
    """Diurnal arrival rate at second ``t``: a trough at 04:00, the peak at 16:00."""
    if w.open_hours is not None and not w.open_hours[0] <= (t // 3600) % 24 < w.open_hours[1]:
        return 0.0
    day = 0.5 - 0.5 * math.cos(2 * math.pi * ((t / DAY_S) - 4 / 24))
    base = w.peak_rps * (w.trough_share + (1 - w.trough_share) * day**1.5)
    return max(0.0, base * (1 + noise))


def per_replica_rps(w: Workload) -> float:
    """Requests per second one replica completes with a full batch."""
    return w.batch / (w.service_s * w.slowdown)


def serving_spec(w: Workload, target: int, min_replicas: int, max_replicas: int) -> ModelServing:
    """The ModelServing whose autoscalers the simulation runs."""
    auto: dict[str, Any] = {"minReplicas": min_replicas, "maxReplicas": max_replicas, "metric": "concurrency",
                            "target": target}
    if min_replicas == 0:
        auto["activationQuery"] = 'sum(gateway_pending_requests{backend="chat"})'
    return ModelServing.model_validate({
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u"},
        "spec": {"model": {"uri": "hf://org/chat"}, "runtime": "vllm", "autoscaling": auto},
    })


@dataclass
class Policy:
    """How many replicas are wanted over time; ``decide`` runs at every HPA sync."""

    name: str
    min_replicas: int
    max_replicas: int
    target: float  # average concurrency per ready replica
    window_s: int  # scale-down stabilization
    cooldown_s: int | None = None  # KEDA: idle time before going to zero (None: never to zero)
    fixed: int | None = None

    def __post_init__(self) -> None:
        self.history: deque[tuple[float, int]] = deque()
        self.idle_since: float | None = None

    def decide(self, t: float, current: int, ready: int, load: float, waiting: float) -> int:
        """The replicas wanted at ``t`` given the summed concurrency ``load`` of the ready replicas."""
        if self.fixed is not None:
            return self.fixed
        if self.cooldown_s is not None:  # KEDA: activation from zero, back to zero when idle
            busy = load + waiting > 0
            self.idle_since = None if busy else (self.idle_since if self.idle_since is not None else t)
            if current == 0:
                return 1 if busy else 0
            if self.idle_since is not None and t - self.idle_since >= self.cooldown_s:
                return 0
        if ready == 0:
            want = max(current, 1)
        else:
            # The concurrency metric is the runtime's running-requests gauge (vllm:num_requests_running):
            # queued requests show only through a full batch.
            ratio = load / ready / self.target
            want = current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(ready * ratio)
        want = min(max(want, max(self.min_replicas, 1)), self.max_replicas)
        self.history.append((t, want))
        while self.history and self.history[0][0] < t - self.window_s:
            self.history.popleft()
        if want < current:  # scale down only to the highest recommendation of the window
            want = min(current, max(w for _, w in self.history))
        return want


def simulate(policy: Policy, w: Workload, seed: int) -> dict[str, float]:
    """One day under ``policy``; GPU-hours and the share of requests over the SLO."""
    rng = random.Random(seed)
    noise = 0.0
    starting: deque[float] = deque()  # ready times of replicas still loading
    ready = policy.fixed if policy.fixed is not None else policy.min_replicas
    queue = 0.0
    gpu_s = 0.0
    total = over = 0.0
    peak_replicas = ready
    mu = 1 / w.service_s
    for t in range(DAY_S):
        if t % 60 == 0:
            noise = rng.uniform(-w.burst_share, w.burst_share)
        while starting and starting[0] <= t:
            starting.popleft()
            ready += 1
        arrivals = _poisson(rng, rate(t, w, noise))
        queue += arrivals
        slots = ready * w.batch
        running = min(queue, slots)
        # Per-request speed falls with the batch: alone 1/service_s, full batch 1/(service_s*slowdown).
        fill = running / slots if slots else 0.0
        per_req = mu / (1 + (w.slowdown - 1) * fill)
        done = min(running, running * per_req) if running else 0.0
        queue -= done
        waiting = max(0.0, queue - slots)
        throughput = max(done, 1e-9)
        latency = 1 / per_req + (waiting / throughput if ready else float("inf"))
        total += arrivals
        if latency > w.slo_s:
            over += arrivals
        current = ready + len(starting)
        gpu_s += current * w.gpus_per_replica
        if t % HPA_SYNC_S == 0:
            want = policy.decide(t, current, ready, running, waiting)
            if want > current:
                starting.extend([t + w.load_s] * (want - current))
            elif want < current:
                drop = current - want
                while drop and starting:  # cancel replicas still loading first
                    starting.pop()
                    drop -= 1
                ready -= min(drop, ready)
            peak_replicas = max(peak_replicas, want)
    return {
        "gpu_hours": gpu_s / 3600,
        "over_slo_share": over / total if total else 0.0,
        "requests": total,
        "peak_replicas": peak_replicas,
    }


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 50:  # normal approximation: exact sampling is slow at high rates
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    threshold, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= threshold:
            return k
        k += 1


def policies(w: Workload, target: int) -> list[Policy]:
    """Fixed peak provisioning, and Capstan's HPA and KEDA autoscalers as rendered."""
    peak = math.ceil(w.peak_rps * (1 + w.burst_share) / (per_replica_rps(w) * 0.8))
    out = [Policy("fixed_peak", peak, peak, target, 0, fixed=peak)]
    h = hpa(serving_spec(w, target, 1, 2 * peak), "chat-1", 100)["spec"]
    out.append(Policy("capstan_hpa", h["minReplicas"], h["maxReplicas"], _target(h),
                      h["behavior"]["scaleDown"]["stabilizationWindowSeconds"]))
    ms = serving_spec(w, target, 0, 2 * peak)
    k = scaled_object(ms, "chat-1", 100, runtime_for(ms.spec), prometheus="http://prometheus:9090")["spec"]
    out.append(Policy("capstan_keda_to_zero", k["minReplicaCount"], k["maxReplicaCount"],
                      float(k["triggers"][0]["metadata"]["threshold"]),
                      k["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
                          "stabilizationWindowSeconds"], cooldown_s=k["cooldownPeriod"]))
    return out


def _target(h: dict[str, Any]) -> float:
    value = str(h["metrics"][0]["pods"]["target"]["averageValue"])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def main() -> int:
    """Run every policy on the same seeds; print and write medians and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target", type=int, default=12, help="autoscaling.target: concurrency per replica")
    args = p.parse_args()
    traces = {
        # Consumer chat: busy evenings, a quiet night that never empties.
        "diurnal": Workload(),
        # An internal assistant: office hours only, nobody at night (where scaling to zero pays).
        "office_hours": Workload(open_hours=(8, 19)),
    }
    result: dict[str, Any] = {
        "autoscaling_target": args.target,
        "seeds": args.seeds,
        "notes": "medians over seeds; every policy sees the same arrival trace (seed); fluid queue in 1 s "
                 "steps; fixed_peak = enough replicas for the peak plus its noise at 80 % of full-batch "
                 "throughput",
        "traces": {},
    }
    for trace, w in traces.items():
        runs: dict[str, list[dict[str, float]]] = {}
        for pol in policies(w, args.target):
            fields = ("name", "min_replicas", "max_replicas", "target", "window_s", "cooldown_s", "fixed")
            runs[pol.name] = [simulate(Policy(**{k: getattr(pol, k) for k in fields}), w, s)
                              for s in range(args.seeds)]
        med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        base = med["fixed_peak"]
        result["traces"][trace] = {
            "workload": asdict(w),
            "per_replica_rps_full_batch": round(per_replica_rps(w), 2),
            "policies": {
                name: {
                    "gpu_hours": round(m["gpu_hours"], 1),
                    "gpu_hours_vs_fixed_peak": round(m["gpu_hours"] / base["gpu_hours"], 3),
                    "over_slo_share": round(m["over_slo_share"], 4),
                    "peak_replicas": int(m["peak_replicas"]),
                }
                for name, m in med.items()
            },
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
