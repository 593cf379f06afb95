"""Placement at scale on the real control plane: a burst of TrainingJobs onto KWOK GPU nodes.

For each size (N nodes of 8 GPUs, one NVLink domain per node, 8 nodes per rack, 4 racks per block;
up to M TrainingJobs of 1 to 64 workers created in one burst, about 85 % of the GPUs asked for, none
over a quarter of them; most jobs small, as in the public traces: 60 % one worker, 1 % 64 workers)
the bench runs five things (six with ``direct``) on the same fresh nodes, one after the other, in
namespaces of their own:

* ``floor``: the same worker pods (same GPU requests) created directly, with no placement logic at
  all: kube-scheduler binds them, kwok runs them (pods it leaves unschedulable, having strewn the
  others so that no node has room, are counted, and the floor's time is its last pod Running);
* ``objects``: no operator; the bench makes what one must for each job (the TrainingJob, kopf's
  finalizer, the Starting and Running status writes, the headless Service, the pods as Capstan
  labels and owns them, two Events), one after the other as the floor does (:func:`run_objects`):
  the cost of the objects themselves, which no operator can go below;
* ``list``: the operator (``capstan operator --namespace``, a real subprocess) with
  ``CAPSTAN_PLACEMENT_CACHE=off``: every placement pass lists Nodes, Pods and TrainingJobs;
* ``cache``: the operator as shipped: passes read the watch-fed caches (:mod:`capstan.kube.cache`);
* ``direct`` (not run by default): ``cache`` with the operator talking to the API server itself
  rather than through the counting proxy, times only: a check that relaying every request and
  watch event through this process does not skew the cached times (it did not: same times, the
  proxy's TLS work moves from the operator to this process);
* ``kills``: the same burst with the operator SIGKILLed ``--kills`` times (20) while it works and
  restarted at once; then the fault tier's invariants must hold (:func:`run_kills`): the full-size
  version of ``tests/faults``' SIGKILL test.

Reported per run: seconds from the last create to every placed gang Running, and from the first
create (timed from a watch opened before the burst, not by polling; and how many were placed: both
operator modes must place the same gangs); how busy the machine's cores were over that window and
the CPU seconds that makes (``cpu_busy``, ``cpu_work_s``, and ``work_over_floor`` beside the time's
``over_floor``: on a machine this small a burst keeps every core busy, so its time follows the work
it asks of the machine); the operator's API requests (counted by a
transparent proxy in front of the API server, by client and verb; per TrainingJob, against the
minimum: the worker pods and the headless Service of a gang of more than one worker created, plus
the status writes a job needs),
placement decisions per second, the operator's peak RSS and CPU seconds, and the API server's own
request count, latency p99 and the request seconds of its busiest verbs over the run (its
``/metrics``), and the CPU seconds each control-plane component used over the run (``wall_s``
long; with the operator's, where the machine's cores went). The kills mode reports the kills, how
long the jobs took to converge after the last one, and every invariant violation found
(``kill_summary`` adds them up over the sizes).

Run inside ``make cluster`` (``scripts/cluster.py run -- python bench/scale.py --json``). Defaults
(three sizes: 32 nodes and up to 48 jobs, 64 and 96, 128 and 192; the GPU budget ends each burst
first: 39, 62 and 111 jobs, 105, 205 and 331 pods with the default seed) take about 15 minutes on
2 cores;
``--sizes 64x120`` runs one. Results go to ``bench/results/scale.json``. SIGTERM or SIGINT stops the
operators at once, then removes what the run created (finalizers of its TrainingJobs included,
since no operator is left to release them) before exiting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aiohttp import web  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tests.e2e.conftest import admin_client, kubeconfig_path  # noqa: E402
from tests.faults.faults import FaultProxy, OperatorProcess, Upstream, write_proxy_kubeconfig  # noqa: E402

from _procs import stop_all  # noqa: E402  (bench/ is the script's own folder)
from capstan import GROUP, VERSION  # noqa: E402

RESULTS = REPO / "bench" / "results" / "scale.json"
PRODUCT = "CAPSTAN-BENCH-GPU"  # the bench's nodes only: jobs select them, the dev cluster's stay out
GPUS_PER_NODE = 8
# workers per job and GPUs per worker, with their weights: mostly small jobs, a few very large ones
WORKER_CHOICES = {1: 60, 2: 15, 4: 10, 8: 8, 16: 4, 32: 2, 64: 1}
GPU_CHOICES = {1: 40, 2: 25, 4: 20, 8: 15}
DEFAULT_SIZES = ("32x48", "64x96", "128x192")
MODES = ("floor", "objects", "list", "cache", "kills")  # and "direct", on request
TIMED = ("floor", "objects", "cache", "direct")  # what --rounds repeats, interleaved
KILLS = 20  # SIGKILLs of the operator during the kills mode's burst
_LIVE: list[OperatorProcess] = []  # operators running now: a signal stops them first
_INTERRUPTED = False  # a signal came: clean up without waiting on operators


def _stop_operators() -> None:
    """Stop supervising every live operator (no restarts) and stop them all at once."""
    procs = []
    for op in list(_LIVE):
        op._stopping.set()
        proc = op._proc
        if proc is not None and proc.poll() is None:
            procs.append(proc)
    stop_all(procs, grace_s=15)


def _on_signal(signum: int, _frame: Any) -> None:
    """SIGTERM/SIGINT: stop the operators now, then unwind (each run's cleanup runs on the way)."""
    global _INTERRUPTED
    _INTERRUPTED = True
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process as usual
    print(f"bench/scale.py: signal {signum}: stopping operators and cleaning up", file=sys.stderr, flush=True)
    _stop_operators()
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGINT stop the operators, then run the cleanup on the way out."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)


class CountingProxy(FaultProxy):
    """A fault proxy that injects nothing and counts requests by client, verb and resource."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream, rate=0.0, seed=0, watch_rate=0.0)
        self.enabled = False
        self.calls: Counter[str] = Counter()
        self.bytes_read: Counter[str] = Counter()  # bytes of the answers (watch streams left out)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        agent = request.headers.get("User-Agent", "").split("/")[0] or "unknown"
        verb = "WATCH" if request.query.get("watch") in ("true", "1") else request.method
        parts = [p for p in request.path.split("/") if p]
        # /api/v1/[namespaces/NS/]PLURAL[/NAME[/SUB]] and /apis/G/V/[namespaces/NS/]PLURAL[...]
        rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
        if rest[:1] == ["namespaces"] and len(rest) > 2:
            rest = rest[2:]
        resource = "/".join([rest[0], *rest[2:3]]) if rest else "-"
        self.calls[f"{agent} {verb} {resource}"] += 1
        response = await super()._handle(request)
        if verb != "WATCH" and isinstance(response, web.Response) and response.body is not None:
            self.bytes_read[agent] += len(response.body)  # type: ignore[arg-type]
        return response


def bench_nodes(count: int, prefix: str) -> list[dict[str, Any]]:
    """KWOK-managed Nodes with 8 GPUs each: NVLink domain = node, 8 nodes a rack, 4 racks a block."""
    nodes = []
    for i in range(count):
        rack, block = i // 8, i // 32
        name = f"{prefix}-{i:04d}"
        labels = {
            "kubernetes.io/hostname": name,
            "type": "kwok",
            "nvidia.com/gpu.product": PRODUCT,
            "nvidia.com/gpu.clique": name,
            "capstan.dev/rack": f"{prefix}-r{rack}",
            "capstan.dev/block": f"{prefix}-b{block}",
            "topology.kubernetes.io/zone": "bench",
        }
        alloc = {"cpu": "192", "memory": "2Ti", "pods": "110", "nvidia.com/gpu": str(GPUS_PER_NODE)}
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
                "status": {"allocatable": alloc, "capacity": alloc},
            }
        )
    return nodes


def burst(nodes: int, jobs: int, seed: int) -> list[tuple[int, int]]:
    """(workers, GPUs per worker) of each job: mixed sizes, about 85 % of the GPUs in all."""
    rng = random.Random(seed)
    budget = int(nodes * GPUS_PER_NODE * 0.85)
    out: list[tuple[int, int]] = []
    while len(out) < jobs:
        workers = rng.choices(list(WORKER_CHOICES), weights=list(WORKER_CHOICES.values()))[0]
        gpus = rng.choices(list(GPU_CHOICES), weights=list(GPU_CHOICES.values()))[0]
        if workers * gpus > min(budget, nodes * GPUS_PER_NODE // 4):  # no job over a quarter of the GPUs
            continue
        budget -= workers * gpus
        out.append((workers, gpus))
        if budget < 1:
            break
    return out


def job_manifest(namespace: str, name: str, workers: int, gpus: int) -> dict[str, Any]:
    """A TrainingJob on the bench's nodes."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": "registry.invalid/bench/trainer:1",
            "command": ["python", "-m", "train"],
            "workers": workers,
            "gpusPerWorker": gpus,
            "nodeSelector": {"nvidia.com/gpu.product": PRODUCT},
            "topology": {"policy": "Preferred"},
        },
    }


