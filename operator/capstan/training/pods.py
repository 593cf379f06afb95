"""Desired Kubernetes objects of a TrainingJob: the headless Service and one Pod per worker."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from capstan import API_VERSION, podmerge
from capstan.api.trainingjob import FineTuneSpec, TrainingJob
from capstan.labels import (
    GPU_RESOURCE,
    HOSTFILE_ANNOTATION,
    KUEUE_POD_GROUP_COUNT,
    KUEUE_POD_GROUP_LABEL,
    KUEUE_PREFERRED_TOPOLOGY,
    KUEUE_QUEUE_LABEL,
    KUEUE_REQUIRED_TOPOLOGY,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_JOB,
    LABEL_JOB_UID,
    LABEL_RANK,
    LABEL_WORKERS,
    MULTUS_ANNOTATION,
    SPEC_DIGEST_ANNOTATION,
)
from capstan.naming import common_labels, dns_label, label_value, owner_reference
from capstan.security import (
    DEFAULT_OPERATOR_NAMESPACE,
    RDMA_CAPABILITY,
    REFERENCE_UID,
    container_security_context,
    is_reference_image,
    network_policy,
    operator_peer,
    peers,
    pod_security_context,
    service_account_fields,
)
from capstan.topology.levels import DEFAULT_LEVELS, TopologyLevels

METRICS_PORT = 9400
CONTAINER = "worker"
# Exit code of a worker that checkpointed and stopped on SIGTERM (EX_TEMPFAIL): restart the gang
# without counting a failure. capstan_workloads.exitcodes.EXIT_PREEMPTED holds the same number.
EXIT_PREEMPTED = 75
# Digits reserved for the rank suffix of a hostname ("-1234").
_RANK_SUFFIX = 5

NCCL_DEFAULTS = {
    # Abort hung collectives so a dead peer fails the pod (and the gang restarts) instead of hanging.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}

#: Spec fields read afresh at every reconcile (or only when a gang is created and also immutable):
#: a change to them never needs a new gang. Every other field shapes the pods.
LIVE_FIELDS = frozenset({
    "workers", "suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "failurePolicy", "priority",
    "preemptible",
})
LIVE_SUBFIELDS = {"topology": {"migration"}, "checkpoint": {"snapshots", "saveBeforeStopSeconds"}}
#: Where workers see their pod's annotations (downward API): rank 0 reads checkpoint requests there.
PODINFO_DIR = "/etc/capstan/podinfo"
#: Where a ``launcher: deepspeed`` worker finds the gang's DeepSpeed hostfile.
HOSTFILE_PATH = "/etc/capstan/hostfile"
#: The DeepSpeed launcher when spec.command is empty.
DEEPSPEED = "deepspeed"


def service_name(job: TrainingJob) -> str:
    """Name of the headless Service (a DNS-1035 label) that gives workers stable DNS names.

    Suffixed so a ModelServing of the same name (serving what this job trained) can own the plain
    name for its Service.
    """
    return dns_label(job.metadata.name, suffix="-workers")


def worker_base(job: TrainingJob) -> str:
    """Prefix of worker pod names and hostnames, short enough for a rank suffix."""
    return dns_label(job.metadata.name, max_len=63 - _RANK_SUFFIX)


def worker_name(job: TrainingJob, rank: int) -> str:
    """Pod name and hostname of worker ``rank``."""
    return f"{worker_base(job)}-{rank}"


def checkpoint_claim_name(job: TrainingJob) -> str | None:
    """PVC the workers mount for checkpoints, if the job has a checkpoint volume."""
    vol = job.spec.checkpoint.volume
    if vol is None:
        return None
    return vol.claim_name or dns_label(job.metadata.name, suffix="-ckpt")


def needs_service(job: TrainingJob) -> bool:
    """Whether the gang gets a headless Service: only workers that meet across pods need one.

    A one-worker gang's torchrun or DeepSpeed rendezvous with itself on loopback, and a Service
    would cost the control plane its Endpoints and EndpointSlice writes for every pod change."""
    return job.spec.workers > 1


def master_addr(job: TrainingJob) -> str:
    """Rank 0's address: its stable DNS name through the headless Service, or the loopback address
    for a one-worker gang (:func:`needs_service`; an address, as ``localhost`` may resolve to IPv6
    first where the store listens on IPv4)."""
    if not needs_service(job):
        return "127.0.0.1"
    return f"{worker_name(job, 0)}.{service_name(job)}.{job.metadata.namespace}.svc"


def job_labels(job: TrainingJob) -> dict[str, str]:
    """Labels shared by every child of the job."""
    labels = common_labels("trainingjob", job.metadata.name, "worker")
    labels[LABEL_JOB] = label_value(job.metadata.name)
    if job.metadata.uid:
        labels[LABEL_JOB_UID] = job.metadata.uid
    return labels


def selector(job: TrainingJob) -> dict[str, str]:
    """Label selector matching every worker pod of the job (any attempt)."""
    key = LABEL_JOB_UID if job.metadata.uid else LABEL_JOB
    return {key: job_labels(job)[key]}


def _owner(job: TrainingJob) -> list[dict[str, Any]]:
    if not job.metadata.uid:
        return []
    return [owner_reference(API_VERSION, "TrainingJob", job.metadata.name, job.metadata.uid)]


def _meta(job: TrainingJob, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": job.metadata.namespace, "labels": labels}
    owners = _owner(job)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def headless_service(job: TrainingJob) -> dict[str, Any]:
    """Headless Service publishing workers' addresses before they are ready (rendezvous needs it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(job), job_labels(job)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(job),
            "ports": [{"name": "rdzv", "port": job.spec.master_port, "targetPort": job.spec.master_port}],
        },
    }


