"""A small asyncio client over the Kubernetes REST API, shared by every Capstan handler.

Why this and not another client: kopf already talks to the API server with aiohttp, and the
operator never needs more than a dozen verbs on plain JSON. A thin aiohttp client keeps every
call on the operator's event loop (no thread pool, no GIL-bound urllib3 pool), so a 128-pod gang
is created with a bounded number of requests in flight (``concurrency``, default 32) over one
keep-alive connection pool. Credentials come from kopf's own login (``kopf.login_via_client``:
in-cluster service account or kubeconfig, exec plugins included), so kopf and Capstan act as one
identity and one RBAC role. ``kubernetes_asyncio`` would add a large generated dependency for the
same few calls; the sync ``kubernetes`` client would need a thread per request in flight.

Conventions: objects are plain dicts in wire (camelCase) form; "absent" answers are values, not
exceptions (``get`` → None, ``delete`` → False, ``create_if_absent`` → created False); every other
non-2xx answer raises :class:`ApiError`. Selectors are the server's job (the test emulator filters
``labelSelector`` itself, as the API server does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from capstan import __version__
from capstan.fields import dig
from capstan.kube.resources import EVENTS, PODS, ApiResource, api_resource_of
from capstan.naming import short_hash

if TYPE_CHECKING:
    import kopf

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 32
USER_AGENT = f"capstan/{__version__}"
FIELD_MANAGER = "capstan"
EVENT_COMPONENT = "capstan-operator"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_T = TypeVar("_T")


class ApiError(Exception):
    """A non-success answer of the API server (``status`` is the HTTP code)."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        """404: the object (or resource) does not exist."""
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """409: already exists, or a resourceVersion conflict."""
        return self.status == 409


def now_rfc3339() -> str:
    """Current time as a Kubernetes ``metav1.Time`` string."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_string(labels: Mapping[str, str | None]) -> str:
    """``{"a": "1", "b": None}`` → ``"a=1,b"`` (None means "the label exists")."""
    return ",".join(k if v is None else f"{k}={v}" for k, v in sorted(labels.items()))


def matches_labels(obj: Mapping[str, Any], labels: Mapping[str, str | None]) -> bool:
    """Whether ``obj`` carries every label of ``labels`` (None: any value)."""
    have = dig(obj, "metadata", "labels") or {}
    return all(k in have and (v is None or have[k] == v) for k, v in labels.items())


def owner_of(obj: Mapping[str, Any], kind: str) -> tuple[str, str] | None:
    """(name, uid) of the controller ownerReference of ``kind``, if any."""
    for ref in dig(obj, "metadata", "ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return str(ref.get("name", "")), str(ref.get("uid", ""))
    return None


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not str(info.server).startswith("https"):
        return False
    if info.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        cadata = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        ctx = ssl.create_default_context(
            cafile=os.fsdecode(info.ca_path) if info.ca_path else None, cadata=cadata
        )
    if info.certificate_path or info.certificate_data:
        import tempfile

        def _file(path: Any, data: str | bytes | None) -> str:
            if path:
                return os.fsdecode(path)
            with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".pem") as fh:
                fh.write(data.encode() if isinstance(data, str) else (data or b""))
                return fh.name

        cert = _file(info.certificate_path, info.certificate_data)
        key = (
            _file(info.private_key_path, info.private_key_data)
            if (info.private_key_path or info.private_key_data)
            else None
        )
        ctx.load_cert_chain(cert, key)
    return ctx