def floor_pod(namespace: str, name: str, gpus: int) -> dict[str, Any]:
    """A worker-like pod with no placement logic: kube-scheduler alone binds it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.product": PRODUCT},
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "worker",
                    "image": "registry.invalid/bench/trainer:1",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


class Cluster:
    """The bench's own reads and writes (admin identity)."""

    def __init__(self) -> None:
        from kubernetes import client

        self.api = admin_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def install_crds(self) -> None:
        """Capstan's CRDs (server-side apply of ``crds/``), and wait until they are served."""
        kubectl = [str(REPO / ".tools" / "bin" / "kubectl"), "--kubeconfig", kubeconfig_path()]
        subprocess.run(
            [*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True, capture_output=True
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds")],
            check=True,
            capture_output=True,
        )

    def metrics(self) -> dict[str, Any]:
        """The API server's request count and request-latency histogram (summed over labels)."""
        method, url, headers, *_ = self.api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, _request_timeout=30)
        response.read()
        text = response.data.decode()
        total = 0.0
        buckets: Counter[float] = Counter()
        seconds: Counter[str] = Counter()
        for family in text_string_to_metric_families(text):
            if family.name == "apiserver_request":
                total += sum(s.value for s in family.samples if s.name == "apiserver_request_total")
            if family.name == "apiserver_request_duration_seconds":
                for s in family.samples:
                    if s.labels.get("verb") in ("WATCH", "CONNECT"):
                        continue
                    if s.name.endswith("_bucket"):
                        buckets[float(s.labels["le"])] += s.value
                    elif s.name.endswith("_sum"):
                        sub = s.labels.get("subresource")
                        what = f"{s.labels['resource']}/{sub}" if sub else s.labels["resource"]
                        seconds[f"{s.labels['verb']} {what}"] += s.value
        return {"requests": total, "buckets": dict(buckets), "seconds": dict(seconds)}

    def jobs(self, namespace: str) -> list[dict[str, Any]]:
        return list(
            self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, "trainingjobs", _request_timeout=30
            )["items"]
        )

    def pod_states(self, namespace: str) -> tuple[int, int]:
        """(Running pods, pods kube-scheduler found no room for) in ``namespace``."""
        pods = self.core.list_namespaced_pod(namespace, _request_timeout=30).items
        running = sum(1 for p in pods if p.status.phase == "Running")
        stuck = sum(1 for p in pods if p.status.phase == "Pending" and any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in p.status.conditions or []))
        return running, stuck

    def namespace(self, name: str) -> None:
        self.core.create_namespace({"metadata": {"name": name}})

    def drop_jobs(self, namespace: str, timeout: float = 120) -> None:
        """Delete every TrainingJob and wait until they are gone; after a signal (no operator left
        to release them) strip their finalizers first and do not wait."""
        if _INTERRUPTED:
            for job in self.jobs(namespace):
                self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, "trainingjobs", job["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )
            timeout = 0
        for job in self.jobs(namespace):
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, "trainingjobs", job["metadata"]["name"]
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.jobs(namespace):
            time.sleep(0.5)

    def drop_namespace(self, name: str, timeout: float = 180) -> None:
        from kubernetes.client.exceptions import ApiException

        self.core.delete_namespace(name)
        if _INTERRUPTED:
            return  # the server finishes it; the signal asked to stop now
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                self.core.read_namespace(name)
            except ApiException as exc:
                if exc.status == 404:
                    return
            time.sleep(1)


class Observer:
    """When each object of a namespace was first seen Running, from a watch (no polling).

    Started before the first create, so every change arrives as an event timed on arrival: the
    figures are not rounded up to a polling interval, and the bench adds no LIST load of its own to
    the server it measures. ``resource`` is ``"pods"`` (``status.phase``) or ``"trainingjobs"``
    (``status.phase`` of the job).
    """

    def __init__(self, cluster: Cluster, namespace: str, resource: str) -> None:
        self.cluster, self.namespace, self.resource = cluster, namespace, resource
        self.states: dict[str, dict[str, Any]] = {}  # name -> the object's latest status
        self.running_at: dict[str, float] = {}  # name -> monotonic time first seen Running
        self.changed = time.monotonic()  # last time anything was first seen Running
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"observe-{resource}", daemon=True)

    def start(self) -> None:
        """Start watching; returns once the watch is open (nothing created after this is missed)."""
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the {self.resource} watch of {self.namespace} did not open")

    def stop(self) -> None:
        self._stop.set()

    def _list(self, **kwargs: Any) -> Any:
        if self.resource == "pods":
            return self.cluster.core.list_namespaced_pod(self.namespace, **kwargs)
        return self.cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "trainingjobs", **kwargs
        )

    def _run(self) -> None:
        from kubernetes import watch

        class RawWatch(watch.Watch):  # events as the server's JSON: no model objects to build
            def get_return_type(self, func: Any) -> None:
                return None

        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self._list(_request_timeout=30, _preload_content=False)
                    body = json.loads(listed.data)
                    for obj in body.get("items") or []:
                        self._seen("ADDED", obj)
                    version = body["metadata"]["resourceVersion"]
                    self._ready.set()
                for event in RawWatch().stream(
                    self._list, resource_version=version, timeout_seconds=60, _request_timeout=90
                ):
                    if self._stop.is_set():
                        return
                    if event["type"] == "ERROR":  # 410: the version is too old; list again
                        version = None
                        break
                    obj = event["raw_object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    if event["type"] != "BOOKMARK":
                        self._seen(event["type"], obj)
            except Exception:
                version = None
                time.sleep(0.2)

    def _seen(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        with self._lock:
            if kind == "DELETED":
                self.states.pop(name, None)
                return
            self.states[name] = status
            if status.get("phase") == "Running" and name not in self.running_at:
                self.running_at[name] = self.changed = time.monotonic()

    def phases(self) -> dict[str, str | None]:
        """Each object's latest ``status.phase``."""
        with self._lock:
            return {name: status.get("phase") for name, status in self.states.items()}

    def unschedulable(self) -> int:
        """Pods kube-scheduler found no room for (PodScheduled False, Unschedulable)."""
        with self._lock:
            return sum(1 for status in self.states.values() if _unschedulable(status))


def _unschedulable(status: Mapping[str, Any]) -> bool:
    stuck = ("PodScheduled", "False", "Unschedulable")
    conditions = status.get("conditions") or []
    return status.get("phase") == "Pending" and any((c.get("type"), c.get("status"), c.get("reason")) == stuck
                                                    for c in conditions)


class CpuSampler:
    """The machine's CPU use (from /proc/stat) sampled every 50 ms, to read the share of all cores
    busy over any window afterwards: what bounds a burst on a small machine."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, total jiffies, idle jiffies)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # idle + iowait

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), *self._read()))
            time.sleep(0.05)

    def busy(self, start: float, end: float) -> float | None:
        """The share of all cores busy between two monotonic times (None: too few samples)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return None
        (_, total0, idle0), (_, total1, idle1) = inside[0], inside[-1]
        return round(1 - (idle1 - idle0) / (total1 - total0), 2) if total1 > total0 else None


def busiest(before: dict[str, Any], after: dict[str, Any], top: int = 8) -> dict[str, float]:
    """The API server's request seconds over a run by verb and resource, the ``top`` largest
    (where the server's time went: summed latency, so concurrent requests overlap)."""
    spent = Counter({k: v - before["seconds"].get(k, 0.0) for k, v in after["seconds"].items()})
    return {k: round(v, 2) for k, v in spent.most_common(top) if v > 0.005}


def p99(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The 99th percentile of the requests between two histogram reads (bucket upper bound)."""
    delta = sorted((le, after.get(le, 0) - before.get(le, 0)) for le in after)
    if not delta or delta[-1][1] <= 0:
        return None
    total = delta[-1][1]
    for le, count in delta:
        if count >= 0.99 * total:
            return le
    return None


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS MiB, CPU seconds) of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return hwm / 1024, cpu


CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def control_plane_cpu() -> dict[str, float]:
    """CPU seconds each control-plane component of ``make cluster`` has used so far (from its pid
    file and /proc; a component not found is left out)."""
    state = Path(os.environ.get("CAPSTAN_CLUSTER_DIR", REPO / ".capstan" / "cluster"))
    out: dict[str, float] = {}
    for name in CONTROL_PLANE:
        try:
            pid = int((state / "pids" / f"{name}.pid").read_text().strip())
            out[name] = proc_stats(pid)[1]
        except (OSError, ValueError, StopIteration):
            continue
    return out


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per component between two :func:`control_plane_cpu` readings."""
    return {k: round(after[k] - before[k], 2) for k in after if k in before}


def run_floor(cluster: Cluster, ns: str, shape: list[tuple[int, int]], timeout: float) -> dict[str, Any]:
    """The same pods created directly; seconds from the last create to all Running."""
    cluster.namespace(ns)
    before = cluster.metrics()
    cpu_before = control_plane_cpu()
    pods = [(f"j{j}-{r}", gpus) for j, (workers, gpus) in enumerate(shape) for r in range(workers)]
    observer = Observer(cluster, ns, "pods")
    observer.start()
    bench_before = time.process_time()
    try:
        with CpuSampler() as sampler:
            first_create = time.monotonic()
            for name, gpus in pods:
                cluster.core.create_namespaced_pod(ns, floor_pod(ns, name, gpus))
            last_create = time.monotonic()
            # Until every pod runs, or the rest are unschedulable and nothing changed for 5 s:
            # kube-scheduler alone may strand GPUs (it spreads pods, leaving no whole node for an
            # 8-GPU pod), and nothing frees them later. The time is that of the last pod Running.
            while time.monotonic() - last_create < timeout:
                running, stuck = len(observer.running_at), observer.unschedulable()
                quiet = time.monotonic() - observer.changed > 5
                if running == len(pods) or (running + stuck == len(pods) and quiet):
                    break
                time.sleep(0.1)
            wall = time.monotonic() - first_create
        bench_cpu = time.process_time() - bench_before
    finally:
        observer.stop()
    running, stuck = len(observer.running_at), observer.unschedulable()
    last = max(observer.running_at.values(), default=last_create)
    timed_out = running + stuck < len(pods)
    after = cluster.metrics()
    cpu = cpu_spent(cpu_before, control_plane_cpu())
    return {
        "pods": len(pods),
        "running": running,
        "unschedulable": stuck,  # left Pending for want of room where kube-scheduler put the others
        "all_running_s": round(max(last - last_create, 0.0), 2),
        "from_first_create_s": round(last - first_create, 2),
        **burst_cpu(sampler, first_create, last),
        "timed_out": timed_out,
        "apiserver_requests": int(after["requests"] - before["requests"]),
        "apiserver_p99_s": p99(before["buckets"], after["buckets"]),
        "apiserver_request_s": busiest(before, after),
        "control_plane_cpu_s": cpu,
        "bench_cpu_s": round(bench_cpu, 2),  # the client making the pods (and its watch)
        "wall_s": round(wall, 2),
    }


def run_objects(cluster: Cluster, ns: str, shape: list[tuple[int, int]], timeout: float) -> dict[str, Any]:
    """What any operator that keeps a TrainingJob's objects asks of the machine, with no operator:
    the bench itself makes, job by job, the TrainingJob, kopf's finalizer patch, the ``Starting``
    status write, the headless Service of a gang of more than one worker (Capstan's own,
    :func:`headless_service`), its pods (the floor's, labelled and owned as Capstan's are, with
    their DNS hostnames) and an Event; once
    every pod runs, each job's ``Running`` status write and Event. The time is from the first
    create to the last of those writes: a lower bound for the operator modes, on this machine."""
    from capstan.api.loading import parse_object
    from capstan.naming import owner_reference
    from capstan.training.pods import headless_service, job_labels, needs_service, service_name

    cluster.namespace(ns)
    custom = cluster.custom
    finalizer = {"metadata": {"finalizers": ["kopf.zalando.org/KopfFinalizerMarker"]}}
    names: list[str] = []
    observer = Observer(cluster, ns, "pods")
    observer.start()
    cpu_before, bench_before = control_plane_cpu(), time.process_time()
    try:
        with CpuSampler() as sampler:
            first_create = time.monotonic()
            for j, (workers, gpus) in enumerate(shape):
                name = f"j{j}"
                body = cluster.custom.create_namespaced_custom_object(
                    GROUP, VERSION, ns, "trainingjobs", job_manifest(ns, name, workers, gpus)
                )
                names.append(name)
                custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "trainingjobs", name, finalizer)
                custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, ns, "trainingjobs", name, {"status": {"phase": "Starting"}}
                )
                job: Any = parse_object(body)
                service = needs_service(job)
                if service:
                    cluster.core.create_namespaced_service(ns, headless_service(job))
                owner = owner_reference(f"{GROUP}/{VERSION}", "TrainingJob", name, job.metadata.uid)
                for rank in range(workers):
                    pod = floor_pod(ns, f"{name}-{rank}", gpus)
                    pod["metadata"].update(labels=job_labels(job), ownerReferences=[owner])
                    pod["spec"]["hostname"] = f"{name}-{rank}"
                    if service:
                        pod["spec"]["subdomain"] = service_name(job)
                    cluster.core.create_namespaced_pod(ns, pod)
                cluster.core.create_namespaced_event(ns, _event(ns, body, "Starting"))
            pods = sum(w for w, _ in shape)
            while time.monotonic() - first_create < timeout:  # the floor's rule: all run, or the rest
                running, stuck = len(observer.running_at), observer.unschedulable()  # cannot, for 5 s
                if running == pods or (running + stuck == pods and time.monotonic() - observer.changed > 5):
                    break
                time.sleep(0.05)
            last_running = max(observer.running_at.values(), default=time.monotonic())
            writes_from = time.monotonic()
            running_status = {"status": {"phase": "Running"}}
            for name in names:
                custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "trainingjobs", name,
                                                             running_status)
                cluster.core.create_namespaced_event(ns, _event(ns, {"metadata": {"name": name}}, "Running"))
            writes_to = time.monotonic()
        cpu, bench_cpu = cpu_spent(cpu_before, control_plane_cpu()), time.process_time() - bench_before
    finally:
        observer.stop()
        for name in names:  # no operator will release them
            cluster.custom.patch_namespaced_custom_object(
                GROUP, VERSION, ns, "trainingjobs", name, {"metadata": {"finalizers": None}}
            )
    # the time and work up to the last pod Running, then of the final writes (not the wait between,
    # while the bench sees whether kube-scheduler left pods without room: the floor's wait too)
    took = (last_running - first_create) + (writes_to - writes_from)
    work = [burst_cpu(sampler, *window)["cpu_work_s"] for window in
            ((first_create, last_running), (writes_from, writes_to))]
    total = sum(w for w in work if w is not None)
    return {
        "pods": sum(w for w, _ in shape),
        "running": len(observer.running_at),
        "unschedulable": observer.unschedulable(),
        "from_first_create_s": round(took, 2),
        "cpu_busy": round(total / ((os.cpu_count() or 1) * took), 2) if took > 0 else None,
        "cpu_work_s": round(total, 2),
        # the control plane's share, and the bench's own as the client making the writes (which
        # includes the 5 s wait for stranded pods, idle but for its watch)
        "control_plane_cpu_s": cpu,
        "bench_cpu_s": round(bench_cpu, 2),
    }