def checkpoint_pvc(job: TrainingJob) -> dict[str, Any] | None:
    """The checkpoint PVC the operator creates (None when adopting one or when there is none)."""
    vol = job.spec.checkpoint.volume
    if vol is None or vol.claim_name:
        return None
    name = checkpoint_claim_name(job)
    assert name is not None
    labels = {**job_labels(job), LABEL_COMPONENT: "checkpoint"}
    meta = (
        _meta(job, name, labels)
        if not vol.retain
        else {
            "name": name,
            "namespace": job.metadata.namespace,
            "labels": labels,
        }
    )
    spec: dict[str, Any] = {
        # Every rank writes its shards into one directory, so the volume must be shared.
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": str(vol.size)}},
    }
    if vol.storage_class_name:
        spec["storageClassName"] = vol.storage_class_name
    restore = job.spec.checkpoint.restore_from
    if restore:
        spec["dataSource"] = {
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": restore,
        }
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def spec_digest(job: TrainingJob) -> str:
    """Digest of the spec fields that shape the worker pods (all but :data:`LIVE_FIELDS`)."""
    # Fields at their defaults are left out: an upgrade that adds a defaulted field (which the API
    # server then fills into every stored job) must not look like a change of every running job.
    dumped = job.spec.model_dump(by_alias=True, exclude_defaults=True, exclude_none=True, mode="json")
    spec = {k: v for k, v in dumped.items() if k not in LIVE_FIELDS}
    for key, live in LIVE_SUBFIELDS.items():
        if isinstance(spec.get(key), dict):
            spec[key] = {k: v for k, v in spec[key].items() if k not in live}
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hostfile(job: TrainingJob) -> str:
    """The gang's DeepSpeed hostfile: each worker's stable DNS name (``worker-N.service``, resolved
    through the namespace's search path) with ``slots=`` its processes, rank 0 first; ``localhost``
    for a one-worker gang, which has no Service."""
    slots = job.spec.procs
    if not needs_service(job):
        return f"localhost slots={slots}\n"
    service = service_name(job)
    return "".join(f"{worker_name(job, rank)}.{service} slots={slots}\n" for rank in range(job.spec.workers))


def deepspeed_flags() -> list[str]:
    """DeepSpeed launcher flags of every worker: one launcher per pod, no ssh, the hostfile for the
    gang's shape. ``$(VAR)`` is expanded from the container's env by the kubelet (and the local
    executor), so the flags read the same rank and address the env gives."""
    return [
        "--no_ssh",
        "--hostfile=$(CAPSTAN_HOSTFILE)",
        "--node_rank=$(NODE_RANK)",
        "--master_addr=$(MASTER_ADDR)",
        "--master_port=$(MASTER_PORT)",
    ]


def fine_tune_env(ft: FineTuneSpec | None) -> dict[str, str]:
    """``spec.fineTune`` as the environment the reference trainer reads its sft defaults from (a
    relative CAPSTAN_BASE_MODEL is under the checkpoint directory, wherever that is mounted)."""
    if ft is None:
        return {}
    env = {"CAPSTAN_TASK": "sft", "CAPSTAN_BASE_MODEL": ft.base_model}
    if ft.lora is not None:
        env |= {
            "CAPSTAN_LORA_RANK": str(ft.lora.rank),
            "CAPSTAN_LORA_ALPHA": f"{ft.lora.alpha if ft.lora.alpha is not None else 2.0 * ft.lora.rank:g}",
            "CAPSTAN_LORA_TARGETS": ",".join(ft.lora.target_modules),
            "CAPSTAN_LORA_MERGE": "1" if ft.merge else "0",
        }
    return env


