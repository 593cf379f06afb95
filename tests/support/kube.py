"""Test support: a Kubernetes API emulator with Capstan's CRDs, and the real operator in-process.

Needs the ``dev`` extra (``kmock``) and the repository's ``crds/``: it lives with the tests, not in
the shipped package. Used by ``tests/kube``, ``tests/e2e`` helpers and ``bench/reconcile.py``::

    async with emulated_cluster() as (emulator, url):
        async with running_operator(url):
            async with test_client(url) as api:
                await api.create(trainingjob_dict)
                await wait_for(lambda: ..., timeout=10)

The emulator is kmock's :class:`~kmock.KubernetesEmulator` with what a controller test needs
from an API server and kmock leaves out: ``uid``, ``resourceVersion``, ``generation`` (bumped on
spec changes), ``creationTimestamp``, status-subresource semantics, label selectors on lists, and
O(1) request routing (kmock re-scans its whole request log on every request, which makes a run of
thousands of requests quadratic).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import yaml
from kmock._internal import parsing as _kmock_parsing
from kmock._internal import rendering

from capstan.kube.client import ApiClient, matches_labels
from capstan.kube.resources import PODS

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
TEST_AGENT = "capstan-tests"
_T = TypeVar("_T")
_CURRENT: contextvars.ContextVar[rendering.Request | None] = contextvars.ContextVar(
    "kmock_current", default=None
)

#: Built-in resources the operator and kopf touch: (group/version/plural, kind, namespaced, subresources).
BUILTIN_RESOURCES: list[tuple[str, str, bool, set[str]]] = [
    ("v1/pods", "Pod", True, {"status", "log"}),
    ("v1/services", "Service", True, {"status"}),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", True, {"status"}),
    ("v1/configmaps", "ConfigMap", True, set()),
    ("v1/events", "Event", True, set()),
    ("v1/nodes", "Node", False, {"status"}),
    ("v1/namespaces", "Namespace", False, {"status"}),
    ("apps/v1/deployments", "Deployment", True, {"status", "scale"}),
    ("autoscaling/v2/horizontalpodautoscalers", "HorizontalPodAutoscaler", True, {"status"}),
    ("batch/v1/jobs", "Job", True, {"status"}),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True, {"status"}),
    ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy", True, set()),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False, {"status"}),
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, set()),
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, set()),
]
_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def _parse_path(path: str) -> Any:
    """kmock's URL parser, plus the core ``/api/v1/namespaces[/name[/sub]]`` URLs it misreads."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        sub = parts[4] if len(parts) > 4 else None
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, name, sub)
    return _kmock_parse_path(path)


_kmock_parse_path = _kmock_parsing.parse_path
_kmock_parsing.parse_path = _parse_path


Match = Callable[[rendering.Request], bool]