def _event(ns: str, job: Mapping[str, Any], reason: str) -> dict[str, Any]:
    name = job["metadata"]["name"]
    involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "name": name, "namespace": ns}
    if "uid" in job["metadata"]:
        involved["uid"] = job["metadata"]["uid"]
    return {
        "metadata": {"generateName": f"{name}."},
        "involvedObject": involved,
        "reason": reason,
        "message": f"the gang is {reason.lower()}",
        "type": "Normal",
    }


QUIET_BUSY = 0.3  # the machine's busy share under which a mode starts (an idle dev cluster: ~0.1)


def quiet_for(busy: float, window_s: float = 2.0, timeout_s: float = 60.0) -> float | None:
    """Wait until the machine's cores were less than ``busy`` busy over the last ``window_s`` (at
    most ``timeout_s``): each mode starts on a machine at rest, not in the wake of the one before.
    Returns the share seen last."""
    with CpuSampler() as sampler:
        end = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < end:
            time.sleep(0.25)
            now = time.monotonic()
            if now - sampler.samples[0][0] < window_s:
                continue
            seen = sampler.busy(now - window_s, now)
            if seen is not None and seen < busy:
                break
    return seen


def burst_cpu(sampler: CpuSampler, start: float, end: float) -> dict[str, float | None]:
    """How busy the machine's cores were from the first create to the last gang Running, and the
    CPU seconds that makes: on a machine this small the burst is bound by that work, so the time
    over the floor follows the work over the floor."""
    busy = sampler.busy(start, end)
    cores = os.cpu_count() or 1
    return {
        "cpu_busy": busy,
        "cpu_work_s": round(busy * cores * (end - start), 2) if busy is not None else None,
    }