def worker_env(job: TrainingJob, rank: int, attempt: int) -> list[dict[str, str]]:
    """Environment of worker ``rank``: torchrun's (plain, and PET_* under launcher torchrun), NCCL,
    Capstan's own."""
    spec = job.spec
    torchrun = {
        "MASTER_ADDR": master_addr(job),
        "MASTER_PORT": str(spec.master_port),
        "NNODES": str(spec.workers),
        "NODE_RANK": str(rank),
        "NPROC_PER_NODE": str(spec.procs),
    }
    env: dict[str, str] = dict(torchrun)
    if spec.launcher == "torchrun":
        env.update({f"PET_{k}": v for k, v in torchrun.items()})
        # A fresh rendezvous id per attempt keeps a restarted gang from joining a stale round.
        env["PET_RDZV_ID"] = f"{job.metadata.uid or job.metadata.name}-{attempt}"
    else:
        # no PET_*: a torchrun started by mistake under DeepSpeed would form a second, wrong gang
        env["CAPSTAN_HOSTFILE"] = HOSTFILE_PATH
    env["CAPSTAN_LAUNCHER"] = spec.launcher
    env.update(
        {
            "CAPSTAN_JOB_NAME": job.metadata.name,
            "CAPSTAN_NAMESPACE": job.metadata.namespace,
            "CAPSTAN_RESTART_COUNT": str(attempt),
            "CAPSTAN_METRICS_PORT": str(METRICS_PORT),
            "CAPSTAN_PODINFO_ANNOTATIONS": f"{PODINFO_DIR}/annotations",
            "PYTHONUNBUFFERED": "1",
        }
    )
    ckpt = job.spec.checkpoint
    mount = ckpt.volume.mount_path if ckpt.volume else "/checkpoints"
    env["CAPSTAN_CHECKPOINT_DIR"] = mount
    env["CAPSTAN_EXPORT_DIR"] = f"{mount}/export"
    env["CAPSTAN_RESUME"] = "latest" if ckpt.resume == "Latest" else "none"
    env.update(fine_tune_env(spec.fine_tune))
    if spec.gpus_per_worker > 0:
        env.update(NCCL_DEFAULTS)
        if job.spec.wants_rdma:
            env["NCCL_IB_DISABLE"] = "0"
    env.update(spec.network.nccl)
    for var in spec.env:
        env[var.name] = var.value
    return [{"name": k, "value": v} for k, v in env.items()]