class ApiClient:
    """Async Kubernetes API client bound to one event loop (create it inside the loop)."""

    def __init__(
        self,
        server: str,
        *,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | bool = False,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout_s: float = 30.0,
        retries: int = 3,
        refresh: Callable[[], Awaitable[Mapping[str, str]]] | None = None,
        field_manager: str = FIELD_MANAGER,
    ) -> None:
        self.server = server.rstrip("/")
        # A User-Agent of its own: API server audit logs (and test emulators) tell Capstan's calls
        # from kopf's, which share the same credentials.
        self.headers = {"User-Agent": USER_AGENT, **dict(headers or {})}
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.field_manager = field_manager
        self._refresh = refresh
        self._sem = asyncio.Semaphore(self.concurrency)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency, ssl=ssl_context),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            json_serialize=_dumps,
        )
        self.instance = socket.gethostname()
        #: Called with every object a write of this client returns (the watch-fed caches' "assume"
        #: step: a pass sees what the operator just wrote before its watch event arrives).
        self.write_observers: list[Callable[[Mapping[str, Any]], None]] = []

    @classmethod
    def from_connection(
        cls,
        info: kopf.ConnectionInfo,
        *,
        refresh: Callable[[], Awaitable[kopf.ConnectionInfo]] | None = None,
        **kwargs: Any,
    ) -> ApiClient:
        """A client using kopf's connection info (server, CA, token or client certificate)."""

        async def _headers() -> Mapping[str, str]:
            assert refresh is not None
            return (await refresh()).as_http_headers()

        return cls(
            str(info.server),
            headers=info.as_http_headers(),
            ssl_context=_ssl_context(info),
            refresh=_headers if refresh else None,
            **kwargs,
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self._session.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the operator is shutting down)."""
        return self._session.closed

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- raw ------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; JSON answer, or :class:`ApiError`.

        Retried with backoff (``retries`` times): 429 and 5xx answers, lost connections, timeouts,
        and answers cut short — a body shorter than its Content-Length, or a 2xx body that is not
        whole JSON. Every verb is retried, creates included: a create that did land the first time
        answers 409 on the retry, which :meth:`create_if_absent` takes as "exists". Exhausted
        retries raise :class:`ApiError` with status 0 and the transport error's name as reason.
        """
        attempt = 0
        refreshed = False
        data = _dumps(body) if body is not None else None
        while True:
            attempt += 1
            try:
                async with self._sem:
                    headers = {**self.headers, "Accept": "application/json"}
                    if data is not None:
                        headers["Content-Type"] = content_type
                    async with self._session.request(
                        method, self.server + path, params=params, data=data, headers=headers
                    ) as resp:
                        status = resp.status
                        retry_after = resp.headers.get("Retry-After")
                        text = await resp.text()
                answer = (_loads(text) if text else {}) if status < 300 else None
            except (
                TimeoutError,
                aiohttp.ClientConnectionError,
                aiohttp.ClientPayloadError,  # the body ended before its Content-Length
                json.JSONDecodeError,  # a 2xx body cut short where the transport did not notice
                UnicodeDecodeError,  # ... or cut inside a UTF-8 sequence
            ) as exc:
                if attempt > self.retries:
                    raise ApiError(0, type(exc).__name__, str(exc), method, path) from exc
                log.debug("%s %s: %s; retrying (attempt %d)", method, path, type(exc).__name__, attempt)
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if status < 300:
                return answer
            if status == 401 and self._refresh is not None and not refreshed:
                refreshed = True
                self.headers.update(await self._refresh())
                continue
            if status in _RETRY_STATUSES and attempt <= self.retries:
                delay = float(retry_after) if retry_after and retry_after.isdigit() else 0.2 * 2**attempt
                await asyncio.sleep(min(delay, 10.0))
                continue
            try:
                payload = _loads(text) if text.startswith("{") else {}
            except json.JSONDecodeError:
                payload = {}
            raise ApiError(
                status,
                str(payload.get("reason") or status),
                str(payload.get("message") or text[:200]),
                method,
                path,
            )

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, res: ApiResource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            obj: dict[str, Any] = await self.request("GET", res.path(namespace, name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise
        return obj

    async def exists(self, res: ApiResource, namespace: str | None, name: str) -> bool:
        """Whether the object exists (and is not being deleted)."""
        obj = await self.get(res, namespace, name)
        return obj is not None and not dig(obj, "metadata", "deletionTimestamp")

    async def list_objects(
        self,
        res: ApiResource,
        namespace: str | None = None,
        labels: Mapping[str, str | None] | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """Objects of ``res`` in ``namespace`` (all namespaces when None) matching ``labels``."""
        params: dict[str, str] = {}
        if labels:
            params["labelSelector"] = selector_string(labels)
        if field_selector:
            params["fieldSelector"] = field_selector
        answer = await self.request("GET", res.path(namespace), params=params)
        items: list[dict[str, Any]] = list(answer.get("items") or [])
        for item in items:  # list items carry no apiVersion/kind on a real server
            item.setdefault("apiVersion", res.api_version)
            item.setdefault("kind", res.kind)
        return items

    async def list_pods(
        self, namespace: str | None, labels: Mapping[str, str | None]
    ) -> list[dict[str, Any]]:
        """Pods matching a label selector."""
        return await self.list_objects(PODS, namespace, labels)

    async def list_page(
        self,
        res: ApiResource,
        *,
        limit: int = 500,
        continue_: str | None = None,
        labels: Mapping[str, str | None] | None = None,
    ) -> dict[str, Any]:
        """One page of a cluster-wide list (``items``, ``metadata.resourceVersion``/``continue``) of
        the objects matching ``labels``."""
        params = {"limit": str(limit)}
        if continue_:
            params["continue"] = continue_
        if labels:
            params["labelSelector"] = selector_string(labels)
        page: dict[str, Any] = await self.request("GET", res.path(), params=params)
        return page

    async def watch(
        self,
        res: ApiResource,
        resource_version: str,
        *,
        timeout_s: int = 300,
        labels: Mapping[str, str | None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events of ``res`` cluster-wide (of the objects matching ``labels``) from
        ``resource_version``: ``{"type", "object"}``.

        The stream ends when the server closes it (after about ``timeout_s``); a broken stream
        raises the transport's error and an answer other than 200 raises :class:`ApiError`. The
        caller resumes from the last resourceVersion it saw (bookmarks included).
        """
        params = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_s)}
        if labels:
            params["labelSelector"] = selector_string(labels)
        for attempt in (1, 2):
            headers = {**self.headers, "Accept": "application/json"}
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s + 30)
            async with self._session.get(self.server + res.path(), params=params, headers=headers,
                                         timeout=timeout) as resp:
                if resp.status == 401 and self._refresh is not None and attempt == 1:
                    self.headers.update(await self._refresh())
                    continue
                if resp.status != 200:
                    text = await resp.text()
                    try:
                        payload = _loads(text) if text.startswith("{") else {}
                    except json.JSONDecodeError:
                        payload = {}
                    raise ApiError(resp.status, str(payload.get("reason") or resp.status),
                                   str(payload.get("message") or text[:200]), "WATCH", res.path())
                # Split lines by hand: aiohttp's line reader refuses lines over 64 KiB, and one event
                # carries a whole object.
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield _loads(line.decode())
                if buffer.strip():
                    yield _loads(buffer.decode())
                return

    # -- writes ---------------------------------------------------------------------------------

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST the object; :class:`ApiError` (409 included) on failure."""
        res = api_resource_of(obj)
        ns = dig(obj, "metadata", "namespace")
        created: dict[str, Any] = await self.request(
            "POST", res.path(ns), body=obj, params={"fieldManager": self.field_manager}
        )
        self._written(created)
        return created

    async def create_if_absent(self, obj: Mapping[str, Any]) -> bool:
        """Create the object; an existing one with the same name is fine. True if created now."""
        try:
            await self.create(obj)
        except ApiError as exc:
            if exc.conflict:
                return False
            raise
        return True

    async def create_many(self, objs: Sequence[Mapping[str, Any]]) -> list[bool]:
        """:meth:`create_if_absent` for many objects at once, at most ``concurrency`` in flight.

        Every create is attempted even if some fail; the first error is raised afterwards.
        """
        return await gather_bounded([self.create_if_absent(o) for o in objs])

    async def patch(
        self,
        res: ApiResource,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        patch_type: str = MERGE_PATCH,
    ) -> dict[str, Any]:
        """PATCH an object (JSON merge patch by default; a repeated patch changes nothing)."""
        out: dict[str, Any] = await self.request(
            "PATCH",
            res.path(namespace, name, subresource),
            body=patch,
            content_type=patch_type,
            params={"fieldManager": self.field_manager},
        )
        self._written(out)
        return out

    async def patch_status(
        self, res: ApiResource, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch ``status`` through the status subresource (None values remove fields)."""
        return await self.patch(res, namespace, name, {"status": dict(status)}, subresource="status")

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply ``obj`` as Capstan's field manager (creates it when absent)."""
        res = api_resource_of(obj)
        meta = obj.get("metadata") or {}
        params = {"fieldManager": self.field_manager, "force": "true" if force else "false"}
        try:
            out: dict[str, Any] = await self.request(
                "PATCH",
                res.path(meta.get("namespace"), meta["name"]),
                body=obj,
                content_type=APPLY_PATCH,
                params=params,
            )
        except ApiError as exc:
            if not exc.not_found:  # a real server creates on apply; emulators may answer 404
                raise
            return await self.create(obj)
        self._written(out)
        return out

    def _written(self, obj: Mapping[str, Any]) -> None:
        for observe in self.write_observers:
            observe(obj)

    async def delete(
        self,
        res: ApiResource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        grace_period_s: int | None = None,
    ) -> bool:
        """Delete an object; False if it was already gone."""
        options: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": propagation,
        }
        if grace_period_s is not None:
            options["gracePeriodSeconds"] = grace_period_s
        try:
            answer = await self.request("DELETE", res.path(namespace, name), body=options)
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        if isinstance(answer, Mapping) and dig(answer, "metadata", "deletionTimestamp"):
            self._written(answer)  # still there, terminating: the caches see that at once
        return True

    async def delete_pod(self, namespace: str, name: str) -> bool:
        """Delete a pod (background propagation); False if it was already gone."""
        return await self.delete(PODS, namespace, name)

    async def delete_pods(self, namespace: str, names: Iterable[str]) -> list[bool]:
        """Delete many pods at once, at most ``concurrency`` in flight."""
        return await gather_bounded([self.delete_pod(namespace, n) for n in names])

    # -- events ---------------------------------------------------------------------------------

    async def post_event(
        self,
        involved: Mapping[str, Any],
        reason: str,
        message: str,
        type_: str = "Normal",
        *,
        component: str = EVENT_COMPONENT,
    ) -> None:
        """Record a core/v1 Event on ``involved`` (an object dict); never raises.

        The name is ``<object>.<hash of uid, type, reason, message>``: a repeated event bumps
        ``count`` and ``lastTimestamp`` of the existing one, like kubectl's aggregated view.
        """
        meta = involved.get("metadata") or {}
        name, namespace, uid = meta.get("name", ""), meta.get("namespace") or "default", meta.get("uid", "")
        message = message if len(message) <= 1024 else message[:1021] + "..."
        ev_name = f"{name}.{short_hash(f'{uid}/{type_}/{reason}/{message}', 16)}"
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": ev_name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", ""),
                "kind": involved.get("kind", ""),
                "name": name,
                "namespace": namespace,
                "uid": uid,
                **({"resourceVersion": meta["resourceVersion"]} if meta.get("resourceVersion") else {}),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            if not await self.create_if_absent(event):
                old = await self.get(EVENTS, namespace, ev_name)
                count = int(dig(old, "count") or 1) + 1
                await self.patch(EVENTS, namespace, ev_name, {"count": count, "lastTimestamp": now})
        except ApiError as exc:  # events are best effort: never fail a reconcile for them
            log.warning("could not post event %s on %s/%s: %s", reason, namespace, name, exc)


async def gather_bounded(coros: Sequence[Awaitable[_T]]) -> list[_T]:
    """Await all ``coros`` (the client's semaphore bounds what is in flight); raise the first error
    only after every one has finished, so a partial failure leaves no request dangling."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _loads(text: str) -> Any:
    return json.loads(text)