def end_run(cluster: Cluster, ns: str, op: OperatorProcess, proxy: CountingProxy | None = None) -> None:
    """Remove what an operator run made: its TrainingJobs first, while the operator runs (it
    releases their finalizers), then the namespace; then stop the operator (and the proxy)."""
    try:
        cluster.drop_jobs(ns)
        cluster.drop_namespace(ns)
    finally:
        op.stop()
        _LIVE.remove(op)
        if proxy is not None:
            proxy.stop()
        os.environ.pop("CAPSTAN_PLACEMENT_CACHE", None)


def run_operator(
    cluster: Cluster, ns: str, shape: list[tuple[int, int]], cache: bool, log_dir: Path, timeout: float,
    counted: bool = True,
) -> dict[str, Any]:
    """The burst through the real operator; see the module docstring for what is reported.

    ``counted``: the operator talks to the API server through the counting proxy (its requests by
    client and verb); otherwise directly, as it does when deployed, and only times are reported:
    the proxy relays every request and watch event in this process, on the same cores.
    """
    cluster.namespace(ns)
    proxy: CountingProxy | None = None
    if counted:
        proxy = CountingProxy(Upstream.from_kubeconfig(kubeconfig_path()))
        proxy.start()
        kubeconfig = log_dir / f"{ns}.kubeconfig"
        write_proxy_kubeconfig(kubeconfig, proxy.url, ns)
    else:
        kubeconfig = Path(kubeconfig_path())
    os.environ["CAPSTAN_PLACEMENT_CACHE"] = "on" if cache else "off"
    op = OperatorProcess(ns, str(kubeconfig), log_dir, name=ns)
    _LIVE.append(op)
    try:
        op.start()
        op.wait_started(120)
        time.sleep(3)  # the caches' first lists, kopf's watches: not part of the burst
        if proxy is not None:
            proxy.calls.clear()
            proxy.bytes_read.clear()
        before = cluster.metrics()
        bench_before = time.process_time()
        cpu_before = control_plane_cpu()
        cpu0 = proc_stats(op._proc.pid)[1]  # type: ignore[union-attr]
        observer = Observer(cluster, ns, "trainingjobs")
        observer.start()
        try:
            with CpuSampler() as sampler:
                first_create = time.monotonic()
                for j, (workers, gpus) in enumerate(shape):
                    cluster.custom.create_namespaced_custom_object(
                        GROUP, VERSION, ns, "trainingjobs", job_manifest(ns, f"j{j}", workers, gpus)
                    )
                last_create = time.monotonic()

                def settled() -> bool:
                    phases = observer.phases().values()
                    return len(phases) == len(shape) and all(p in ("Running", "Queued") for p in phases)

                until_steady(settled, timeout, interval_s=0.1)
        finally:
            observer.stop()
        bench_cpu = time.process_time() - bench_before
        placed_at = {name: t - last_create for name, t in observer.running_at.items()}
        after = cluster.metrics()
        cpu = cpu_spent(cpu_before, control_plane_cpu())
        wall = time.monotonic() - first_create
        rss, cpu1 = proc_stats(op._proc.pid)  # type: ignore[union-attr]
        calls = ({k: v for k, v in sorted(proxy.calls.items()) if k.split()[0] in ("capstan", "kopf")}
                 if proxy is not None else {})
        placed = list(placed_at)
        pods = sum(shape[int(n[1:])][0] for n in placed)
        # the least a job needs: its pods and (more than one worker) headless Service created, its
        # status written when it is admitted and placed (Starting) and when it runs; a queued job
        # only its admission
        services = sum(1 for n in placed if shape[int(n[1:])][0] > 1)
        minimum = pods + services + 2 * len(placed) + (len(shape) - len(placed))
        # Events are left out of both sides: they are notes for people, not work on the objects
        requests = sum(v for k, v in calls.items() if not k.endswith(" events"))
        last = max(placed_at.values(), default=0.0)
        counts: dict[str, Any] = {}
        if proxy is not None:
            counts = {
                "operator_requests": calls,
                "operator_kib_read": round(
                    (proxy.bytes_read["capstan"] + proxy.bytes_read["kopf"]) / 1024, 1),
                "operator_events_posted": sum(v for k, v in calls.items() if k.endswith("POST events")),
                "requests_per_job": round(requests / len(shape), 2),
                "minimum_per_job": round(minimum / len(shape), 2),
                "ratio_to_minimum": round(requests / minimum, 2),
            }
        return {
            "mode": ("cache" if cache else "list") if proxy is not None else "direct",
            "jobs": len(shape),
            "placed": len(placed),
            "queued": len(shape) - len(placed),
            "pods": pods,
            "all_placed_running_s": round(last, 2),
            "from_first_create_s": round(last + last_create - first_create, 2),
            **burst_cpu(sampler, first_create, last_create + last),
            # this process: the burst's creates, the watch that times it and, counted, the proxy
            "bench_cpu_s": round(bench_cpu, 2),
            **counts,
            "placements_per_s": round(len(placed) / last, 2) if last else None,
            "operator_peak_rss_mib": round(rss, 1),
            "operator_cpu_s": round(cpu1 - cpu0, 2),
            "apiserver_requests": int(after["requests"] - before["requests"]),
            "apiserver_p99_s": p99(before["buckets"], after["buckets"]),
            "apiserver_request_s": busiest(before, after),
            "control_plane_cpu_s": cpu,
            "wall_s": round(wall, 2),
            "operator_restarts": len(op.exits),
        }
    finally:
        end_run(cluster, ns, op, proxy)