def _resources(job: TrainingJob) -> dict[str, Any]:
    spec = job.spec
    amounts: dict[str, str] = {}
    if spec.resources.cpu is not None:
        amounts["cpu"] = str(spec.resources.cpu)
    if spec.resources.memory is not None:
        amounts["memory"] = str(spec.resources.memory)
    if spec.gpus_per_worker:
        amounts[GPU_RESOURCE] = str(spec.gpus_per_worker)
    if spec.wants_rdma and spec.network.rdma_resource:
        amounts[spec.network.rdma_resource] = "1"
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def worker_pod(
    job: TrainingJob,
    rank: int,
    attempt: int,
    node: str | None = None,
    *,
    levels: TopologyLevels = DEFAULT_LEVELS,
) -> dict[str, Any]:
    """Pod of worker ``rank`` in gang ``attempt``, pinned to ``node`` when placement chose one.

    ``levels`` (the operator's topology levels) name the node label of a Kueue-queued job's
    ``spec.topology.maxDomain``."""
    spec = job.spec
    name = worker_name(job, rank)
    labels = {**job_labels(job), LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt),
              LABEL_WORKERS: str(spec.workers)}
    annotations: dict[str, str] = {SPEC_DIGEST_ANNOTATION: spec_digest(job)}
    if spec.queue_name:
        labels[KUEUE_QUEUE_LABEL] = spec.queue_name
        labels[KUEUE_POD_GROUP_LABEL] = dns_label(job.metadata.name, suffix=f"-a{attempt}")
        annotations[KUEUE_POD_GROUP_COUNT] = str(spec.workers)
        if spec.topology.policy != "None":
            label = next((lv.label for lv in levels if lv.name == spec.topology.max_domain), None)
            if label:
                required = spec.topology.policy == "Required"
                key = KUEUE_REQUIRED_TOPOLOGY if required else KUEUE_PREFERRED_TOPOLOGY
                annotations[key] = label
    if spec.wants_rdma and spec.network.networks:
        annotations[MULTUS_ANNOTATION] = spec.network.networks
    if spec.launcher == "deepspeed":
        annotations[HOSTFILE_ANNOTATION] = hostfile(job)
    meta = _meta(job, name, labels)
    meta["annotations"] = annotations

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "env": worker_env(job, rank, attempt),
        "ports": [
            {"name": "rdzv", "containerPort": spec.master_port},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        # A crash leaves its log tail as the message: failure rules' messagePattern (NCCL, Xid) and
        # rank 0's last progress line read it there.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.launcher == "deepspeed":
        container["command"] = list(spec.command or [DEEPSPEED])
        container["args"] = [*deepspeed_flags(), *spec.args]
    else:
        if spec.command:
            container["command"] = list(spec.command)
        if spec.args:
            container["args"] = list(spec.args)
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    resources = _resources(job)
    if resources:
        container["resources"] = resources
    # RDMA memory registration pins pages; without IPC_LOCK ibv_reg_mr fails.
    container["securityContext"] = container_security_context([RDMA_CAPABILITY] if spec.wants_rdma else [])

    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.resources.shared_memory)}},
    ]
    claim = checkpoint_claim_name(job)
    mount = spec.checkpoint.volume.mount_path if spec.checkpoint.volume else "/checkpoints"
    if claim:
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}})
    else:
        volumes.append({"name": "checkpoints", "emptyDir": {}})
    container["volumeMounts"].append({"name": "checkpoints", "mountPath": mount})
    container["volumeMounts"].append({"name": "podinfo", "mountPath": PODINFO_DIR, "readOnly": True})
    # the kubelet refreshes this file when the operator annotates the pod (a checkpoint request)
    volumes.append({"name": "podinfo", "downwardAPI": {"items": [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
    ]}})
    if spec.launcher == "deepspeed":
        # a file of its own at the path DeepSpeed users expect, from the pod's own annotation
        volumes.append({"name": "hostfile", "downwardAPI": {"items": [
            {"path": "hostfile", "fieldRef": {"fieldPath": f"metadata.annotations['{HOSTFILE_ANNOTATION}']"}}
        ]}})
        container["volumeMounts"].append(
            {"name": "hostfile", "mountPath": HOSTFILE_PATH, "subPath": "hostfile", "readOnly": True}
        )

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": name,
        # Time for the trainer to checkpoint on SIGTERM before it is killed.
        "terminationGracePeriodSeconds": 120,
        "securityContext": pod_security_context(
            spec.security_context, REFERENCE_UID if is_reference_image(spec.image) else None
        ),
        "containers": [container],
        "volumes": volumes,
        **service_account_fields(spec.service_account_name),
    }
    if needs_service(job):  # the worker's DNS name, worker-N.<service>
        pod_spec["subdomain"] = service_name(job)
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.wire() for t in spec.tolerations]
    if node:
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                    ]
                }
            }
        }
    return merge_template(job, {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec})


def merge_template(job: TrainingJob, pod: dict[str, Any]) -> dict[str, Any]:
    """``pod`` with ``spec.template`` merged over it (:func:`capstan.podmerge.merge_template`);
    Capstan's own fields win (the template cannot set them: admission rejects that)."""
    template = job.spec.template
    if template is None:
        return pod
    return podmerge.merge_template(pod, template.metadata.wire(), template.spec, CONTAINER)


def gang_network_policy(
    job: TrainingJob, operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE
) -> dict[str, Any] | None:
    """The NetworkPolicy around the gang (``spec.networkPolicy``), named like its Service: workers
    accept any port from their own gang (rendezvous, NCCL/gloo pick ports at run time) and the
    metrics port from the scraper and from the operator in ``operator_namespace`` (it reads rank 0's
    checkpoint progress there). None when the spec asks for none."""
    policy = job.spec.network_policy
    if policy is None:
        return None
    gang = selector(job)
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": {"matchLabels": dict(gang)}}]}]
    scrapers = [*peers(policy.metrics_from), operator_peer(operator_namespace)]
    ingress.append({"from": scrapers, "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    labels = {**job_labels(job), LABEL_COMPONENT: "network-policy"}
    return network_policy(_meta(job, service_name(job), labels), gang, ingress)
