"""LoRA adapters of a ModelServing: where each comes from, how pods get it, and which to load where.

Every adapter is a directory (PEFT format) the server reads at ``/adapters/...``:

- ``uri: pvc://claim/dir``: the claim is mounted read-only once at ``/adapters/pvc-<claim>`` (one
  volume per claim, however many adapters it holds); path ``/adapters/pvc-<claim>/<dir>``;
- ``fromTrainingJob``: a PVC restored from the job's snapshot (newest ready, or the named one),
  ``<ms>-lora-<hash8>``, mounted at ``/adapters/<hash8>``; path ``/adapters/<hash8>/<path>``;
- ``uri`` s3/gs/https/hf: downloaded by an init container into an emptyDir at ``/adapters/<hash8>``.

The *volumes* are part of a revision's pod template; which adapters a server holds is not, for
runtimes that load adapters at run time (capstan, vLLM: ``POST /v1/load_lora_adapter``): the
operator reads each ready server's ``/v1/models`` and loads or unloads the difference
(:func:`plan_adapter_actions`), so adding or removing an adapter restarts nothing when its volume is
already there (another adapter on a mounted claim, an adapter removed). A new volume (a new claim, a
new snapshot, a new download) changes the template and rolls out a new revision through the canary
steps; its servers get every adapter loaded as they become ready. SGLang takes adapters on its
command line (``--lora-paths``): any change rolls out a new revision.
"""

from __future__ import annotations

import copy
import math
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from capstan.api.common import parse_duration
from capstan.api.conditions import parse_time, rfc3339
from capstan.api.modelserving import ADAPTER_RUNTIMES, AdapterSpec, AdapterStatus, ModelServing
from capstan.fields import dig
from capstan.naming import dns_label, short_hash
from capstan.security import REFERENCE_UID, container_security_context
from capstan.serving.model_source import (
    DOWNLOAD_RESOURCES,
    SNAPSHOT_GROUP,
    ModelNotReady,
    _downloader,
    _pick_snapshot,
)

ADAPTER_ROOT = "/adapters"
#: vLLM's --max-lora-rank choices; the rendered limit is the smallest that holds every adapter.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: Without declared ranks: a limit that holds common adapters (vLLM's own default is 16).
DEFAULT_MAX_RANK = 64


@dataclass(frozen=True)
class AdapterRef:
    """A resolved adapter: what it is (``identity``), where servers read it, and its volume."""

    name: str
    identity: str
    path: str
    volume: str  # pod volume name that holds it (mounted at /adapters/<volume>)
    volume_source: str  # what that volume holds: pvc:<claim>, snapshot:<job>/<snap> or the URI
    rank: int | None = None
    claim: str | None = None  # an existing PVC (pvc://)
    snapshot: str | None = None  # a VolumeSnapshot restored into a PVC of our own
    claim_size: str | None = None
    storage_class: str | None = None
    uri: str | None = None  # downloaded by an init container


@dataclass
class ResolvedAdapters:
    """The adapters that can be served now, and why the others cannot (by name)."""

    refs: list[AdapterRef] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)


def mode(ms: ModelServing) -> Literal["runtime", "startup", ""]:
    """How ``ms``'s runtime takes adapters: at run time, on its command line, or not at all."""
    found = ADAPTER_RUNTIMES.get(ms.spec.runtime, "")
    return "runtime" if found == "runtime" else "startup" if found == "startup" else ""


