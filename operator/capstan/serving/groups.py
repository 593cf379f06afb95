"""Multi-host replicas: one replica served by a group of pods, a leader and workers.

A replica whose GPUs (``tensorParallel`` x ``pipelineParallel``) are more than one pod holds
(``gpusPerPod``) is a group of ``pods_per_replica`` pods. The leader serves the API (Services,
probes, scrapes and the canary analysis see leaders only); workers join it. Every pod gets the
environment LeaderWorkerSet defines (``LWS_LEADER_ADDRESS``, ``LWS_GROUP_SIZE``,
``LWS_WORKER_INDEX``), so one pod template runs under either rendering:

- **LeaderWorkerSet** (``leaderworkerset.x-k8s.io/v1``) when the cluster serves it: one per revision,
  ``size`` pods per group, restarted as a unit (``RecreateGroupOnPodRestart``), its scale subresource
  driven by the rollout and by an HPA or KEDA. The pods of a group are kept in one topology domain by
  a required pod affinity on the domain label that matches the group's own key (``matchLabelKeys``).
- **Capstan-managed groups** otherwise: a ``ControllerRevision`` per revision holds the leader and
  worker templates and the number of groups (annotation ``capstan.dev/replicas``); the operator
  creates each group's pods, places them with the topology placer TrainingJobs use (every group in
  the narrowest domain that fits, BestFit, each pod pinned to its node), restarts a group as a unit
  when one of its pods fails, restarts or disappears, and deletes groups beyond the count. The pods
  are owned by the ControllerRevision, so deleting a revision collects them.

Runtimes: vLLM (0.10) runs across pods on Ray: the leader starts the Ray head and waits for the
group (vLLM's own ``multi-node-serving.sh`` in its image), then serves with the Ray executor; the
workers join the head. SGLang runs the same command on every pod with ``--nnodes``, ``--node-rank``
and ``--dist-init-addr``. A custom image reads the environment.
"""

from __future__ import annotations

import copy
import shlex
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from capstan.api.conditions import parse_time
from capstan.api.modelserving import ModelServing
from capstan.fields import dig
from capstan.labels import (
    ANNOTATION_REPLICAS,
    LABEL_COMPONENT,
    LABEL_GROUP,
    LABEL_GROUP_OF,
    LABEL_GROUP_RANK,
    LABEL_GROUP_REVISION,
    LABEL_REVISION,
    LABEL_SERVING,
    LWS_GROUP_KEY,
    PROMETHEUS_PATH_ANNOTATION,
    PROMETHEUS_PORT_ANNOTATION,
    PROMETHEUS_SCRAPE_ANNOTATION,
)
from capstan.naming import dns_label, label_value
from capstan.security import network_policy
from capstan.serving.revisions import LWS_API_VERSION, meta
from capstan.topology.gang import GangRequest, place_gang
from capstan.topology.inventory import Inventory
from capstan.topology.levels import DEFAULT_LEVELS, TopologyLevels

LWS_KIND = "LeaderWorkerSet"
GROUP_REVISION_KIND = "ControllerRevision"
#: vLLM's helper that forms the Ray cluster of a group (shipped in the vllm-openai images).
VLLM_RAY_SCRIPT = "/vllm-workspace/examples/online_serving/multi-node-serving.sh"
WORKER_COMPONENT = "server-worker"
CONTAINER = "server"
# A group revision not fully ready this long after its last progress is rolled back, as a
# Deployment's progressDeadlineSeconds would (kept equal to revisions.PROGRESS_DEADLINE_S).
PROGRESS_DEADLINE_S = 1200
_SCRAPE = (PROMETHEUS_SCRAPE_ANNOTATION, PROMETHEUS_PORT_ANNOTATION, PROMETHEUS_PATH_ANNOTATION)


def is_multi_host(ms: ModelServing) -> bool:
    """Whether a replica of ``ms`` is a group of pods rather than one pod."""
    return ms.spec.pods_per_replica > 1