@attrs.define
class _Fault:
    match: Match
    times: int | None  # None: every matching request
    error: kmock.KubernetesError | None  # None: cut the answer short instead
    broken_json: bool = False  # cut: a whole-length answer whose JSON is cut, not a short body


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with API-server object bookkeeping (see the module docstring), and faults
    a test can inject: :meth:`refuse` and :meth:`cut`."""

    _rv: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    status_resources: set[Any] = attrs.field(factory=set, init=False)
    _faults: list[_Fault] = attrs.field(factory=list, init=False)

    def refuse(
        self, match: Match, status: int, reason: str, message: str, times: int | None = None
    ) -> None:
        """Answer requests that ``match`` with a Status error, without applying them (as an API
        server's validation or admission would), the first ``times`` of them (None: all)."""
        error = kmock.KubernetesError(status=status, reason=reason, message=message)
        self._faults.append(_Fault(match, times, error))

    def cut(self, match: Match, times: int | None = 1, broken_json: bool = False) -> None:
        """Apply requests that ``match`` but cut their answer short (the first ``times``): the
        headers promise the whole body, a third of it is sent, then the connection drops; or, with
        ``broken_json``, that third is sent as the whole answer (valid HTTP, truncated JSON)."""
        self._faults.append(_Fault(match, times, None, broken_json))

    def clear_faults(self) -> None:
        """Forget every fault injected with :meth:`refuse` or :meth:`cut`."""
        self._faults.clear()

    def _fault(self, request: rendering.Request) -> _Fault | None:
        for fault in self._faults:
            if (fault.times is None or fault.times > 0) and fault.match(request):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    def __iter__(self) -> Iterator[rendering.Request]:
        current = _CURRENT.get()
        if current is not None:  # routing one request: the filters only need to see that one
            yield current
            return
        yield from super().__iter__()

    async def _handle(self, request: rendering.Request) -> Any:
        fault = self._fault(request) if self._faults else None
        if fault is not None and fault.error is not None:
            return await self._render_error(fault.error)
        response = await self._emulate(request)
        if fault is not None:
            return await _cut_short(request, response, fault.broken_json)
        return response

    async def _emulate(self, request: rendering.Request) -> Any:
        token = _CURRENT.set(request)
        try:
            if request.resource is not None and isinstance(request.data, dict):
                self._bookkeep(request)
            elif request.resource is not None and isinstance(request.data, list):  # JSON patch
                request.data.append(
                    {"op": "add", "path": "/metadata/resourceVersion", "value": str(next(self._rv))}
                )
            try:
                return await super()._handle(request)
            except jsonpatch.JsonPatchException as exc:  # a failed "test" op: 422 like the API server
                return await self._render_error(
                    kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
                )
        finally:
            _CURRENT.reset(token)

    def _bookkeep(self, request: rendering.Request) -> None:
        data: dict[str, Any] = request.data
        meta = data.setdefault("metadata", {}) if request.action in (kmock.action.CREATE,) else None
        if request.action == kmock.action.CREATE and meta is not None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["resourceVersion"] = str(next(self._rv))
            meta.setdefault("generation", 1)
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            if request.resource in self.status_resources:
                data.pop("status", None)
        elif request.action == kmock.action.UPDATE and request.name:
            if request.subresource == "status":
                for key in list(data):
                    if key != "status":
                        del data[key]
            elif request.resource in self.status_resources:
                data.pop("status", None)
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._rv))
            if "spec" in data and not request.subresource:
                okey: Any = (request.resource, request.namespace, request.name)
                old = self._objects[okey] if okey in self._objects else None  # noqa: SIM401
                if old is not None and not old.deleted:
                    meta["generation"] = int((old.get("metadata") or {}).get("generation") or 1) + 1
            meta.pop("uid", None)  # immutable

    async def _serve_list(self, request: rendering.Request) -> Any:
        answer = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector and isinstance(answer, dict):
            wanted: dict[str, str | None] = {}
            for part in selector.split(","):
                key, sep, value = part.partition("=")
                wanted[key.strip()] = value.strip() if sep else None
            answer["items"] = [i for i in answer["items"] if matches_labels(i, wanted)]
        return answer