def _resolve_one(
    ms: ModelServing, a: AdapterSpec, jobs: dict[str, dict[str, Any]], snapshots: dict[str, dict[str, Any]]
) -> AdapterRef:
    if a.uri is not None and a.uri.startswith("pvc://"):
        claim, _, sub = a.uri.removeprefix("pvc://").partition("/")
        volume = f"lora-{short_hash('pvc:' + claim)}"
        return AdapterRef(a.name, f"pvc:{claim}/{sub}", _under(volume, sub), volume, f"pvc:{claim}", a.rank,
                          claim=claim)
    if a.uri is not None:
        volume = f"lora-{short_hash(a.uri)}"
        return AdapterRef(a.name, a.uri, _under(volume, ""), volume, a.uri, a.rank, uri=a.uri)
    ftj = a.from_training_job
    assert ftj is not None  # AdapterSpec's rule: exactly one source
    job = jobs.get(ftj.name)
    if job is None:
        raise ModelNotReady(f"TrainingJob {ftj.name!r} not found")
    record = _pick_snapshot(dig(job, "status", "checkpoints") or [], ftj.checkpoint)
    if record is None:
        which = "a ready snapshot" if ftj.checkpoint == "Latest" else f"snapshot {ftj.checkpoint!r}"
        raise ModelNotReady(f"waiting for {which} of TrainingJob {ftj.name!r}")
    snap = str(record["name"])
    job_volume: dict[str, Any] = dig(job, "spec", "checkpoint", "volume") or {}
    size = dig(snapshots.get(snap) or {}, "status", "restoreSize") or job_volume.get("size")
    if not size:
        raise ModelNotReady(f"size of snapshot {snap!r} unknown (no restoreSize, no checkpoint.volume.size)")
    source = f"snapshot:{ftj.name}/{snap}"
    volume = f"lora-{short_hash(source)}"
    return AdapterRef(a.name, f"{source}/{ftj.path.strip('/')}", _under(volume, ftj.path), volume, source,
                      a.rank, snapshot=snap, claim_size=str(size),
                      storage_class=job_volume.get("storageClassName"))


def _under(volume: str, sub: str) -> str:
    """Where a path inside an adapter volume appears in the server container."""
    mount = f"{ADAPTER_ROOT}/{volume}"
    sub = sub.strip("/")
    return posixpath.normpath(posixpath.join(mount, sub)) if sub else mount


def resolve_adapters(
    ms: ModelServing, jobs: dict[str, dict[str, Any]], snapshots: dict[str, dict[str, Any]]
) -> ResolvedAdapters:
    """Resolve ``spec.adapters`` against the observed TrainingJobs (by name) and VolumeSnapshots."""
    out = ResolvedAdapters()
    for a in ms.spec.adapters:
        try:
            out.refs.append(_resolve_one(ms, a, jobs, snapshots))
        except ModelNotReady as exc:
            out.waiting[a.name] = str(exc)
    return out


def adapter_claim_name(ms: ModelServing, ref: AdapterRef) -> str:
    """The PVC restored from an adapter's snapshot (shared by every revision that mounts it)."""
    return dns_label(ms.metadata.name, suffix=f"-{ref.volume}")


def adapter_claims(ms: ModelServing, refs: list[AdapterRef], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """PVCs restored from adapters' TrainingJob snapshots (``meta``: labels and owner to give them)."""
    out = []
    for ref in refs:
        if ref.snapshot is None:
            continue
        spec: dict[str, Any] = {
            "accessModes": ["ReadWriteMany"],  # every replica, on any node, mounts it
            "resources": {"requests": {"storage": ref.claim_size}},
            "dataSource": {"apiGroup": SNAPSHOT_GROUP, "kind": "VolumeSnapshot", "name": ref.snapshot},
        }
        if ref.storage_class:
            spec["storageClassName"] = ref.storage_class
        out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {**copy.deepcopy(meta), "name": adapter_claim_name(ms, ref)}, "spec": spec})
    return out


def adapter_pod_parts(ms: ModelServing, refs: list[AdapterRef], env: list[dict[str, Any]]) -> dict[str, Any]:
    """Volumes, mounts and init containers (downloads) that put every adapter at its path.

    One volume per claim, snapshot or URI, in a stable order, so the same adapters always render
    the same pod template."""
    volumes: dict[str, dict[str, Any]] = {}
    mounts: dict[str, dict[str, Any]] = {}
    init: list[dict[str, Any]] = []
    for ref in sorted(refs, key=lambda r: r.volume):
        if ref.volume in volumes:
            continue
        mount_path = f"{ADAPTER_ROOT}/{ref.volume}"
        if ref.claim is not None:
            volumes[ref.volume] = {"name": ref.volume,
                                   "persistentVolumeClaim": {"claimName": ref.claim, "readOnly": True}}
        elif ref.snapshot is not None:
            volumes[ref.volume] = {"name": ref.volume, "persistentVolumeClaim": {
                "claimName": adapter_claim_name(ms, ref), "readOnly": True}}
        else:
            assert ref.uri is not None
            volumes[ref.volume] = {"name": ref.volume, "emptyDir": {}}
            image, command = _downloader(ref.uri)
            # The model download's scripts write to /model: the same scripts, pointed at this volume.
            user = [dict(e) for e in env if e["name"] != "MODEL_URI"]
            home = [] if any(e["name"] == "HOME" for e in user) else [{"name": "HOME", "value": "/tmp"}]
            init.append({
                "name": f"{ref.volume}-download"[:63],
                "image": image,
                "command": command,
                "env": [*user, {"name": "MODEL_URI", "value": ref.uri}, *home],
                "volumeMounts": [{"name": ref.volume, "mountPath": "/model"}],
                "resources": copy.deepcopy(DOWNLOAD_RESOURCES),
                "securityContext": container_security_context(run_as=REFERENCE_UID),
            })
        mounts[ref.volume] = {"name": ref.volume, "mountPath": mount_path, "readOnly": True}
    return {"volumes": list(volumes.values()), "mounts": list(mounts.values()), "init": init}


