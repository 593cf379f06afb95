"""Watch-fed caches of what a placement pass decides over: Nodes, Pods that hold GPUs or belong to
a TrainingJob, and TrainingJobs; and of the Services and PVCs TrainingJobs own, which each
TrainingJob pass reads with its own job and pods.

Listing every Node, Pod and TrainingJob for each placement pass costs the API server work in
proportion to the cluster for every gang that asks, and the operator one big decode per pass. As
kube-scheduler and Kueue do, the operator instead lists each kind once, keeps it current with a
watch resumed from the last ``resourceVersion`` it saw (bookmarks included), and lists again only
when the server says that version is too old (410 Gone). A pass then reads memory.

Two things keep the caches safe to decide over:

* **Assume.** Every object the operator writes (a created pod, a TrainingJob's new status) goes
  into the cache from the write's answer (:attr:`ApiClient.write_observers`), so the next pass sees
  the GPUs a gang was just given before the watch event arrives, and an event older than what is
  stored (a lower ``resourceVersion``) does not undo it.
* **Slim copies.** A pod is kept only when it holds GPUs or carries a TrainingJob's labels, and of
  other pods only the fields placement reads (labels, node, affinity, GPU requests, phase): memory
  grows with the GPU pods, not with every pod in the cluster. A TrainingJob's own pods are kept whole
  (less managed fields): its reconcile reads their container states and conditions.
* **Wake-ups.** Each change a watch delivers wakes the reconcile loop of the TrainingJob it
  concerns (:attr:`ClusterCache.on_change`): a pass reading memory must not end on a view older than
  the event that woke it, or it would sleep until its resync with the newer state unseen.

A cache that is not synced (still listing, or refused by RBAC: an operator scoped to namespaces
cannot watch cluster-wide) makes the caller fall back to listing, as before
(``$CAPSTAN_PLACEMENT_CACHE=off`` keeps that list-based path on purpose, as a baseline). The same
holds for a TrainingJob pass: with the caches synced it reads its job, pods, Service and PVC from
memory, otherwise (and for an object memory lacks) from the API server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from capstan.fields import dig
from capstan.kube.client import ApiClient, ApiError, matches_labels
from capstan.kube.resources import NODES, PODS, PVCS, SERVICES, TRAININGJOBS, ApiResource, api_resource_of
from capstan.labels import LABEL_JOB_UID
from capstan.topology.inventory import pod_gpu_request

log = logging.getLogger(__name__)

Slim = Callable[[Mapping[str, Any]], dict[str, Any] | None]
WATCH_TIMEOUT_S = 300  # the server closes each watch after about this long; the reflector resumes
_BACKOFF_S = (0.5, 30.0)  # first and largest wait after a failed list or watch
TOMBSTONES_KEPT = 10_000  # deletions remembered (a late write answer must not resurrect them)
_FORBIDDEN_RETRY_S = 300.0  # RBAC refused: try again now and then (a role may be granted later)


class _Expired(Exception):
    """The server no longer has the resourceVersion a watch resumed from (410 Gone)."""


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` (``name`` for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def _int_or_none(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _version(obj: Mapping[str, Any]) -> int | None:
    """The object's resourceVersion as a number (etcd's revision), or None when it is not one."""
    return _int_or_none(dig(obj, "metadata", "resourceVersion"))


def slim_pod(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """A TrainingJob's pod whole (less managed fields); of another pod that holds GPUs, the fields
    placement reads; else None."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if LABEL_JOB_UID in labels:
        return without_managed_fields(pod)  # its job's reconcile reads all of it
    if not pod_gpu_request(pod):
        return None
    spec = pod.get("spec") or {}

    def containers(key: str) -> list[dict[str, Any]]:
        return [{k: c[k] for k in ("name", "resources", "restartPolicy") if k in c}
                for c in spec.get(key) or []]

    slim_spec: dict[str, Any] = {"containers": containers("containers")}
    if spec.get("initContainers"):
        slim_spec["initContainers"] = containers("initContainers")
    if spec.get("nodeName"):
        slim_spec["nodeName"] = spec["nodeName"]
    node_affinity = dig(spec, "affinity", "nodeAffinity")
    if node_affinity:
        slim_spec["affinity"] = {"nodeAffinity": node_affinity}
    slim_meta = {k: meta[k] for k in ("name", "namespace", "uid", "labels", "resourceVersion",
                                     "deletionTimestamp") if k in meta}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": slim_meta, "spec": slim_spec,
            "status": {"phase": dig(pod, "status", "phase")}}


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """The fields placement reads of a Node: labels, taints, cordon, allocatable, conditions (not
    its image list or managed fields, which are most of a real Node's bytes)."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {k: meta[k] for k in ("name", "uid", "labels", "resourceVersion") if k in meta},
        "spec": {k: spec[k] for k in ("unschedulable", "taints") if k in spec},
        "status": {
            "allocatable": status.get("allocatable") or {},
            "conditions": [{k: c.get(k) for k in ("type", "status")} for c in status.get("conditions") or []],
        },
    }


def _same_but_version(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two stored forms of an object differ at most in ``metadata.resourceVersion``."""
    old_meta, new_meta = old.get("metadata"), new.get("metadata")
    if not isinstance(old_meta, dict) or not isinstance(new_meta, dict) or "resourceVersion" not in new_meta:
        return False
    if old.keys() != new.keys() or any(old[k] != new[k] for k in old if k != "metadata"):
        return False
    return {k: v for k, v in old_meta.items() if k != "resourceVersion"} == {
        k: v for k, v in new_meta.items() if k != "resourceVersion"}