STEADY_S = 5.0  # how long a burst's end state must hold before the bench takes it as the end


def until_steady(holds: Callable[[], bool], timeout_s: float, interval_s: float) -> bool:
    """Check ``holds`` every ``interval_s`` until it has held for :data:`STEADY_S` in a row (True)
    or ``timeout_s`` has passed (False)."""
    end = time.monotonic() + timeout_s
    since = None
    while time.monotonic() < end:
        if holds():
            since = since or time.monotonic()
            if time.monotonic() - since > STEADY_S:
                return True
        else:
            since = None
        time.sleep(interval_s)
    return False


def run_kills(
    cluster: Cluster,
    ns: str,
    shape: list[tuple[int, int]],
    log_dir: Path,
    timeout: float,
    kills: int,
    seed: int,
) -> dict[str, Any]:
    """The burst through the operator (cached reads), SIGKILLed ``kills`` times while it works and
    restarted at once, as a Deployment would: each kill comes 0.2-1.5 s (seeded) after the restarted
    operator said it started, the first one during the creates. Then the fault tier's invariants
    (:func:`tests.faults.faults.violations`) must hold for every job: a placed one has exactly one
    pod per rank, on the nodes its status names, all Running; a queued one has no pods and no
    placement; nothing without a live owner, no duplicate Service; no job lost."""
    from tests.faults.faults import Cluster as FaultCluster
    from tests.faults.faults import JobSpec, violations

    cluster.namespace(ns)
    os.environ["CAPSTAN_PLACEMENT_CACHE"] = "on"
    op = OperatorProcess(ns, kubeconfig_path(), log_dir, name=ns)
    _LIVE.append(op)
    rng = random.Random(seed)
    view = FaultCluster(cluster.api)
    specs = [JobSpec(f"j{j}", workers, gpus) for j, (workers, gpus) in enumerate(shape)]
    killer_done = threading.Event()

    def killer() -> None:
        try:
            for _ in range(kills):
                op.wait_started(120)
                time.sleep(rng.uniform(0.2, 1.5))
                op.kill(restart=True)
        finally:
            killer_done.set()

    try:
        op.start()
        op.wait_started(120)
        time.sleep(3)
        thread = threading.Thread(target=killer, daemon=True)
        first_create = time.monotonic()
        thread.start()
        for spec in specs:
            cluster.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, "trainingjobs", job_manifest(ns, spec.name, spec.workers, spec.gpus)
            )
        killer_done.wait(timeout)
        last_kill = time.monotonic()
        op.wait_started(120)
        problems: list[str] = ["not checked yet"]

        def clean() -> bool:
            nonlocal problems
            try:
                snap = view.snapshot(ns)
            except Exception as exc:  # the bench's own read failed (busy server): poll again
                problems = [f"snapshot failed: {type(exc).__name__}"]
                return False
            phases = {j["metadata"]["name"]: (j.get("status") or {}).get("phase") for j in snap.jobs}
            for spec in specs:  # a gang still waiting is judged as queued; any other as placed
                spec.expect = "Queued" if phases.get(spec.name) in ("Queued", "Pending", None) else "Running"
            problems = violations(snap, specs)
            return not problems

        until_steady(clean, timeout, interval_s=0.5)
        converged = time.monotonic() - last_kill - (STEADY_S if not problems else 0)
        placed = sum(1 for s in specs if s.expect == "Running")
        return {
            "mode": "kills",
            "jobs": len(shape),
            "kills": op.kills,
            "operator_starts": op.starts,
            "unexpected_exits": len(op.exits),
            "burst_s": round(last_kill - first_create, 2),
            "converged_after_last_kill_s": round(converged, 2) if not problems else None,
            "placed": placed,
            "queued": len(specs) - placed,
            "invariant_violations": len(problems),
            "violations": problems[:20],
        }
    finally:
        end_run(cluster, ns, op)