def group_service_name(revision: str) -> str:
    """The headless Service that gives a Capstan-managed group's pods their DNS names."""
    return dns_label(revision, suffix="-g")


def _server(pod: Mapping[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c.get("name") == CONTAINER)


def _launch(ms: ModelServing, server: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(leader, worker) command and args of the server container for ``ms``'s runtime."""
    line = [*server.get("command", []), *server.get("args", [])]
    if ms.spec.runtime == "vllm":
        shell = ["/bin/bash", "-c"]
        leader = (
            f"bash {VLLM_RAY_SCRIPT} leader --ray_cluster_size=$(LWS_GROUP_SIZE) && exec {shlex.join(line)}"
        )
        worker = f"bash {VLLM_RAY_SCRIPT} worker --ray_address=$(LWS_LEADER_ADDRESS)"
        return {"command": shell, "args": [leader]}, {"command": shell, "args": [worker]}
    # SGLang and custom images: the same command on every pod; the rank comes from the environment.
    same = {k: list(server[k]) for k in ("command", "args") if server.get(k)}
    return same, dict(same)


def group_templates(
    ms: ModelServing, pod: Mapping[str, Any], revision: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The leader and worker pod templates of ``revision`` made from its server pod template.

    The leader keeps the server's labels (Services and scrapes select it), probes and port; a
    worker carries only the group labels, no probes and no port: it serves nothing itself."""
    leader, worker = copy.deepcopy(dict(pod)), copy.deepcopy(dict(pod))
    lead_cmd, work_cmd = _launch(ms, _server(pod))
    group_labels = {LABEL_GROUP_OF: label_value(ms.metadata.name), LABEL_GROUP_REVISION: revision}
    leader["metadata"]["labels"].update(group_labels)
    _server(leader).update(lead_cmd)
    labels = {
        k: v for k, v in worker["metadata"]["labels"].items() if k not in (LABEL_SERVING, LABEL_REVISION)
    }
    labels[LABEL_COMPONENT] = WORKER_COMPONENT
    worker["metadata"]["labels"] = {**labels, **group_labels}
    notes = {k: v for k, v in (worker["metadata"].get("annotations") or {}).items() if k not in _SCRAPE}
    worker["metadata"]["annotations"] = notes
    srv = _server(worker)
    for key in ("readinessProbe", "livenessProbe", "startupProbe", "ports", "command", "args"):
        srv.pop(key, None)
    srv.update(work_cmd)
    return leader, worker


def _domain_label(ms: ModelServing, levels: TopologyLevels) -> str:
    """The label whose value one group's pods must share (LeaderWorkerSet rendering)."""
    spec = ms.spec
    if spec.pod_gpus < spec.tensor_parallel or spec.placement.policy == "Preferred":
        return levels.levels[0].label  # a tensor-parallel group over NVLink, or the best domain
    return levels.levels[levels.index(spec.placement.max_domain)].label


def _co_locate(pod: dict[str, Any], ms: ModelServing, revision: str, levels: TopologyLevels) -> None:
    """Keep the pods of one LeaderWorkerSet group in one domain: pod affinity to the pods that share
    this pod's group key (required when the spec requires it, else preferred)."""
    term = {
        "labelSelector": {"matchLabels": {LABEL_GROUP_REVISION: revision}},
        "matchLabelKeys": [LWS_GROUP_KEY],
        "topologyKey": _domain_label(ms, levels),
    }
    spec = ms.spec
    required = spec.pod_gpus < spec.tensor_parallel or spec.placement.policy == "Required"
    affinity = pod["spec"].setdefault("affinity", {}).setdefault("podAffinity", {})
    if required:
        affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    else:
        affinity.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(
            {"weight": 100, "podAffinityTerm": term}
        )


def leader_worker_set(
    ms: ModelServing,
    pod: Mapping[str, Any],
    metadata: Mapping[str, Any],
    revision: str,
    replicas: int | None,
    levels: TopologyLevels = DEFAULT_LEVELS,
) -> dict[str, Any]:
    """The LeaderWorkerSet of ``revision`` (``replicas`` None: its autoscaler sizes it)."""
    leader, worker = group_templates(ms, pod, revision)
    for template in (leader, worker):
        _co_locate(template, ms, revision, levels)
    spec: dict[str, Any] = {
        "leaderWorkerTemplate": {
            "size": ms.spec.pods_per_replica,
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": leader,
            "workerTemplate": worker,
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": LWS_API_VERSION, "kind": LWS_KIND, "metadata": dict(metadata), "spec": spec}


def group_revision(
    ms: ModelServing,
    pod: Mapping[str, Any],
    metadata: Mapping[str, Any],
    revision: str,
    replicas: int,
) -> dict[str, Any]:
    """The ControllerRevision of a Capstan-managed group revision: the templates and placement of
    its groups (immutable, like the revision) and how many groups to run (an annotation)."""
    leader, worker = group_templates(ms, pod, revision)
    spec = ms.spec
    meta = copy.deepcopy(dict(metadata))
    meta.setdefault("annotations", {})[ANNOTATION_REPLICAS] = str(replicas)
    data = {
        "size": spec.pods_per_replica,
        "gpusPerPod": spec.pod_gpus,
        # Pods that share a tensor-parallel group need NVLink between them, whatever the policy.
        "policy": "Required" if spec.pod_gpus < spec.tensor_parallel else spec.placement.policy,
        "maxDomain": "nvlink" if spec.pod_gpus < spec.tensor_parallel else spec.placement.max_domain,
        "subdomain": group_service_name(revision),
        "leader": leader,
        "worker": worker,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": GROUP_REVISION_KIND,
        "metadata": meta,
        "data": data,
        "revision": 1,
    }


def group_service(ms_meta: Mapping[str, Any], revision: str) -> dict[str, Any]:
    """The headless Service of a Capstan-managed group revision: DNS names for its pods, the
    leader's before it is ready (the workers must reach it for the leader to become ready)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**copy.deepcopy(dict(ms_meta)), "name": group_service_name(revision)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_GROUP_REVISION: revision},
        },
    }


def group_policy_name(ms: ModelServing) -> str:
    """The NetworkPolicy that lets the pods of ``ms``'s groups reach one another."""
    return dns_label(ms.metadata.name, suffix="-groups")


def group_network_policy(ms: ModelServing) -> dict[str, Any]:
    """Beside the servers' NetworkPolicy (``spec.networkPolicy``): every pod of a group (workers
    too) accepts any port from pods of the same ModelServing's groups, which Ray, NCCL and
    torch.distributed need; policies add up, so the leaders still take clients only on the
    server port."""
    group = {LABEL_GROUP_OF: label_value(ms.metadata.name)}
    return network_policy(
        meta(ms, group_policy_name(ms), component="network-policy"),
        group,
        [{"from": [{"podSelector": {"matchLabels": group}}]}],
    )


# -- observed state -----------------------------------------------------------------------------


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in dig(pod, "status", "conditions") or []
    )


def _restarted(pod: Mapping[str, Any]) -> bool:
    statuses = [
        *(dig(pod, "status", "containerStatuses") or []),
        *(dig(pod, "status", "initContainerStatuses") or []),
    ]
    return any(int(s.get("restartCount") or 0) > 0 for s in statuses)


def _deleting(pod: Mapping[str, Any]) -> bool:
    return bool(dig(pod, "metadata", "deletionTimestamp"))


def _index(pod: Mapping[str, Any], label: str) -> int | None:
    raw = dig(pod, "metadata", "labels", label)
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Group:
    """The pods of one group, by rank, and what its pods say about it."""

    index: int
    pods: dict[int, dict[str, Any]]
    size: int

    @property
    def broken(self) -> str:
        """Why the group must be restarted as a unit ("" when it need not)."""
        for _, pod in sorted(self.pods.items()):
            name = dig(pod, "metadata", "name")
            if dig(pod, "status", "phase") in ("Failed", "Succeeded"):
                return f"pod {name} {str(dig(pod, 'status', 'phase')).lower()}"
            if _restarted(pod):
                return f"a container of pod {name} restarted"
            if _deleting(pod):
                return f"pod {name} is being deleted"
        missing = sorted(set(range(self.size)) - set(self.pods))
        if missing and self.pods:
            return f"pod{'s' if len(missing) > 1 else ''} of rank {', '.join(map(str, missing))} gone"
        return ""

    @property
    def ready(self) -> bool:
        """Every pod of the group is there and Ready."""
        return len(self.pods) == self.size and not self.broken and all(_ready(p) for p in self.pods.values())


def groups_of(revision: str, size: int, pods: Sequence[Mapping[str, Any]]) -> dict[int, Group]:
    """The groups of ``revision`` among ``pods``, by index."""
    found: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for pod in pods:
        if dig(pod, "metadata", "labels", LABEL_GROUP_REVISION) != revision:
            continue
        g, r = _index(pod, LABEL_GROUP), _index(pod, LABEL_GROUP_RANK)
        if g is not None and r is not None:
            found[g][r] = dict(pod)
    return {g: Group(g, members, size) for g, members in found.items()}


def group_replicas(cr: Mapping[str, Any]) -> int:
    """The number of groups a group revision should run."""
    try:
        return max(0, int(dig(cr, "metadata", "annotations", ANNOTATION_REPLICAS) or 0))
    except ValueError:
        return 0


@dataclass(frozen=True)
class GroupRevisionState:
    """A group revision reduced to what the rollout needs."""

    replicas: int
    ready: int
    deadline_exceeded: bool


def group_revision_state(
    cr: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], now: datetime
) -> GroupRevisionState:
    """Ready groups of a ControllerRevision (or LeaderWorkerSet, from its status) and whether it
    made no progress for :data:`PROGRESS_DEADLINE_S` while short of its groups."""
    created = parse_time(dig(cr, "metadata", "creationTimestamp"))
    if cr.get("kind") == LWS_KIND:
        want = int(dig(cr, "spec", "replicas") if dig(cr, "spec", "replicas") is not None else 1)
        ready = int(dig(cr, "status", "readyReplicas") or 0)
        last = created
    else:
        want = group_replicas(cr)
        revision = str(dig(cr, "metadata", "name"))
        groups = groups_of(revision, int(dig(cr, "data", "size") or 1), pods)
        ready = sum(1 for g, grp in groups.items() if g < want and grp.ready)
        # progress: the last time a pod of the revision became Ready
        times = [
            parse_time(c.get("lastTransitionTime"))
            for p in pods
            if dig(p, "metadata", "labels", LABEL_GROUP_REVISION) == revision
            for c in dig(p, "status", "conditions") or []
            if c.get("type") == "Ready" and c.get("status") == "True"
        ]
        last = max([t for t in (created, *times) if t is not None], default=None)
    exceeded = ready < want and last is not None and now - last > timedelta(seconds=PROGRESS_DEADLINE_S)
    return GroupRevisionState(want, ready, exceeded)


# -- Capstan-managed groups: the pods to create and delete --------------------------------------


@dataclass
class GroupActions:
    """What the operator does to a group revision's pods in one pass."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    restarted: list[tuple[int, str]] = field(default_factory=list)  # (group, why) restarted as a unit
    waiting: str = ""  # why groups wait for room ("" when none waits)
    revision: str = ""


def _pin(pod: dict[str, Any], node: str) -> None:
    """Require ``node`` in every node selector term (terms are ORed: the pin must be in each)."""
    rule = {"key": "metadata.name", "operator": "In", "values": [node]}
    required = (
        pod["spec"]
        .setdefault("affinity", {})
        .setdefault("nodeAffinity", {})
        .setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        term["matchFields"] = [*(term.get("matchFields") or []), rule]


def group_pod(cr: Mapping[str, Any], group: int, rank: int, node: str | None) -> dict[str, Any]:
    """Pod ``rank`` (0: the leader) of group ``group`` of the ControllerRevision ``cr``."""
    meta = cr["metadata"]
    revision, namespace = str(meta["name"]), str(meta.get("namespace") or "")
    data = cr["data"]
    template = copy.deepcopy(data["leader"] if rank == 0 else data["worker"])
    name = dns_label(revision, suffix=f"-{group}-{rank}")
    leader = dns_label(revision, suffix=f"-{group}-0")
    labels = {**template["metadata"].get("labels", {}), LABEL_GROUP: str(group), LABEL_GROUP_RANK: str(rank)}
    pod_meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": labels,
        "annotations": dict(template["metadata"].get("annotations") or {}),
    }
    if meta.get("uid"):
        pod_meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": GROUP_REVISION_KIND,
                "name": revision,
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    spec = template["spec"]
    spec["hostname"], spec["subdomain"] = name, data["subdomain"]
    spec["restartPolicy"] = "Always"
    env = [
        {"name": "LWS_LEADER_ADDRESS", "value": f"{leader}.{data['subdomain']}.{namespace}"},
        {"name": "LWS_GROUP_SIZE", "value": str(data["size"])},
        {"name": "LWS_WORKER_INDEX", "value": str(rank)},
    ]
    for container in spec.get("containers", []):
        if container.get("name") == CONTAINER:
            # first: the server's own variables and arguments may refer to these ($(LWS_...))
            container["env"] = env + [
                e for e in container.get("env") or [] if not e["name"].startswith("LWS_")
            ]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}
    if node is not None:
        _pin(pod, node)
    return pod


def _request(cr: Mapping[str, Any], group: int) -> GangRequest:
    data = cr["data"]
    spec = data["leader"]["spec"]
    return GangRequest(
        name=f"{dig(cr, 'metadata', 'name')}-{group}",
        workers=int(data["size"]),
        gpus_per_worker=int(data["gpusPerPod"]),
        policy=data.get("policy", "Preferred"),
        max_domain=data.get("maxDomain", "nvlink"),
        tolerations=tuple(spec.get("tolerations") or ()),
    )


def plan_groups(
    cr: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], inventory: Inventory | None
) -> GroupActions:
    """The pods to create and delete so the ControllerRevision ``cr`` runs its number of whole,
    healthy groups: a broken group is deleted whole (and made again in a later pass, once its pods
    are gone), groups beyond the count are deleted, missing groups are placed in ``inventory``
    (None: the nodes could not be read, so nothing is placed) and created pinned to their nodes."""
    revision = str(dig(cr, "metadata", "name"))
    out = GroupActions(revision=revision)
    size = int(dig(cr, "data", "size") or 1)
    want = group_replicas(cr)
    groups = groups_of(revision, size, pods)
    for g, grp in sorted(groups.items()):
        why = "scaled down" if g >= want else grp.broken
        if not why:
            continue
        out.delete += [
            str(dig(p, "metadata", "name")) for _, p in sorted(grp.pods.items()) if not _deleting(p)
        ]
        if g < want:
            out.restarted.append((g, why))
    missing = [g for g in range(want) if g not in groups]
    if not missing:
        return out
    if inventory is None:
        out.waiting = "the Nodes could not be read to place the groups"
        return out
    inv = inventory
    for g in missing:
        result = place_gang(inv, _request(cr, g))
        if not result.placed:
            out.waiting = f"group {g}: {result.reason}"
            break
        inv = inv.allocate(result)
        out.create += [group_pod(cr, g, rank, node) for rank, node in enumerate(result.nodes)]
    return out


def scale_annotation(replicas: int) -> dict[str, Any]:
    """The merge patch that sets a group revision's number of groups."""
    return {"metadata": {"annotations": {ANNOTATION_REPLICAS: str(replicas)}}}