def without_managed_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object less ``metadata.managedFields`` (server-side apply's bookkeeping)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}


@dataclass
class Reflector:
    """One kind's objects, listed once and kept current by a watch (see the module docstring)."""

    api: ApiClient
    resource: ApiResource
    slim: Slim = without_managed_fields
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # key -> newest resourceVersion stored
    resource_version: str = ""  # where the watch resumes; "" means list first
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    forbidden: bool = False  # RBAC refused the list or the watch
    lists: int = 0  # full lists done (the first, and one per expiry)
    events: int = 0  # watch events applied
    on_event: Callable[[str, Mapping[str, Any]], None] | None = None  # (type, object), after storing
    labels: Mapping[str, str | None] | None = None  # list and watch only objects carrying these
    index_label: str | None = None  # keep keys by this label's value (:meth:`by_label`)
    _index: dict[str, set[str]] = field(default_factory=dict)
    _arrivals: dict[str, asyncio.Event] = field(default_factory=dict)  # keys someone waits for
    # key -> resourceVersion of its deletion, the newest TOMBSTONES_KEPT deletions
    _tombstones: OrderedDict[str, int] = field(default_factory=OrderedDict)

    @property
    def usable(self) -> bool:
        """Listed, and watched since (reads may come from memory)."""
        return self.synced.is_set() and not self.forbidden

    def items(self) -> list[dict[str, Any]]:
        """A snapshot of the stored objects."""
        return list(self.objects.values())

    def by_label(self, value: str) -> list[dict[str, Any]]:
        """The stored objects whose :attr:`index_label` is ``value``."""
        return [self.objects[k] for k in sorted(self._index.get(value, ())) if k in self.objects]

    async def arrival(self, key: str, timeout_s: float) -> dict[str, Any] | None:
        """The stored object ``key``, waiting up to ``timeout_s`` for it to be stored (its watch
        event may come a moment after another watch told the caller it exists); None if it did not."""
        found = self.objects.get(key)
        if found is not None:
            return found
        event = self._arrivals.setdefault(key, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            self._arrivals.pop(key, None)
        return self.objects.get(key)

    def _indexed(self, key: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        if self.index_label is None:
            return
        before = dig(old, "metadata", "labels", self.index_label) if old else None
        after = dig(new, "metadata", "labels", self.index_label) if new else None
        if before == after:
            return
        if before is not None:
            keys = self._index.get(before)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._index[before]
        if after is not None:
            self._index.setdefault(after, set()).add(key)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored object ``key`` (``namespace/name``), or None."""
        return self.objects.get(key)

    def assume(self, obj: Mapping[str, Any]) -> None:
        """Keep an object a write of the operator's returned, when it is newer than where the watch
        stands. An answer at or below that point is already reflected (the watch delivered that
        version, a newer one or the deletion, or a relist read past it): storing it could bring back
        an object a relist found gone, and no event would ever remove it again."""
        version, at = _version(obj), _int_or_none(self.resource_version)
        if version is not None and at is not None and version <= at:
            return
        self.store(obj)

    def store(self, obj: Mapping[str, Any]) -> None:
        """Keep ``obj`` unless a newer version of it is already stored (an assumed write, say), or
        it was deleted at or after this version (a write's answer that comes after the watch's
        deletion event must not bring the object back)."""
        key = object_key(obj)
        version = _version(obj)
        known = self.versions.get(key)
        if version is not None and known is not None and version < known:
            return
        dead = self._tombstones.get(key)
        if dead is not None:
            if version is not None and version <= dead:
                return
            del self._tombstones[key]  # a newer object of that name
        # a label-selected kind: an object that lost the labels leaves (as the server's watch says)
        kept = self.slim(obj) if self.labels is None or matches_labels(obj, self.labels) else None
        old = self.objects.get(key)
        if kept is None:
            self.objects.pop(key, None)
        elif old is not None and _same_but_version(old, kept):
            # only the resourceVersion moved (a Node's heartbeat, a field the slim form drops):
            # the stored object stays the same object, so what was derived from it stays valid
            old["metadata"]["resourceVersion"] = kept["metadata"]["resourceVersion"]
            kept = old
        else:
            self.objects[key] = kept
            if key in self._arrivals:
                self._arrivals[key].set()
        self._indexed(key, old, kept)
        if version is not None:
            self.versions[key] = version

    def forget(self, obj: Mapping[str, Any]) -> None:
        """Drop ``obj`` (it was deleted)."""
        key = object_key(obj)
        version, known = _version(obj), self.versions.get(key)
        if version is not None and known is not None and version < known:
            return  # an old deletion: a newer object of that name was stored since
        self._indexed(key, self.objects.pop(key, None), None)
        self.versions.pop(key, None)
        if version is not None:
            self._tombstones[key] = version
            self._tombstones.move_to_end(key)
            while len(self._tombstones) > TOMBSTONES_KEPT:
                self._tombstones.popitem(last=False)

    def apply(self, event: Mapping[str, Any]) -> None:
        """One watch event: store, forget, or move the resume point (BOOKMARK); 410 raises _Expired."""
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired(obj.get("message") or "resourceVersion too old")
            raise ApiError(int(obj.get("code") or 0), str(obj.get("reason") or "WatchError"),
                           str(obj.get("message") or ""), "WATCH", self.resource.path())
        version = dig(obj, "metadata", "resourceVersion")
        if kind == "BOOKMARK":
            self.resource_version = str(version or self.resource_version)
            return
        if kind == "DELETED":
            self.forget(obj)
        elif kind in ("ADDED", "MODIFIED"):
            self.store(obj)
        else:
            return
        self.events += 1
        if version:
            self.resource_version = str(version)
        if self.on_event is not None:
            self.on_event(str(kind), obj)

    async def relist(self) -> None:
        """List every object (in pages), replace what is stored, and resume watching from there."""
        objects: dict[str, dict[str, Any]] = {}
        versions: dict[str, int] = {}
        continue_: str | None = None
        while True:
            page = await self.api.list_page(self.resource, continue_=continue_, labels=self.labels)
            for item in page.get("items") or []:
                item.setdefault("apiVersion", self.resource.api_version)  # list items carry neither
                item.setdefault("kind", self.resource.kind)
                kept = self.slim(item) if self.labels is None or matches_labels(item, self.labels) else None
                if kept is not None:
                    key = object_key(item)
                    objects[key] = kept
                    if (version := _version(item)) is not None:
                        versions[key] = version
            continue_ = dig(page, "metadata", "continue") or None
            if not continue_:
                break
        before, self.objects, self.versions = self.objects, objects, versions
        self._index = {}
        for key, obj in objects.items():
            self._indexed(key, None, obj)
        self.resource_version = str(dig(page, "metadata", "resourceVersion") or "")
        self.lists += 1
        self.forbidden = False  # allowed to list (again); a refused watch says so once more
        self.synced.set()
        for key in objects.keys() & self._arrivals.keys():
            self._arrivals[key].set()
        self._replaced(before)

    def _replaced(self, before: Mapping[str, dict[str, Any]]) -> None:
        """After a relist, tell :attr:`on_event` what changed while no watch ran (as an informer's
        Replace does): the events themselves are lost, and whoever waits on them (a job whose pods
        went while the API server was down) would otherwise sleep until its resync."""
        if self.on_event is None or self.lists == 1:
            return  # the first list: nobody read this kind from memory before
        for key, obj in self.objects.items():
            old = before.get(key)
            if old is None:
                self.on_event("ADDED", obj)
            elif dig(old, "metadata", "resourceVersion") != dig(obj, "metadata", "resourceVersion"):
                self.on_event("MODIFIED", obj)
        for key in before.keys() - self.objects.keys():
            self.on_event("DELETED", before[key])

    async def run(self) -> None:
        """List, then watch for ever, resuming after each closed stream; stops when cancelled."""
        failures = 0
        while True:
            try:
                if not self.resource_version:
                    await self.relist()
                opened, before = time.monotonic(), self.events
                async for event in self.api.watch(self.resource, self.resource_version,
                                                  timeout_s=WATCH_TIMEOUT_S, labels=self.labels):
                    self.apply(event)
                self.forbidden = False
                if self.events == before and time.monotonic() - opened < 1.0:
                    # a stream closed at once with nothing in it: do not spin on the server
                    failures += 1
                    await asyncio.sleep(_backoff(failures))
                else:
                    failures = 0
            except _Expired:
                self.resource_version = ""  # list again; what is stored stays readable meanwhile
            except ApiError as exc:
                if exc.status == 410:
                    self.resource_version = ""
                    continue
                failures += 1
                if exc.status == 403:
                    self.forbidden = True
                    self.synced.clear()  # the caller lists instead (and says why)
                    self.resource_version = ""  # once allowed, list afresh: events were missed
                    log.warning("cannot watch %s cluster-wide (%s): placement lists instead",
                                self.resource.plural, exc.reason)
                    await asyncio.sleep(_FORBIDDEN_RETRY_S)
                    continue
                await asyncio.sleep(_backoff(failures))
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if self.api.closed:
                    return
                failures += 1
                log.debug("watch of %s broke (%s); resuming", self.resource.plural, type(exc).__name__)
                await asyncio.sleep(_backoff(failures))
            except Exception:
                if self.api.closed:  # the operator is stopping ("Session is closed")
                    return
                failures += 1
                log.exception("watch of %s failed; listing again", self.resource.plural)
                self.resource_version = ""
                await asyncio.sleep(_backoff(failures))


def _backoff(failures: int) -> float:
    low, high = _BACKOFF_S
    return float(min(high, low * 2 ** min(failures, 10)) * random.uniform(0.5, 1.0))


def _owning_job(kind: str, obj: Mapping[str, Any]) -> str | None:
    """The uid of the TrainingJob an object is or belongs to (by its job-uid label)."""
    if kind == "TrainingJob":
        return dig(obj, "metadata", "uid")
    return dig(obj, "metadata", "labels", LABEL_JOB_UID)


@dataclass
class ClusterCache:
    """The reflectors placement and the TrainingJob passes read, and the tasks that feed them."""

    nodes: Reflector
    pods: Reflector
    jobs: Reflector
    services: Reflector | None = None  # TrainingJobs' headless Services (job-uid label)
    pvcs: Reflector | None = None  # TrainingJobs' checkpoint PVCs (job-uid label)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: called with a TrainingJob's uid when a watch event changes it or one of its children
    on_change: Callable[[str], None] | None = None

    @classmethod
    def for_client(cls, api: ApiClient) -> ClusterCache:
        """Reflectors over ``api``, fed by its own writes too (not yet started)."""
        owned = {LABEL_JOB_UID: None}
        cache = cls(
            Reflector(api, NODES, slim_node),
            Reflector(api, PODS, slim_pod, index_label=LABEL_JOB_UID),
            Reflector(api, TRAININGJOBS),
            Reflector(api, SERVICES, labels=owned),
            Reflector(api, PVCS, labels=owned),
        )
        for reflector in cache.reflectors[1:]:
            reflector.on_event = cache._changed
        api.write_observers.append(cache.assume)
        return cache

    @property
    def reflectors(self) -> tuple[Reflector, ...]:
        """Nodes, pods, TrainingJobs, then the TrainingJobs' Services and PVCs where kept."""
        children = tuple(r for r in (self.services, self.pvcs) if r is not None)
        return self.nodes, self.pods, self.jobs, *children

    @property
    def ready(self) -> bool:
        """Nodes, pods and TrainingJobs listed and watched (a placement pass may read memory)."""
        return all(r.usable for r in (self.nodes, self.pods, self.jobs))

    def _changed(self, _type: str, obj: Mapping[str, Any]) -> None:
        uid = _owning_job(str(obj.get("kind") or ""), obj)
        if uid and self.on_change is not None:
            self.on_change(uid)

    async def job(self, namespace: str, name: str, wait_s: float = 0.0) -> dict[str, Any] | None:
        """TrainingJob ``namespace/name`` from memory, waiting up to ``wait_s`` for its watch event
        (None: not there, or the cache is not usable)."""
        if not self.jobs.usable:
            return None
        return await self.jobs.arrival(f"{namespace}/{name}", wait_s)

    def pods_of(self, uid: str) -> list[dict[str, Any]] | None:
        """The pods carrying job-uid label ``uid``, from memory; None when the pod cache is not usable."""
        if not self.pods.usable or not uid:
            return None
        return self.pods.by_label(uid)

    def children(self, resource: ApiResource) -> Reflector | None:
        """The usable reflector of TrainingJobs' children of ``resource`` (Services, PVCs), or None."""
        for reflector in (self.services, self.pvcs):
            if reflector is not None and reflector.resource == resource and reflector.usable:
                return reflector
        return None

    def start(self) -> None:
        """Start listing and watching (idempotent)."""
        if not self.tasks:
            self.tasks = [asyncio.create_task(r.run(), name=f"capstan-cache-{r.resource.plural}")
                          for r in self.reflectors]

    async def stop(self) -> None:
        """Cancel the watches and wait for them to end."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    async def wait_synced(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every kind's first list; whether they all made it."""
        try:
            await asyncio.wait_for(asyncio.gather(*(r.synced.wait() for r in self.reflectors)), timeout_s)
        except TimeoutError:
            return False
        return self.ready

    def assume(self, obj: Mapping[str, Any]) -> None:
        """Store an object the operator just wrote, when it is of a kind the cache holds."""
        try:
            resource = api_resource_of(obj)
        except ValueError:
            return
        for reflector in self.reflectors:
            if reflector.resource != resource or not reflector.synced.is_set():
                continue
            reflector.assume(obj)

    def node_known(self, name: str) -> bool | None:
        """Whether Node ``name`` is in the synced cache (None: the cache cannot say)."""
        if not self.nodes.synced.is_set() or self.nodes.forbidden:
            return None
        return name in self.nodes.objects


__all__ = ["ClusterCache", "Reflector", "object_key", "slim_node", "slim_pod", "without_managed_fields"]
