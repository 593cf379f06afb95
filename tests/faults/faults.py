"""Fault and kill experiments against the real control plane (``tests/faults/test_faults.py``).

Three pieces, each usable on its own:

* :class:`OperatorProcess` runs ``capstan operator`` as a real subprocess scoped to one namespace
  and supervises it like a Deployment would: an exit it did not ask for is recorded and the
  operator is started again. :meth:`OperatorProcess.kill` sends SIGKILL and restarts it.
* :class:`FaultProxy`, a reverse proxy on 127.0.0.1 between the operator (plain HTTP, through a
  kubeconfig of its own) and the API server (TLS, the test kubeconfig's credentials). A seeded
  share of requests gets a fault instead of, or on top of, the server's answer; every fault is
  counted by type and by client (kopf or Capstan's own client, told apart by User-Agent).
* The workload: :func:`burst` (TrainingJobs as :class:`JobSpec`, each with what the test expects
  of it), :class:`Cluster` (the test's own reads and writes: snapshots, playing the kubelet) and
  :func:`violations`, the invariants the namespace must satisfy once the operator has converged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from capstan import GROUP, VERSION
from capstan.labels import FINALIZER, LABEL_ATTEMPT, LABEL_JOB, LABEL_JOB_UID, LABEL_RANK

ROOT = Path(__file__).resolve().parents[2]
STARTED_LINE = "capstan operator started against"


def restart_control_plane(components: tuple[str, ...], kill: bool) -> dict[str, Any]:
    """Restart components of the ``make cluster`` control plane (``scripts/cluster.py restart``),
    SIGKILLed (``kill``) or stopped cleanly; returns the seconds the restart took and what it said."""
    began = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "cluster.py"), "restart",
                           *(["--kill"] if kill else []), *components],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"cluster.py restart failed:\n{done.stderr}{done.stdout}"
    return {"restarted": list(components), "killed": kill, "restart_s": round(time.monotonic() - began, 2),
            "said": done.stderr.strip().splitlines()[-1:]}


class ControlPlaneKubelet:
    """Starts again any control-plane component of ``make cluster`` that exits on its own, as the
    kubelet of a static pod would (kube-scheduler exits on purpose when it finds its cache out of
    step with the API server, which a crashed etcd can cause). Records what it restarted."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.restarted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="control-plane-kubelet", daemon=True)
        self.paused = threading.Lock()  # held while the test itself restarts components

    def __enter__(self) -> ControlPlaneKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _watch(self) -> None:
        script = str(ROOT / "scripts" / "cluster.py")
        while not self._stop.wait(self.interval):
            with self.paused:
                done = subprocess.run([sys.executable, script, "status"], capture_output=True, text=True,
                                      timeout=60, check=False)
                stopped = [line.split(":")[0] for line in done.stdout.splitlines()
                           if line.endswith(": stopped")]
                if stopped:
                    subprocess.run([sys.executable, script, "restart", *stopped], capture_output=True,
                                   timeout=240, check=False)
                    self.restarted.extend(stopped)


def is_make_cluster(kubeconfig: str) -> bool:
    """Whether ``kubeconfig`` is the one ``make cluster`` (scripts/cluster.py) wrote: only that
    control plane can be restarted by the tests."""
    state = Path(os.environ.get("CAPSTAN_CLUSTER_DIR", ROOT / ".capstan" / "cluster")).resolve()
    return Path(kubeconfig).resolve() == state / "kubeconfig"


# -- the operator as a supervised subprocess -----------------------------------------------------


@dataclass
class Exit:
    """An exit of the operator process the supervisor did not ask for."""

    returncode: int
    last_line: str
    at: float