def max_rank(refs: list[AdapterRef]) -> int:
    """The rank limit to start a server with: :data:`DEFAULT_MAX_RANK`, or the smallest of vLLM's
    choices that holds a larger declared rank. The limit is a start-up flag, so it only grows past
    the default: adding or removing adapters of common ranks never restarts a server."""
    want = max([DEFAULT_MAX_RANK, *(r.rank for r in refs if r.rank is not None)])
    return next((r for r in VLLM_RANKS if r >= want), want)


def content(ms: ModelServing, refs: list[AdapterRef]) -> dict[str, Any]:
    """What of the adapters decides a revision's pods: their volumes (run-time runtimes: the rest is
    loaded through the API) or everything (runtimes that take adapters on their command line)."""
    if not ms.spec.adapters:
        return {}
    m = mode(ms)
    out: dict[str, Any] = {"adapterVolumes": sorted({(r.volume, r.volume_source) for r in refs}),
                           "maxLoraRank": max_rank(refs)}
    if m == "startup":
        out["adapters"] = sorted((r.name, r.path) for r in refs)
    return out


# ---- run-time loading: observed servers -> load/unload actions -----------------------------------


@dataclass(frozen=True)
class ObservedServer:
    """A server pod as the operator reads it: readiness, the volumes its template mounts and the
    adapters its ``/v1/models`` lists (name -> path; None when it could not be read)."""

    pod: str
    address: str  # host:port of its HTTP server
    ready: bool
    volumes: frozenset[str]
    loaded: dict[str, str] | None


@dataclass(frozen=True)
class AdapterAction:
    """Load ``name`` from ``path`` on ``pod``, or unload it (``path`` empty)."""

    pod: str
    address: str
    verb: Literal["load", "unload"]
    name: str
    path: str = ""


@dataclass(frozen=True)
class AdapterCanary:
    """An adapter's new version part-way through its rollout steps: ``weight`` percent of the ready
    servers hold ``canary``, the others ``stable``."""

    stable: str
    canary: str
    step: int
    weight: int
    started: datetime


def adapter_canaries(
    ms: ModelServing, refs: list[AdapterRef], now: datetime
) -> tuple[dict[str, AdapterCanary], float | None]:
    """The adapters whose new version is being rolled out (``spec.adapters[].rollout``), at the step
    ``now`` falls in, and the seconds until the next step begins (None: no canary).

    A canary starts when an adapter's path changes from the one ``status.adapters`` records as served
    to another path on the same volume; a finished last step promotes it (it is no canary any more)."""
    served = {a.name: a for a in ms.status.adapters}
    by_name = {r.name: r for r in refs}
    out: dict[str, AdapterCanary] = {}
    wait: float | None = None
    for a in ms.spec.adapters:
        ref, prev = by_name.get(a.name), served.get(a.name)
        if ref is None or a.rollout is None or prev is None or not prev.path or prev.path == ref.path:
            continue
        mount = f"{ADAPTER_ROOT}/{ref.volume}"
        if prev.path != mount and not prev.path.startswith(mount + "/"):
            continue  # the old version is on another volume: the revision rollout replaces it
        step, started = 0, now
        if prev.canary_path == ref.path and (since := parse_time(prev.canary_step_started_at)) is not None:
            step, started = prev.canary_step, since
        steps = a.rollout.steps
        while step < len(steps) and (now - started).total_seconds() >= parse_duration(steps[step].pause):
            started += timedelta(seconds=parse_duration(steps[step].pause))
            step += 1
        if step >= len(steps):
            continue  # promoted
        out[a.name] = AdapterCanary(prev.path, ref.path, step, steps[step].weight, started)
        left = parse_duration(steps[step].pause) - (now - started).total_seconds()
        wait = left if wait is None else min(wait, left)
    return out, wait


