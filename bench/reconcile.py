"""Control-plane yardstick: TrainingJob creation → all worker pods created, over the floor.

For N workers, the floor is N sequential pod POSTs (the same pod bodies the operator creates) to
the same API server in the same run; the measured time runs from the TrainingJob POST until the
server holds all N pods, with the real operator (kopf watch → reconcile loop → concurrent creates).
The ratio says what the operator's own work and the watch latency cost over the bare round-trips
(below 1 means concurrent creation beats the sequential floor).

The server is Capstan's test emulator (kmock-based, real HTTP) in this process; the operator runs
in its own thread and event loop, as in the integration tests. Each (N, rep) gets a fresh server
and operator; the median of the reps is reported.

    PYTHONPATH=operator python bench/reconcile.py [--reps 3] [--workers 1 16 128] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from capstan.api.trainingjob import TrainingJob
from capstan.kube.testing import emulated_cluster, running_operator, test_client, wait_watching
from capstan.training.pods import worker_pod

RESULTS = Path(__file__).resolve().parent / "results" / "reconcile.json"


def job_dict(name: str, namespace: str, workers: int) -> dict[str, Any]:
    """A CPU TrainingJob (no placement: the yardstick is API round-trips, not the placer)."""
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"image": "registry.example/trainer:1.0", "workers": workers},
    }


def _pods_in(emulator: Any, namespace: str) -> int:
    return sum(
        1
        for (res, ns, _), obj in emulator.objects.items()
        if ns == namespace and res.plural == "pods" and not obj.deleted
    )


async def one_rep(workers: int, concurrency: int) -> tuple[float, float]:
    """(create_to_all_pods_s, floor_s) on a fresh emulator and operator."""
    async with emulated_cluster() as (emulator, url):
        api = test_client(url, concurrency=concurrency)
        try:
            # floor: the same pod bodies the operator would send, one after another
            model = TrainingJob.model_validate(job_dict("floor", "floor", workers))
            model.metadata.uid = "00000000-0000-0000-0000-000000000000"
            bodies = [worker_pod(model, rank, 0) for rank in range(workers)]
            await api.create(bodies[0] | {"metadata": {**bodies[0]["metadata"], "name": "warmup"}})
            t0 = time.perf_counter()
            for body in bodies:
                await api.create(body)
            floor = time.perf_counter() - t0

            async with running_operator(url, concurrency=concurrency):
                await wait_watching(emulator)
                t0 = time.perf_counter()
                await api.create(job_dict("bench", "bench", workers))
                while _pods_in(emulator, "bench") < workers:
                    await asyncio.sleep(0.002)
                took = time.perf_counter() - t0
        finally:
            await api.close()
    return took, floor


async def run(workers_list: list[int], reps: int, concurrency: int) -> dict[str, Any]:
    """Measure every N; medians of ``reps``."""
    rows = []
    for workers in workers_list:
        took, floors = [], []
        for _ in range(reps):
            t, f = await one_rep(workers, concurrency)
            took.append(t)
            floors.append(f)
        t_med, f_med = statistics.median(took), statistics.median(floors)
        rows.append(
            {
                "workers": workers,
                "create_to_all_pods_s": round(t_med, 4),
                "floor_s": round(f_med, 4),
                "ratio": round(t_med / f_med, 3),
                "samples_create_s": [round(x, 4) for x in took],
                "samples_floor_s": [round(x, 4) for x in floors],
            }
        )
    return {
        "benchmark": "reconcile",
        "metric": "TrainingJob POST -> all worker pods exist, over N sequential pod POSTs",
        "server": "capstan.kube.testing emulator (kmock, HTTP on 127.0.0.1, same process)",
        "concurrency": concurrency,
        "reps": reps,
        "results": rows,
        "target": {"workers": 128, "max_ratio": 1.5},
        "pass": all(r["ratio"] <= 1.5 for r in rows if r["workers"] == 128),
    }


def main() -> None:
    """Run, write ``bench/results/reconcile.json`` and print the JSON as the last line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out = asyncio.run(run(args.workers, args.reps, args.concurrency))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    for row in out["results"]:
        print(
            f"N={row['workers']:4d}  create->all pods {row['create_to_all_pods_s']:.3f}s  "
            f"floor {row['floor_s']:.3f}s  ratio {row['ratio']:.2f}"
        )
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    main()