async def _cut_short(request: rendering.Request, response: Any, broken_json: bool) -> Any:
    """Send the status and headers of ``response`` and the first third of its body, then drop the
    connection; or (``broken_json``) send that third as a complete answer."""
    raw = request._raw_request
    body = bytes(getattr(response, "body", b"") or b"")
    if raw is None or not body:
        return response
    part = body[: max(1, len(body) // 3)]
    if broken_json:
        return aiohttp.web.Response(status=response.status, body=part, content_type="application/json")
    cut = aiohttp.web.StreamResponse(status=response.status, headers={"Content-Type": "application/json"})
    cut.content_length = len(body)
    await cut.prepare(raw)
    await cut.write(part)
    if raw.transport is not None:
        raw.transport.close()
    return cut


def declare_resource(
    emulator: Emulator,
    gvp: str,
    kind: str,
    namespaced: bool,
    subresources: set[str],
    shortnames: Iterable[str] = (),
    categories: Iterable[str] = (),
) -> None:
    """Make a resource discoverable (kopf and kubectl need the discovery documents)."""
    emulator.resources[gvp] = kmock.ResourceInfo(
        kind=kind,
        namespaced=namespaced,
        verbs=_VERBS,
        subresources=subresources,
        shortnames=set(shortnames),
        categories=set(categories),
        singular=kind.lower(),
    )


@functools.lru_cache(maxsize=32)
def _parsed_yaml(path: Path, mtime_ns: int) -> tuple[Any, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(yaml.load_all(path.read_text(), Loader=loader))


def parsed_yaml(path: Path) -> tuple[Any, ...]:
    """The documents of ``path``, parsed once per version of the file (libyaml where present): the
    CRDs are large, and each emulated cluster would otherwise parse them again (about a second per
    test in pure-Python YAML). Callers that keep or change a document copy it."""
    return _parsed_yaml(path, path.stat().st_mtime_ns)


def load_crds(emulator: Emulator, crd_dir: Path = CRD_DIR) -> list[dict[str, Any]]:
    """Declare every CRD of ``crd_dir`` and store the CRD objects themselves."""
    crds = []
    for path in sorted(crd_dir.glob("*.yaml")):
        for parsed in parsed_yaml(path):
            if not parsed or parsed.get("kind") != "CustomResourceDefinition":
                continue
            doc = copy.deepcopy(parsed)  # each emulator owns its objects
            spec, names = doc["spec"], doc["spec"]["names"]
            for ver in spec["versions"]:
                subs = set((ver.get("subresources") or {}).keys())
                gvp = f"{spec['group']}/{ver['name']}/{names['plural']}"
                declare_resource(
                    emulator,
                    gvp,
                    names["kind"],
                    spec.get("scope") == "Namespaced",
                    subs,
                    names.get("shortNames") or (),
                    names.get("categories") or (),
                )
                if "status" in subs:
                    emulator.status_resources.add(kmock.resource(gvp))
            emulator.objects[
                "apiextensions.k8s.io/v1/customresourcedefinitions", None, doc["metadata"]["name"]
            ] = doc
            crds.append(doc)
    return crds


@contextlib.asynccontextmanager
async def emulated_cluster(
    crd_dir: Path = CRD_DIR, port: int | None = None
) -> AsyncIterator[tuple[Emulator, str]]:
    """An emulated API server over real HTTP with built-in resources and Capstan's CRDs."""
    async with Emulator() as emulator, kmock.Server(emulator, port=port) as server:
        for gvp, kind, namespaced, subs in BUILTIN_RESOURCES:
            declare_resource(emulator, gvp, kind, namespaced, subs)
        for gvp in ("v1/pods", "v1/services", "v1/persistentvolumeclaims", "v1/nodes", "apps/v1/deployments"):
            emulator.status_resources.add(kmock.resource(gvp))
        load_crds(emulator, crd_dir)
        yield emulator, str(server.url)


def test_client(url: str, **kwargs: Any) -> ApiClient:
    """An API client for test code, marked with the ``capstan-tests`` user agent."""
    return ApiClient(url, headers={"User-Agent": TEST_AGENT}, **kwargs)


class OperatorThread:
    """The real operator (:func:`capstan.kube.operator.serve`) in its own thread and event loop.

    Like kopf's ``KopfRunner``: kopf treats every task created on its loop after startup as its own
    and waits for them when it stops, which would include an emulator's never-ending watch
    responses if they shared a loop. :meth:`start` and :meth:`stop` block, so a session-wide
    fixture (no event loop of its own) can hold one operator across many tests.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespaces: Iterable[str] = (),
        connection: kopf.ConnectionInfo | None = None,
        concurrency: int | None = None,
        timeout_s: float = 20.0,
        peering: str | None = None,
    ) -> None:
        self.connection = connection or kopf.ConnectionInfo(server=url or "", insecure=True)
        self.namespaces = list(namespaces)
        self.peering = peering  # None: standalone
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        """Whether the operator thread is alive."""
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> threading.Thread:
        """Start the operator and wait until kopf reports ready; raise what it failed with."""
        from capstan.kube.operator import serve

        self._stop = stop = threading.Event()
        ready = threading.Event()
        self.errors = errors = []

        def run() -> None:
            try:
                asyncio.run(
                    serve(
                        namespaces=self.namespaces,
                        clusterwide=not self.namespaces,
                        peering=self.peering,
                        standalone=self.peering is None,
                        metrics_port=None,
                        liveness_port=None,
                        connection=self.connection,
                        stop_flag=stop,
                        ready_flag=ready,
                        concurrency=self.concurrency,
                    )
                )
            except BaseException as exc:  # reported to the caller of start/stop
                errors.append(exc)
            finally:
                ready.set()

        self.thread = threading.Thread(target=run, name="capstan-operator", daemon=True)
        self.thread.start()
        ready.wait(self.timeout_s)
        if errors:
            raise errors[0]
        return self.thread

    def stop(self) -> None:
        """Stop the operator and wait for its thread; raise what it failed with."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(self.timeout_s)
        if self.errors:
            raise self.errors[0]


@contextlib.asynccontextmanager
async def running_operator(
    url: str | None = None,
    *,
    namespaces: Iterable[str] = (),
    connection: kopf.ConnectionInfo | None = None,
    concurrency: int | None = None,
    timeout_s: float = 20.0,
) -> AsyncIterator[threading.Thread]:
    """The real operator (:class:`OperatorThread`) while the context is open."""
    op = OperatorThread(
        url, namespaces=namespaces, connection=connection, concurrency=concurrency, timeout_s=timeout_s
    )
    thread = await asyncio.to_thread(op.start)
    try:
        yield thread
    finally:
        await asyncio.to_thread(op.stop)


async def wait_for(
    probe: Callable[[], Awaitable[_T]], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> _T:
    """Poll ``probe`` until it returns a truthy value; TimeoutError (with the last value) if not."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or probe}; last: {last!r}")
        await asyncio.sleep(interval)


async def wait_watching(
    emulator: Emulator, plurals: Iterable[str] = ("trainingjobs", "pods"), timeout: float = 10
) -> None:
    """Wait until the operator has opened its watch streams of ``plurals`` (for timing runs)."""
    wanted = set(plurals)

    async def probe() -> bool:
        seen = {
            r.resource.plural for r in emulator if r.action == kmock.action.WATCH and r.resource is not None
        }
        return wanted <= seen

    await wait_for(probe, timeout, 0.01, what=f"watches of {sorted(wanted)}")


async def set_pod_status(
    api: ApiClient,
    namespace: str,
    name: str,
    phase: str,
    exit_code: int | None = None,
    reason: str | None = None,
    container: str = "worker",
) -> dict[str, Any]:
    """Play the kubelet: set a pod's phase and (when terminated) its container's exit code."""
    status: dict[str, Any] = {"phase": phase}
    if reason:
        status["reason"] = reason
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}}
        status["containerStatuses"] = [{"name": container, "ready": False, "restartCount": 0, "state": state}]
    elif phase == "Running":
        status["containerStatuses"] = [
            {"name": container, "ready": True, "restartCount": 0, "state": {"running": {}}}
        ]
    return await api.patch_status(PODS, namespace, name, status)


def api_calls(
    emulator: Emulator, exclude_agents: Iterable[str] = (TEST_AGENT,)
) -> set[tuple[str, str, str, str]]:
    """(verb, group, resource, subresource) of every API request not made by ``exclude_agents``.

    Verbs are RBAC verbs (get, list, watch, create, patch, update, delete); discovery requests
    (no resource) are left out: they need no rule.
    """
    calls = set()
    skip = set(exclude_agents)
    for req in list(emulator):
        if req.resource is None or req.resource.plural is None:
            continue
        if req.headers.get("User-Agent", "") in skip:
            continue
        method = str(req.method.value if hasattr(req.method, "value") else req.method).upper()
        if req.action is not None:
            verb = {
                "LIST": "list",
                "WATCH": "watch",
                "FETCH": "get",
                "CREATE": "create",
                "UPDATE": "patch",
                "DELETE": "delete",
            }[req.action.value]
        else:
            verb = {"PUT": "update", "DELETE": "deletecollection"}.get(method, method.lower())
        if verb == "patch" and method == "PUT":
            verb = "update"
        calls.add((verb, req.resource.group or "", req.resource.plural, req.subresource or ""))
    return calls


async def _serve_forever(port: int | None) -> None:
    async with emulated_cluster(port=port) as (_, url):
        print(url, flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.support.kube [--port N]`` (from the repository root): run the emulator
    alone; prints its URL."""
    import argparse
    import contextlib as _contextlib

    parser = argparse.ArgumentParser(description="Kubernetes API emulator for tests and benchmarks")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    with _contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.port))


if __name__ == "__main__":
    main()


async def wait_object(
    api: Any, res: Any, namespace: str, name: str, check: Callable[[dict[str, Any]], Any], timeout: float,
    what: str,
) -> dict[str, Any]:
    """Poll object ``name`` until ``check`` holds for it; TimeoutError showing its last status if not."""
    seen: dict[str, Any] = {}

    async def probe() -> dict[str, Any] | None:
        obj = await api.get(res, namespace, name)
        seen["status"] = (obj or {}).get("status")
        return obj if obj is not None and check(obj) else None

    try:
        found = await wait_for(probe, timeout, what=what)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; its status: {seen.get('status')}") from None
    assert found is not None
    return found