def plan_adapter_actions(
    refs: list[AdapterRef], servers: list[ObservedServer], canaries: dict[str, AdapterCanary] | None = None
) -> list[AdapterAction]:
    """What each ready server must load or unload to hold exactly the resolved adapters.

    An adapter whose volume a pod does not mount (its revision predates it) is left to the revision
    that does; one loaded from another path (a new snapshot) is unloaded and loaded again. Adapters
    not in the spec are unloaded. Servers whose adapters are unknown are skipped this pass. An
    adapter in ``canaries`` gets its new version on the first ``weight`` percent of the servers that
    can load it (by pod name, at least one), its old version on the others."""
    canaries = canaries or {}
    actions: list[AdapterAction] = []
    known = sorted((s for s in servers if s.ready and s.loaded is not None), key=lambda s: s.pod)
    canary_pods: dict[str, set[str]] = {}
    for r in refs:
        if r.name in canaries:
            able = [s.pod for s in known if r.volume in s.volumes]
            k = max(1, math.ceil(len(able) * canaries[r.name].weight / 100)) if able else 0
            canary_pods[r.name] = set(able[:k])
    for srv in known:
        assert srv.loaded is not None
        wanted = {r.name: r.path for r in refs if r.volume in srv.volumes}
        for name, c in canaries.items():
            if name in wanted:
                wanted[name] = c.canary if srv.pod in canary_pods.get(name, set()) else c.stable
        for name, path in sorted(srv.loaded.items()):
            if wanted.get(name) != path:
                actions.append(AdapterAction(srv.pod, srv.address, "unload", name))
        for name, path in sorted(wanted.items()):
            if srv.loaded.get(name) != path:
                actions.append(AdapterAction(srv.pod, srv.address, "load", name, path))
    return actions


def adapter_status(
    ms: ModelServing,
    resolved: ResolvedAdapters,
    servers: list[ObservedServer],
    failures: dict[str, str] | None = None,
    canaries: dict[str, AdapterCanary] | None = None,
) -> list[AdapterStatus]:
    """``status.adapters``: per adapter in the spec, how many ready servers hold it and, when not
    all do, why (waiting for its source, a failed load, a revision without its volume yet)."""
    failures = failures or {}
    by_name = {r.name: r for r in resolved.refs}
    ready = [s for s in servers if s.ready and s.loaded is not None]
    out = []
    for a in ms.spec.adapters:
        ref = by_name.get(a.name)
        if ref is None:
            out.append(AdapterStatus(name=a.name, message=resolved.waiting.get(a.name, "not resolved")))
            continue
        if mode(ms) == "startup":
            loaded = sum(1 for s in servers if s.ready and ref.volume in s.volumes)
        else:
            loaded = sum(1 for s in ready if (s.loaded or {}).get(a.name) == ref.path)
        c = (canaries or {}).get(a.name)
        if c is not None:
            held = [(s.loaded or {}).get(a.name) for s in ready]
            steps = len(a.rollout.steps) if a.rollout else 0
            out.append(AdapterStatus(
                name=a.name, source=ref.identity, path=c.stable, loaded=held.count(c.stable),
                canary_path=c.canary, canary_step=c.step, canary_step_started_at=rfc3339(c.started),
                canary_loaded=held.count(c.canary),
                message=failures.get(a.name, "") or f"canary step {c.step + 1}/{steps}: {c.weight}% of the "
                f"servers serve {c.canary}"))
            continue
        message = failures.get(a.name, "")
        if not message and loaded < len([s for s in servers if s.ready]):
            message = "loading on the servers that do not hold it yet (or mount it from a new revision)"
        out.append(AdapterStatus(name=a.name, source=ref.identity, path=ref.path, loaded=loaded,
                                 message=message))
    return out