def run_size(
    cluster: Cluster,
    nodes: int,
    jobs: int,
    seed: int,
    log_dir: Path,
    timeout: float,
    modes: tuple[str, ...] = ("floor", "list", "cache"),
    kills: int = KILLS,
    rounds: int = 1,
) -> dict[str, Any]:
    """``modes`` on ``nodes`` fresh nodes with the same burst.

    With ``rounds`` > 1 the timed modes (:data:`TIMED`) run that many times, interleaved (floor,
    objects, cache, floor, objects, cache, ...), so each ratio is taken within a round, side by
    side, and reported as the median over rounds; each mode keeps its first round's whole record.
    """
    prefix = f"bench{nodes}"
    made = bench_nodes(nodes, prefix)
    for node in made:
        cluster.core.create_node(node)
    shape = burst(nodes, jobs, seed)
    out: dict[str, Any] = {
        "nodes": nodes,
        "gpus": nodes * GPUS_PER_NODE,
        "jobs": len(shape),
        "gpus_asked": sum(w * g for w, g in shape),
        "workers": sorted(w for w, _ in shape),
    }
    timed = [m for m in modes if m in TIMED]
    order = list(modes) if rounds <= 1 else timed * rounds + [m for m in modes if m not in TIMED]
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for mode in order:
            quiet_for(QUIET_BUSY)  # what came before (an OpenAPI rebuild, a namespace deletion) is over
            ns = f"scale-{nodes}-{mode}"
            if mode in ("floor", "objects"):
                try:
                    result = (run_floor if mode == "floor" else run_objects)(cluster, ns, shape, timeout)
                finally:
                    cluster.drop_namespace(ns)
            elif mode == "kills":
                result = run_kills(cluster, ns, shape, log_dir, timeout, kills, seed)
            else:
                result = run_operator(cluster, ns, shape, mode != "list", log_dir, timeout,
                                      counted=mode != "direct")
            runs.setdefault(mode, []).append(result)
            out.setdefault(mode, result)
            print(json.dumps({"nodes": nodes, mode: result}), file=sys.stderr, flush=True)
    finally:
        for node in made:
            cluster.core.delete_node(node["metadata"]["name"])
    # Measured from the first create: the floor's clock would otherwise start after it has created
    # every pod itself, one by one, while the operator's starts before it creates any.
    for mode in set(modes) - {"floor", "kills"}:  # objects, list, cache, direct
        out[mode]["over_floor"] = _ratio(runs, mode, "floor", "from_first_create_s")
        out[mode]["work_over_floor"] = _ratio(runs, mode, "floor", "cpu_work_s")
        if mode in ("cache", "direct"):
            out[mode]["over_objects"] = _ratio(runs, mode, "objects", "from_first_create_s")
    if rounds > 1:
        for mode in timed:
            out[mode]["rounds_s"] = [r["from_first_create_s"] for r in runs[mode]]
    return out