class OperatorProcess:
    """``capstan operator --namespace NS --standalone`` with ``KUBECONFIG=kubeconfig``, restarted
    on any exit it did not ask for (after ``restart_delay`` seconds, as a kubelet would).

    With ``peering``, a replica of an HA pair instead: ``--peering NAME``, with its kopf priority
    from ``priority`` (``$CAPSTAN_PEERING_PRIORITY``); the highest live priority is active."""

    def __init__(self, namespace: str, kubeconfig: str, log_dir: Path, restart_delay: float = 0.2, *,
                 peering: str | None = None, priority: int | None = None, name: str = "operator") -> None:
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.restart_delay = restart_delay
        self.peering = peering
        self.priority = priority
        self.name = name
        self.starts = 0
        self.kills = 0
        self.exits: list[Exit] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def log(self) -> Path | None:
        """The log file of the current (or last) run."""
        return self._log

    def start(self) -> None:
        """Start the operator and its supervisor thread."""
        with self._lock:
            self._spawn()
        self._watcher = threading.Thread(target=self._supervise, name="operator-supervisor", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        self.starts += 1
        self._log = self.log_dir / f"{self.name}-{self.starts:02d}.log"
        # No webhook server of its own: the webhook configuration (if any) belongs to another install.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSTAN_WEBHOOK_")}
        env.update({"KUBECONFIG": self.kubeconfig, "CAPSTAN_LOG_FORMAT": "plain", "PYTHONUNBUFFERED": "1"})
        if self.priority is not None:
            env["CAPSTAN_PEERING_PRIORITY"] = str(self.priority)
        scope = ["--peering", self.peering] if self.peering else ["--standalone"]
        cmd = [sys.executable, "-m", "capstan", "operator", "--namespace", self.namespace, *scope,
               "--metrics-port", "0", "--liveness-port", "0"]
        with self._log.open("wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
                rc = proc.poll() if proc is not None else None
                if rc is not None and not self._stopping.is_set():
                    self.exits.append(Exit(rc, self.last_line(), time.monotonic()))
            if rc is not None and not self._stopping.is_set():
                time.sleep(self.restart_delay)
                with self._lock:
                    if not self._stopping.is_set() and self._proc is proc:
                        self._spawn()
            time.sleep(0.05)

    def wait_started(self, timeout: float = 60.0) -> float:
        """Wait until the current run has logged its start; returns the seconds waited."""
        begin = time.monotonic()
        while time.monotonic() - begin < timeout:
            log = self._log
            if log is not None and log.exists() and STARTED_LINE in log.read_text(errors="replace"):
                return time.monotonic() - begin
            time.sleep(0.02)
        raise TimeoutError(f"operator did not start within {timeout}s; log tail:\n{self.tail()}")

    def kill(self, restart: bool = True) -> None:
        """SIGKILL the operator and start it again at once (what a crash and a restart do); with
        ``restart=False`` it stays down (its node is gone)."""
        if not restart:
            self._stopping.set()
        with self._lock:
            proc = self._proc
            assert proc is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.kills += 1
            if restart:
                self._spawn()

    def peering_state(self) -> str:
        """What kopf's peering last did in the current run: "paused", "resumed", or "" (nothing
        logged: kopf starts paused and stays so while a higher priority replica lives)."""
        state = ""
        if self._log is not None and self._log.exists():
            for line in self._log.read_text(errors="replace").splitlines():
                if "Resuming operations after the pause" in line:
                    state = "resumed"
                elif "Pausing operations in favour of" in line or "Pausing all operators" in line:
                    state = "paused"
        return state

    def task_dump(self, wait_s: float = 2.0) -> str:
        """Ask the running operator where each of its coroutines waits (SIGUSR1, see
        :mod:`capstan.kube.diagnostics`) and return what it logged; "" when it did not answer."""
        from capstan.kube.diagnostics import DUMP_MARK, DUMP_SIGNAL

        with self._lock:
            proc, log_file = self._proc, self._log
        if proc is None or proc.poll() is not None or log_file is None:
            return ""
        proc.send_signal(DUMP_SIGNAL)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for line in reversed(log_file.read_text(errors="replace").splitlines()):
                if DUMP_MARK not in line:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    return str(record.get("message", line)) if isinstance(record, dict) else line
                return line
            time.sleep(0.1)
        return ""

    def logged(self, text: str) -> bool:
        """Whether the current run's log contains ``text``."""
        return self._log is not None and self._log.exists() and text in self._log.read_text(errors="replace")

    def stop(self) -> None:
        """Stop supervising; SIGTERM the operator (SIGKILL after 15 s)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def last_line(self) -> str:
        """The last non-empty line of the current run's log."""
        lines = self.tail(1).splitlines()
        return lines[-1] if lines else ""

    def tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the current run's log."""
        if self._log is None or not self._log.exists():
            return ""
        lines = [line for line in self._log.read_text(errors="replace").splitlines() if line.strip()]
        return "\n".join(lines[-n:])


# -- the fault proxy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """Where and how the proxy reaches the API server."""

    server: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool
    authorization: str | None

    @classmethod
    def from_kubeconfig(cls, path: str) -> Upstream:
        """Server and credentials of the kubeconfig's current context (certificates, tokens,
        exec plugins: whatever the kubernetes client resolves)."""
        import kubernetes

        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=path, client_configuration=cfg)
        auth = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        return cls(cfg.host, cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file, bool(cfg.verify_ssl), auth)

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The TLS context of the upstream connections (False for plain HTTP)."""
        if not self.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def write_proxy_kubeconfig(path: Path, server: str, namespace: str) -> None:
    """A kubeconfig for ``server`` (the proxy: plain HTTP, no credentials of its own)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fault-proxy", "cluster": {"server": server}}],
        "users": [{"name": "via-proxy", "user": {}}],
        "contexts": [{"name": "fault-proxy",
                      "context": {"cluster": "fault-proxy", "user": "via-proxy", "namespace": namespace}}],
        "current-context": "fault-proxy",
    }))


