"""Control-plane yardstick: TrainingJob creation → all worker pods created, over the floor.

For N workers, the floor is N sequential pod POSTs (the same pod bodies the operator creates) to
the same API server in the same run; the measured time runs from the TrainingJob POST until the
server holds all N pods, with the real operator (kopf watch → reconcile loop → concurrent creates).
The ratio says what the operator's own work and the watch latency cost over the bare round-trips
(below 1 means concurrent creation beats the sequential floor).

The server is Capstan's test emulator (kmock-based, real HTTP) in its own process, as an API
server is; the operator runs in this process (its own thread and loop, as in the integration
tests). The floor is taken on the same server with the operator already running and watching, so
both measurements pay the same watch fan-out per POST. Pod creation is observed through a watch
(no polling). Each (N, rep) gets a fresh server and operator; medians of the reps are reported.

    PYTHONPATH=operator python bench/reconcile.py [--reps 3] [--workers 1 16 128] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
# The emulator and the in-process operator are test support (tests/support), not shipped code.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.api.bodies import make_trainingjob  # noqa: E402
from tests.support.kube import running_operator, test_client  # noqa: E402

from capstan.api.trainingjob import TrainingJob  # noqa: E402 -- after the repository path tweak
from capstan.training.pods import worker_pod  # noqa: E402

RESULTS = REPO / "bench" / "results" / "reconcile.json"


def job_dict(name: str, namespace: str, workers: int) -> dict[str, Any]:
    """A CPU TrainingJob (no placement: the yardstick is API round-trips, not the placer)."""
    return (
        make_trainingjob(name).namespace(namespace).image("registry.example/trainer:1.0").workers(workers).obj()
    )


class PodCounter:
    """Counts pods created in a namespace from a watch stream (push: no polling load on the server)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, namespace: str) -> None:
        self.url = f"{url}/api/v1/namespaces/{namespace}/pods"
        self.session = session
        self.names: set[str] = set()
        self.changed = asyncio.Event()
        self.open = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.session.get(self.url, params={"watch": "true"}, timeout=None) as resp:
            self.open.set()
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ADDED":
                    self.names.add(event["object"]["metadata"]["name"])
                    self.changed.set()

    async def until(self, count: int) -> None:
        while len(self.names) < count:
            self.changed.clear()
            await self.changed.wait()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await self.task


@contextlib.asynccontextmanager
async def api_server() -> AsyncIterator[str]:
    """The emulator in its own process, as an API server is (prints its URL on the first line)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.kube", stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    try:
        yield url
    finally:
        proc.terminate()
        await proc.wait()


def floor_bodies(namespace: str, workers: int) -> list[dict[str, Any]]:
    """The pod bodies the operator would send for an N-worker job."""
    model = TrainingJob.model_validate(job_dict("floor", namespace, workers))
    model.metadata.uid = "00000000-0000-0000-0000-000000000000"
    return [worker_pod(model, rank, 0) for rank in range(workers)]


async def sequential_posts(api: Any, bodies: list[dict[str, Any]]) -> float:
    """Seconds for POSTing ``bodies`` one after another."""
    t0 = time.perf_counter()
    for body in bodies:
        await api.create(body)
    return time.perf_counter() - t0


async def one_rep(workers: int, concurrency: int) -> tuple[float, float, float]:
    """(create_to_all_pods_s, floor_s, floor_idle_s) on a fresh API server and operator."""
    async with api_server() as url:
        idle_api = test_client(url)
        try:  # the floor on a server nobody watches (reported, not the yardstick's floor)
            floor_idle = await sequential_posts(idle_api, floor_bodies("floor-idle", workers))
        finally:
            await idle_api.close()
        async with running_operator(url, concurrency=concurrency):
            return await _measure(url, workers, floor_idle)


async def _measure(url: str, workers: int, floor_idle: float) -> tuple[float, float, float]:
    api = test_client(url)
    session = aiohttp.ClientSession()
    counters: list[PodCounter] = []
    try:
        # warm-up: one job end to end proves the operator's watches are open
        warm = PodCounter(session, url, "warmup")
        counters.append(warm)
        await warm.open.wait()
        await api.create(job_dict("warmup", "warmup", 1))
        await asyncio.wait_for(warm.until(1), 30)

        # floor: the same pod bodies the operator sends, one after another, same server state
        floor = await sequential_posts(api, floor_bodies("floor", workers))

        counter = PodCounter(session, url, "bench")
        counters.append(counter)
        await counter.open.wait()
        t0 = time.perf_counter()
        await api.create(job_dict("bench", "bench", workers))
        await asyncio.wait_for(counter.until(workers), 120)
        took = time.perf_counter() - t0
    finally:
        for c in counters:
            await c.close()
        await session.close()
        await api.close()
    return took, floor, floor_idle


async def run(workers_list: list[int], reps: int, concurrency: int) -> dict[str, Any]:
    """Measure every N; medians of ``reps``."""
    rows = []
    for workers in workers_list:
        took, floors, idles = [], [], []
        for _ in range(reps):
            t, f, i = await one_rep(workers, concurrency)
            took.append(t)
            floors.append(f)
            idles.append(i)
        t_med, f_med, i_med = statistics.median(took), statistics.median(floors), statistics.median(idles)
        rows.append(
            {
                "workers": workers,
                "create_to_all_pods_s": round(t_med, 4),
                "floor_s": round(f_med, 4),
                "ratio": round(t_med / f_med, 3),
                "floor_idle_s": round(i_med, 4),
                "ratio_vs_idle_floor": round(t_med / i_med, 3),
                "samples_create_s": [round(x, 4) for x in took],
                "samples_floor_s": [round(x, 4) for x in floors],
            }
        )
    return {
        "benchmark": "reconcile",
        "metric": "TrainingJob POST -> all worker pods exist, over N sequential pod POSTs",
        "server": "tests.support.kube emulator (kmock) in its own process, HTTP on 127.0.0.1",
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
    parser.add_argument("--json", action="store_true", help="only the final JSON line (no table)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out = asyncio.run(run(args.workers, args.reps, args.concurrency))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    for row in [] if args.json else out["results"]:
        print(
            f"N={row['workers']:4d}  create->all pods {row['create_to_all_pods_s']:.3f}s  "
            f"floor {row['floor_s']:.3f}s  ratio {row['ratio']:.2f}"
        )
    print(json.dumps(out, separators=(",", ":")))


if __name__ == "__main__":
    main()