def _ratio(runs: Mapping[str, list[dict[str, Any]]], mode: str, base: str, key: str) -> float | None:
    """Median over rounds of ``mode``'s ``key`` over ``base``'s in the same round (list: its one
    run against the first round)."""
    if base not in runs:
        return None
    pairs = zip(runs[mode], runs[base], strict=False)
    ratios = [m[key] / b[key] for m, b in pairs if m.get(key) and b.get(key)]
    return round(statistics.median(ratios), 2) if ratios else None


def main(argv: list[str] | None = None) -> None:
    """Run the sizes and print/write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=list(DEFAULT_SIZES),
        help=f"NODESxJOBS per size (default: {' '.join(DEFAULT_SIZES)})",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240, help="seconds a burst may take")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), help=f"what to run (default: {' '.join(MODES)})"
    )
    parser.add_argument("--kills", type=int, default=KILLS, help="SIGKILLs of the operator in the kills mode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run the timed modes (floor, objects, cache, direct) this many times per size, interleaved; "
             "ratios are medians of each round's",
    )
    args = parser.parse_args(argv)
    install_signal_handlers()
    # the counting proxy's relayed watch streams end with the runs: asyncio would log each one
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    cluster = Cluster()
    cluster.install_crds()
    runs = []
    with tempfile.TemporaryDirectory(prefix="capstan-scale-") as tmp:
        for size in args.sizes:
            nodes, jobs = (int(x) for x in size.split("x"))
            runs.append(run_size(cluster, nodes, jobs, args.seed, Path(tmp), args.timeout, tuple(args.modes),
                                 args.kills, args.rounds))
    per_object = None
    if len(runs) > 1 and "cache" in args.modes:
        # operator RSS against objects (nodes + jobs + pods): the slope between the smallest and largest
        small, large = runs[0]["cache"], runs[-1]["cache"]
        objects = [r["nodes"] + r["jobs"] + r["cache"]["pods"] for r in (runs[0], runs[-1])]
        if objects[1] > objects[0]:
            per_object = round(
                (large["operator_peak_rss_mib"] - small["operator_peak_rss_mib"])
                * 1024
                / (objects[1] - objects[0]),
                1,
            )
    result = {
        "bench": "scale",
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
        "seed": args.seed,
        "runs": runs,
        "rss_kib_per_object": per_object,
        "median_ratio_to_minimum": {
            m: statistics.median(r[m]["ratio_to_minimum"] for r in runs)
            for m in ("list", "cache")
            if m in args.modes
        },
        "kill_summary": {
            "runs": sum(1 for r in runs if "kills" in r),
            "kills": sum(r["kills"]["kills"] for r in runs if "kills" in r),
            "invariant_violations": sum(r["kills"]["invariant_violations"] for r in runs if "kills" in r),
            "unexpected_exits": sum(r["kills"]["unexpected_exits"] for r in runs if "kills" in r),
        },
        "median_over_floor": {
            m: statistics.median(r[m]["over_floor"] or 0 for r in runs)
            for m in ("objects", "list", "cache", "direct")
            if m in args.modes
        },
        "median_work_over_floor": {
            m: statistics.median(r[m]["work_over_floor"] or 0 for r in runs)
            for m in ("objects", "list", "cache", "direct")
            if m in args.modes
        },
        "median_over_objects": {
            m: statistics.median(r[m]["over_objects"] or 0 for r in runs)
            for m in ("cache", "direct")
            if m in args.modes and "objects" in args.modes
        },
        "rounds": args.rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