#: Faults answered instead of the server (the request never reaches it).
CONFLICT, THROTTLE = "409-conflict", "429-retry-after"
ERROR_500, UNAVAILABLE_503 = "500-error", "503-unavailable"
DROP_BEFORE = "drop-before-forward"  # the connection closes, the request never reaches the server
DROP_AFTER = "drop-after-forward"  # the server applied the request, the answer is lost
TRUNCATE = "truncated-body"  # the answer stops half-way through its Content-Length
SLOW = "slow"  # the request waits 0.3-1.5 s before it is forwarded
WATCH_END = "watch-ended-early"  # the watch stream ends cleanly after a few events
WATCH_CUT = "watch-cut"  # the watch stream's connection drops after a few events
WATCH_GONE = "watch-410-expired"  # after a few events: an ERROR event 410 (resourceVersion too old)
KOPF_FATAL = "kopf-list-cut-on-purpose"  # armed by the test: kopf stops, the operator exits 1
_EXPIRED = json.dumps({"type": "ERROR", "object": {
    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired",
    "message": "too old resource version (injected by the fault proxy)", "code": 410}}).encode() + b"\n"
WRITES = frozenset({"POST", "PUT", "PATCH"})
#: What a request may get: truncation only when it is no watch; 409 only when Capstan's own client
#: writes. kopf's writes never meet a 409 from a real API server (its merge patches carry no
#: resourceVersion, so the server retries conflicts itself; its finalizer JSON patches test the
#: resourceVersion, and a failed test is a 422, which kopf handles). A fake 409 there is a fault no
#: server makes, and kopf drops the failed patch until the object changes again: a deleted
#: TrainingJob would keep its finalizer until the operator restarts.
REQUEST_FAULTS = [CONFLICT, THROTTLE, ERROR_500, UNAVAILABLE_503, DROP_BEFORE, DROP_AFTER, TRUNCATE, SLOW]
_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length",
                  "accept-encoding", "authorization", "upgrade", "te", "trailer", "proxy-authorization"})


def _status(code: int, reason: str, message: str) -> bytes:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code}).encode()


@dataclass
class FaultProxy:
    """A fault-injecting reverse proxy to ``upstream`` (see the module docstring).

    Each request gets a fault with probability ``rate``, its type dealt from the client's shuffled
    deck of :data:`REQUEST_FAULTS` (the first card that applies, see there), so every type comes up
    about as often, for kopf as for Capstan's client; each watch stream is broken after 0-5 events
    with probability ``watch_rate``. Each client draws from its own ``random.Random``, seeded with
    ``seed`` and its name, so one client's faults do not depend on how the other's requests
    interleave with its own.

    Besides: :meth:`arm_kopf_fatal` cuts the answer to kopf's next list short (kopf cannot go on:
    the operator exits 1) and :meth:`expire_watches` ends every watch stream open now with a 410.
    """

    upstream: Upstream
    rate: float
    seed: int
    watch_rate: float = 0.5
    requests: int = 0
    watches: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    by_client: Counter[str] = field(default_factory=Counter)
    by_client_type: Counter[str] = field(default_factory=Counter)
    url: str = ""
    _rngs: dict[str, random.Random] = field(default_factory=dict, init=False)
    _decks: dict[str, list[str]] = field(default_factory=dict, init=False)
    _expirers: set[asyncio.Event] = field(default_factory=set, init=False)
    _kopf_fatal: int = field(default=0, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _stop: asyncio.Event | None = field(default=None, init=False)
    enabled: bool = True

    def start(self) -> None:
        """Serve on a free port of 127.0.0.1 from a thread of its own (``self.url`` is set)."""
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), daemon=True,
                                        name="fault-proxy")
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fault proxy did not start")

    def stop(self) -> None:
        """Stop serving and close every connection."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def arm_kopf_fatal(self) -> None:
        """Answer kopf's next list with whole-length but cut JSON: kopf retries neither that nor
        anything in its place, it stops, and ``capstan operator`` exits 1."""
        self._kopf_fatal += 1

    def expire_watches(self) -> None:
        """End every watch stream open now with a 410 ERROR event: the client lists again."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: [e.set() for e in list(self._expirers)])

    def summary(self) -> dict[str, Any]:
        """Requests seen and faults injected, by type and by client."""
        return {"requests": self.requests, "watches": self.watches, "rate": self.rate,
                "watch_rate": self.watch_rate, "seed": self.seed,
                "faults": dict(sorted(self.faults.items())), "faults_total": sum(self.faults.values()),
                "faults_by_client": dict(sorted(self.by_client.items())),
                "faults_by_client_and_type": dict(sorted(self.by_client_type.items()))}

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._session = ClientSession(connector=TCPConnector(limit=0, ssl=self.upstream.ssl_context()),
                                      timeout=ClientTimeout(total=None, sock_connect=10),
                                      auto_decompress=False)
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def _draw(self, method: str, watch: bool, agent: str) -> tuple[str | None, float]:
        """The fault for one request (None: none) and its parameter: for a watch fault the events
        before the break, for a slow answer the delay in seconds."""
        self.requests += 1
        if not self.enabled:
            return None, 0
        if agent == "kopf" and self._kopf_fatal and method == "GET" and not watch:
            self._kopf_fatal -= 1
            return KOPF_FATAL, 0
        rng = self._rngs.setdefault(agent, random.Random(f"{self.seed}/{agent}"))
        if watch:
            self.watches += 1
            if rng.random() < self.watch_rate:
                return rng.choice([WATCH_END, WATCH_CUT, WATCH_GONE]), rng.randint(0, 5)
        capstan_write = method in WRITES and agent == "capstan"
        if capstan_write and self._decks.get(agent) == [CONFLICT]:
            # Only a write of Capstan's can get the conflict, and the faulted requests may all have
            # been others (reads, relists): once every other type has been dealt, the next write
            # gets it whatever the draw, so a short run still sees every type.
            self._decks[agent] = []
            return CONFLICT, 0
        if rng.random() >= self.rate:
            return None, 0
        # Types come from a shuffled deck per client, so a short run still sees every one of them,
        # on kopf's requests (fewer) as on Capstan's.
        deck = self._decks.get(agent) or rng.sample(REQUEST_FAULTS, len(REQUEST_FAULTS))
        self._decks[agent] = deck
        for i, kind in enumerate(deck):
            if (kind != CONFLICT or capstan_write) and (kind != TRUNCATE or not watch):
                del deck[i]
                return kind, rng.uniform(0.3, 1.5) if kind == SLOW else 0
        return rng.choice([THROTTLE, ERROR_500, UNAVAILABLE_503, DROP_BEFORE, DROP_AFTER]), 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("true", "1")
        agent = request.headers.get("User-Agent", "").split("/")[0] or "unknown"
        fault, param = self._draw(request.method, watch, agent)
        if fault is not None:
            self.faults[fault] += 1
            self.by_client[agent] += 1
            self.by_client_type[f"{agent} {fault}"] += 1
        answer = _canned(fault)
        if answer is not None:
            return answer
        if fault == DROP_BEFORE:
            return _drop(request)
        if fault == SLOW:
            await asyncio.sleep(param)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["Accept-Encoding"] = "identity"  # bodies pass through as they are: no gzip to relay
        if self.upstream.authorization:
            headers["Authorization"] = self.upstream.authorization
        body = await request.read() if request.can_read_body else None
        async with self._session.request(request.method, self.upstream.server + request.path_qs,
                                         headers=headers, data=body) as up:
            out_headers = {k: v for k, v in up.headers.items()
                           if k.lower() in ("content-type", "retry-after", "warning", "audit-id")}
            if watch and up.status < 300:
                expire = asyncio.Event()
                self._expirers.add(expire)
                try:
                    return await _stream(request, up.status, out_headers, up, fault, int(param), expire)
                finally:
                    self._expirers.discard(expire)
            payload = await up.read()
        if fault == DROP_AFTER:
            return _drop(request)
        if fault == TRUNCATE:
            return await _truncate(request, up.status, out_headers, payload)
        if fault == KOPF_FATAL:  # valid HTTP, half the JSON
            return web.Response(status=up.status, body=payload[: len(payload) // 2], headers=out_headers)
        return web.Response(status=up.status, body=payload, headers=out_headers)


def _canned(fault: str | None) -> web.Response | None:
    """The answer a fault gives instead of the server's, if it is one of those."""
    if fault == CONFLICT:
        body = _status(409, "Conflict", "Operation cannot be fulfilled: the object has been modified "
                                        "(injected by the fault proxy)")
        return web.Response(status=409, body=body, content_type="application/json")
    if fault == THROTTLE:
        return web.Response(status=429, body=_status(429, "TooManyRequests", "injected throttling"),
                            content_type="application/json", headers={"Retry-After": "1"})
    if fault == ERROR_500:
        return web.Response(status=500, body=_status(500, "InternalError", "injected internal error"),
                            content_type="application/json")
    if fault == UNAVAILABLE_503:
        return web.Response(status=503, body=_status(503, "ServiceUnavailable", "injected unavailability"),
                            content_type="application/json")
    return None


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the client's connection without an answer."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)  # never sent: the connection is gone


async def _truncate(request: web.Request, status: int, headers: Mapping[str, str],
                    payload: bytes) -> web.StreamResponse:
    """Announce the whole body, send half of it, drop the connection."""
    resp = web.StreamResponse(status=status, headers=dict(headers))
    resp.content_length = len(payload)
    await resp.prepare(request)
    await resp.write(payload[: len(payload) // 2])
    if request.transport is not None:
        request.transport.close()
    return resp


async def _stream(request: web.Request, status: int, headers: Mapping[str, str], up: Any,
                  fault: str | None, after: int, expire: asyncio.Event) -> web.StreamResponse:
    """Relay a watch stream event by event. A watch fault ends it after ``after`` events: cleanly,
    with a 410 ERROR event, or by dropping the connection; ``expire`` ends it with a 410 at once."""
    resp = web.StreamResponse(status=status, headers=dict(headers))
    await resp.prepare(request)
    events = 0
    expired = asyncio.ensure_future(expire.wait())
    try:
        while not (fault in (WATCH_END, WATCH_CUT, WATCH_GONE) and events >= after):
            line = asyncio.ensure_future(up.content.readline())
            await asyncio.wait({line, expired}, return_when=asyncio.FIRST_COMPLETED)
            if expired.done():
                line.cancel()
                fault = WATCH_GONE
                break
            if not line.result():
                break  # the server ended the stream
            await resp.write(line.result())
            events += 1
    finally:
        expired.cancel()
    if fault == WATCH_GONE:
        await resp.write(_EXPIRED)
    if fault == WATCH_CUT and request.transport is not None:
        request.transport.close()  # mid-stream: the chunked body never ends
        return resp
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


# -- the workload and its invariants -------------------------------------------------------------


@dataclass
class JobSpec:
    """One TrainingJob of the burst and what the tests expect of it."""

    name: str
    workers: int
    gpus: int
    checkpoint_class: str | None = None  # a checkpoint PVC of this StorageClass (bound to a static PV)
    expect: str = "Running"  # Running | Succeeded | Queued | gone
    restarts: int = 0
    attempt: int = 0

    def manifest(self, namespace: str) -> dict[str, Any]:
        """The TrainingJob object."""
        spec: dict[str, Any] = {
            "image": "registry.invalid/capstan-faults/trainer:1",
            "command": ["python", "-m", "capstan_workloads.train"],
            "workers": self.workers,
            "gpusPerWorker": self.gpus,
            "failurePolicy": {"maxRestarts": 3, "backoffSeconds": 0},
        }
        if self.checkpoint_class:
            spec["checkpoint"] = {"volume": {"size": "1Gi", "storageClassName": self.checkpoint_class}}
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob",
                "metadata": {"name": self.name, "namespace": namespace}, "spec": spec}


def burst(checkpoint_class: str) -> list[JobSpec]:
    """Four GPU gangs (2-4 workers, 4-8 GPUs each: 52 of the dev cluster's 136 GPUs) and a CPU job."""
    return [
        JobSpec("gang-a", workers=2, gpus=8),
        JobSpec("gang-b", workers=3, gpus=4),
        JobSpec("gang-c", workers=4, gpus=4, checkpoint_class=checkpoint_class),
        JobSpec("gang-d", workers=2, gpus=4),
        JobSpec("cpu-e", workers=2, gpus=0),
    ]


@dataclass
class Snapshot:
    """What one namespace holds: TrainingJobs, pods, Services, PVCs (wire-form dicts)."""

    jobs: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    services: list[dict[str, Any]]
    pvcs: list[dict[str, Any]]


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _owner_uids(obj: Mapping[str, Any]) -> list[str]:
    refs = _meta(obj).get("ownerReferences") or []
    return [r.get("uid", "") for r in refs if r.get("kind") == "TrainingJob"]


def violations(snap: Snapshot, specs: list[JobSpec]) -> list[str]:
    """Every way the namespace differs from what a converged operator leaves (empty: converged).

    Global: no TrainingJob lost or unexpected; no pod, Service or PVC of Capstan's without a live
    owner TrainingJob; at most one Service and one PVC per job. Per job, by ``spec.expect``:
    ``Running``/``Succeeded`` — exactly one pod per rank, all of the status's attempt and in that
    phase; status phase, worker counts, restarts, attempt, observedGeneration and conditions agree;
    a GPU gang's placement names each rank's node; its Service (more than one worker) and PVC exist.
    ``gone`` — the job and everything it owned are deleted.
    """
    out: list[str] = []
    live = {_meta(j)["name"]: j for j in snap.jobs}
    live_uids = {_meta(j).get("uid") for j in snap.jobs if not _meta(j).get("deletionTimestamp")}
    wanted = {s.name: s for s in specs if s.expect != "gone"}
    for name in sorted(set(wanted) - set(live)):
        out.append(f"TrainingJob {name} lost")
    for name in sorted(set(live) - set(wanted)):
        out.append(f"TrainingJob {name} still exists (expected gone)")
    for kind, objs in (("Pod", snap.pods), ("Service", snap.services), ("PVC", snap.pvcs)):
        per_owner: Counter[str] = Counter()
        for obj in objs:
            managed = LABEL_JOB_UID in (_meta(obj).get("labels") or {})
            owners = _owner_uids(obj)
            if (managed or owners) and not (set(owners) & live_uids):
                out.append(f"{kind} {_meta(obj)['name']} has no live owner TrainingJob (owners {owners})")
            for uid in set(owners):
                if kind != "Pod":
                    per_owner[uid] += 1
        for uid, n in per_owner.items():
            if n > 1:
                out.append(f"{n} {kind}s owned by TrainingJob uid {uid}")
    for name, spec in sorted(wanted.items()):
        job = live.get(name)
        if job is not None:
            out.extend(_job_violations(job, spec, snap))
    return out


def _job_violations(job: dict[str, Any], spec: JobSpec, snap: Snapshot) -> list[str]:
    out: list[str] = []
    meta, st = _meta(job), job.get("status") or {}
    name, uid = meta["name"], meta.get("uid")
    phase = spec.expect

    def bad(what: str) -> None:
        out.append(f"{name}: {what}")

    if meta.get("deletionTimestamp"):
        bad("being deleted")
    if st.get("phase") != phase:
        bad(f"phase {st.get('phase')!r}, expected {phase!r} ({st.get('message')!r})")
    if st.get("observedGeneration") != meta.get("generation"):
        bad(f"observedGeneration {st.get('observedGeneration')} != generation {meta.get('generation')}")
    if st.get("restarts", 0) != spec.restarts:
        bad(f"restarts {st.get('restarts')}, expected {spec.restarts}")
    if st.get("attempt", 0) != spec.attempt:
        bad(f"attempt {st.get('attempt')}, expected {spec.attempt}")
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    if (conditions.get("Admitted") or {}).get("status") != "True":
        bad(f"Admitted condition {conditions.get('Admitted')}")
    if phase == "Queued":  # waiting for room: nothing placed, nothing running
        held = [_meta(p)["name"] for p in snap.pods
                if (_meta(p).get("labels") or {}).get(LABEL_JOB_UID) == uid]
        if held:
            bad(f"queued, yet has pods {held}")
        if st.get("placement"):
            bad(f"queued, yet placed on {st['placement']}")
        return out
    done = "Succeeded" if phase == "Succeeded" else "Running"
    if (conditions.get(done) or {}).get("status") != "True":
        bad(f"{done} condition {conditions.get(done)}")

    pods = [p for p in snap.pods if (_meta(p).get("labels") or {}).get(LABEL_JOB_UID) == uid]
    pods += [p for p in snap.pods if uid in _owner_uids(p) and p not in pods]
    ranks: Counter[str] = Counter((_meta(p).get("labels") or {}).get(LABEL_RANK, "?") for p in pods)
    for rank, n in sorted(ranks.items()):
        if n > 1:
            bad(f"{n} pods of rank {rank}")
    if set(ranks) != {str(r) for r in range(spec.workers)}:
        bad(f"pod ranks {sorted(ranks)}, expected 0..{spec.workers - 1}")
    nodes = ((st.get("placement") or {}).get("nodes")) or []
    for pod in pods:
        pm, labels = _meta(pod), _meta(pod).get("labels") or {}
        if pm.get("deletionTimestamp"):
            bad(f"pod {pm['name']} is terminating")
        if labels.get(LABEL_ATTEMPT) != str(st.get("attempt", 0)):
            bad(f"pod {pm['name']} of attempt {labels.get(LABEL_ATTEMPT)}, status: {st.get('attempt')}")
        pod_phase = (pod.get("status") or {}).get("phase")
        if pod_phase != phase:
            bad(f"pod {pm['name']} is {pod_phase}, job expected {phase}")
        node = (pod.get("spec") or {}).get("nodeName")
        rank = labels.get(LABEL_RANK, "")
        if spec.gpus and (not rank.isdigit() or int(rank) >= len(nodes) or nodes[int(rank)] != node):
            bad(f"pod {pm['name']} runs on {node}, placement says {nodes}")
    if spec.gpus and len(nodes) != spec.workers:
        bad(f"placement nodes {nodes} for {spec.workers} workers")
    if not spec.gpus and st.get("placement"):
        bad(f"a CPU job has a placement {st.get('placement')}")
    counts = st.get("workers") or {}
    key = "succeeded" if phase == "Succeeded" else "running"
    if counts.get(key) != spec.workers or counts.get("failed", 0) != 0:
        bad(f"status.workers {counts}, expected {key}={spec.workers}")
    services = [s for s in snap.services if uid in _owner_uids(s)]
    if len(services) != (wanted := 1 if spec.workers > 1 else 0):  # one worker meets on loopback
        bad(f"{len(services)} Services, expected {wanted}")
    if spec.checkpoint_class:
        pvcs = [c for c in snap.pvcs if uid in _owner_uids(c)]
        if len(pvcs) != 1:
            bad(f"{len(pvcs)} PVCs, expected 1")
    return out


class Cluster:
    """The test's own view of the cluster (admin identity of the test kubeconfig)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def snapshot(self, namespace: str) -> Snapshot:
        """Everything :func:`violations` looks at, read now (wire-form dicts)."""

        def raw(call: Callable[..., Any]) -> list[dict[str, Any]]:
            resp = call(namespace, _preload_content=False, _request_timeout=10)
            return list(json.loads(resp.data)["items"])

        jobs = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs",
                                                         _request_timeout=10)
        return Snapshot(
            jobs=list(jobs["items"]),
            pods=raw(self.core.list_namespaced_pod),
            services=raw(self.core.list_namespaced_service),
            pvcs=raw(self.core.list_namespaced_persistent_volume_claim),
        )

    def create_job(self, namespace: str, spec: JobSpec) -> None:
        """Create the TrainingJob of ``spec``."""
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs",
                                                    spec.manifest(namespace))

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a TrainingJob (background propagation)."""
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", name)

    def job_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Live pods of job ``name``."""
        return [p for p in self.snapshot(namespace).pods
                if (_meta(p).get("labels") or {}).get(LABEL_JOB) == name]

    def finish_pod(self, namespace: str, pod: Mapping[str, Any], exit_code: int) -> None:
        """Play the kubelet: the Running pod's worker exited with ``exit_code``."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        containers = (pod.get("spec") or {}).get("containers") or []
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0
                                         else "Error", "startedAt": now, "finishedAt": now}},
            } for c in containers],
        }
        self.core.patch_namespaced_pod_status(_meta(pod)["name"], namespace, {"status": status})

    def strip_finalizers(self, namespace: str) -> int:
        """Remove Capstan's finalizer from every TrainingJob left (the operator is gone)."""
        from kubernetes.client.exceptions import ApiException

        n = 0
        for job in self.snapshot(namespace).jobs:
            finalizers = _meta(job).get("finalizers") or []
            if FINALIZER in finalizers:
                keep = [f for f in finalizers if f != FINALIZER]
                with contextlib.suppress(ApiException):
                    self.custom.patch_namespaced_custom_object(
                        GROUP, VERSION, namespace, "trainingjobs", _meta(job)["name"],
                        {"metadata": {"finalizers": keep or None}})
                    n += 1
        return n


def wait_converged(cluster: Cluster, namespace: str, specs: list[JobSpec],
                   timeout: float) -> tuple[float, list[str]]:
    """Poll until :func:`violations` is empty; returns (seconds taken, last violations: empty when
    converged within ``timeout``)."""
    begin = time.monotonic()
    problems: list[str] = ["not checked yet"]
    while time.monotonic() - begin < timeout:
        try:
            problems = violations(cluster.snapshot(namespace), specs)
        except Exception as exc:  # the test's own read failed (busy server): poll again
            problems = [f"snapshot failed: {type(exc).__name__}: {exc}"]
        if not problems:
            return time.monotonic() - begin, []
        time.sleep(0.2)
    return time.monotonic() - begin, problems


@contextlib.contextmanager
def static_volume(api_client: Any, name: str, storage_class: str) -> Iterator[None]:
    """A 1 GiB ReadWriteMany hostPath PersistentVolume of ``storage_class`` (no provisioner needed:
    the PV controller binds the checkpoint PVC to it), deleted afterwards."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    core.create_persistent_volume({
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                 "storageClassName": storage_class, "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": f"/tmp/{name}"}},
    })
    try:
        yield
    finally:
        with contextlib.suppress(ApiException):
            core.delete_persistent_volume(name)
