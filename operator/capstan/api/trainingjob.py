"""TrainingJob: a gang of distributed PyTorch workers."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, model_validator

from capstan.api.common import (
    MAX_DURATION_S,
    ApiModel,
    Condition,
    EnvVar,
    Immutable,
    ObjectMeta,
    Quantity,
    Resources,
    Rule,
    Toleration,
)
from capstan.api.k8s_names import (
    ClaimName,
    EnvVarName,
    Image,
    LabelValue,
    QualifiedName,
    QueueName,
    ServiceAccountName,
    StorageClassName,
    VolumeSnapshotClassName,
    VolumeSnapshotName,
)
from capstan.api.podtemplate import (
    TRAINING,
    PodSpecBody,
    PodTemplate,
    TemplateMetadata,
    TemplateRules,
    template_tolerations,
)
from capstan.api.security import GangNetworkPolicy, PodSecurity

TopologyPolicy = Literal["Required", "Preferred", "None"]
DomainLevel = Literal["nvlink", "rack", "block", "zone"]
TrainingPhase = Literal[
    "Pending", "Queued", "Starting", "Running", "Restarting", "Succeeded", "Failed", "Suspended", "Lent"
]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})
#: How each worker pod starts its processes: torchrun (the command reads the PET_* environment) or
#: DeepSpeed's launcher (``deepspeed --no_ssh --node_rank=N``, one per pod, with a hostfile).
Launcher = Literal["torchrun", "deepspeed"]
#: DeepSpeed launcher flags Capstan sets itself under ``launcher: deepspeed`` (the gang's shape
#: comes from the hostfile and the rank from the pod), so ``args`` may not set them.
DEEPSPEED_OWNED_FLAGS: tuple[str, ...] = (
    "--no_ssh", "--node_rank", "--master_addr", "--master_port", "-H", "--hostfile", "--num_nodes",
    "--num_gpus", "--num_accelerators", "-i", "--include", "-e", "--exclude", "--launcher",
    "--force_multi",
)


class TopologySpec(ApiModel):
    """Where the gang may be placed."""

    policy: TopologyPolicy = Field(
        default="Preferred",
        description="Required: wait until the whole gang fits inside maxDomain. Preferred: use the "
        "smallest domain that fits, widening only when it must. None: place anywhere.",
    )
    max_domain: DomainLevel = Field(
        default="nvlink",
        description="Widest topology domain the gang may span under Required (nvlink, rack, block, zone).",
    )
    migration: Literal["IfCheckpointed", "Never"] = Field(
        default="IfCheckpointed",
        description="IfCheckpointed: when the job has a checkpoint volume and resumes from it "
        "(checkpoint.resume: Latest), the placement queue may move a one-worker gang to another node "
        "(stop, then restart from the checkpoint) to make whole nodes for a waiting gang; the move's "
        "downtime does not count against activeDeadlineSeconds. Never: the gang stays where it started.",
    )


class NetworkSpec(ApiModel):
    """Collective-communication wiring."""

    rdma: Literal["auto", "required", "disabled"] = Field(
        default="auto",
        description="auto: request RDMA devices when gpusPerWorker > 0 and rdmaResource is set; required: "
        "always request them (placement waits for RDMA nodes); disabled: never.",
    )
    rdma_resource: str | None = Field(
        default=None,
        max_length=68,
        pattern=r"^rdma/([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$",
        description="Extended resource name of the RDMA device, e.g. rdma/rdma_shared_device_a.",
    )
    networks: str | None = Field(
        default=None,
        description="Multus networks annotation value (k8s.v1.cni.cncf.io/networks) for RDMA NICs.",
    )
    nccl: dict[EnvVarName, str] = Field(
        default_factory=dict,
        max_length=64,
        description="NCCL_* environment overrides, e.g. {NCCL_DEBUG: WARN, NCCL_SOCKET_IFNAME: eth0}.",
    )


class CheckpointVolume(ApiModel):
    """The volume checkpoints are written to; created by the operator or adopted."""

    size: Quantity | None = Field(default=None, description="Size of the PVC the operator creates.")
    storage_class_name: StorageClassName | None = Field(
        default=None, description="StorageClass of the created PVC."
    )
    claim_name: ClaimName | None = Field(
        default=None, description="Adopt this existing PVC instead of creating one (never deleted)."
    )
    retain: bool = Field(default=False, description="Keep the created PVC when the TrainingJob is deleted.")
    mount_path: str = Field(
        default="/checkpoints", pattern=r"^/.*", description="Where workers see the checkpoint volume."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "",
            "has(self.size) != has(self.claimName)",
            "set exactly one of size (the operator creates a PVC) or claimName (adopt an existing PVC)",
            lambda v: (v.size is None) != (v.claim_name is None),
        ),
    )


class SnapshotPolicy(ApiModel):
    """CSI VolumeSnapshots of the checkpoint volume."""

    volume_snapshot_class_name: VolumeSnapshotClassName | None = Field(
        default=None, description="VolumeSnapshotClass to use; the cluster default when empty."
    )
    every_minutes: int = Field(
        default=30, ge=1, le=10080, description="Snapshot interval while the job runs."
    )
    keep: int = Field(default=3, ge=1, le=100, description="Ready snapshots to retain.")


class CheckpointSpec(ApiModel):
    """Checkpoint storage, snapshots and resume."""

    volume: CheckpointVolume | None = Field(default=None, description="Checkpoint volume.")
    snapshots: SnapshotPolicy | None = Field(default=None, description="Snapshot schedule and retention.")
    resume: Literal["Latest", "None"] = Field(
        default="Latest", description="Latest: workers resume from the newest checkpoint on restart."
    )
    restore_from: VolumeSnapshotName | None = Field(
        default=None,
        description="Name of a VolumeSnapshot to seed the checkpoint volume from (continue or fork a job).",
    )
    save_before_stop_seconds: int = Field(
        default=120,
        ge=0,
        le=3600,
        description="Before the operator stops a running gang on purpose (a move, suspend, resize or spec "
        "change) it asks rank 0 to save a checkpoint (pod annotation capstan.dev/checkpoint-request, read "
        "through the downward API) and waits up to this long for rank 0 to report it committed. Only "
        "with a checkpoint volume, resume Latest, and a trainer whose metrics expose "
        "capstan_train_checkpoint_request (the reference trainer does); 0 stops at once (SIGTERM only).",
    )


class LoRASpec(ApiModel):
    """Low-rank adapters trained on chosen linear layers, the base frozen."""

    rank: int = Field(ge=1, le=4096, description="Adapter rank r.")
    alpha: float | None = Field(
        default=None, ge=0.001, le=1_000_000, description="Scaling numerator (alpha / r); default 2 x rank."
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=lambda: ["qkv", "attn.proj"],
        min_length=1,
        max_length=64,
        description="Linear layers to adapt, PEFT-style (a layer is adapted when its name equals an entry "
        "or ends with .entry). The reference trainer's GPT has qkv, attn.proj, fc and mlp.proj (proj: both "
        "projections).",
    )


class FineTuneSpec(ApiModel):
    """Supervised fine-tuning from a base model instead of pre-training. Capstan passes it to the
    workers as environment (CAPSTAN_TASK=sft, CAPSTAN_BASE_MODEL, CAPSTAN_LORA_RANK,
    CAPSTAN_LORA_ALPHA, CAPSTAN_LORA_TARGETS, CAPSTAN_LORA_MERGE), which the reference trainer reads
    as its defaults; explicit args still win."""

    method: Literal["full", "lora"] = Field(
        default="lora", description="full: train every parameter; lora: train adapters only (set lora)."
    )
    base_model: str = Field(
        default="export",
        min_length=1,
        max_length=4096,
        description="The base export (model.safetensors, config.json, tokenizer.json): a path relative to "
        "the checkpoint volume, where checkpoint.restoreFrom a pre-training job's snapshot puts its "
        "export, or an absolute path.",
    )
    lora: LoRASpec | None = Field(default=None, description="The adapters (method lora).")
    merge: bool = Field(default=False, description="lora: also export the merged full model.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".lora",
            "(has(self.method) && self.method == 'full') != has(self.lora)",
            "method lora needs lora (rank, targetModules); method full takes no lora",
            lambda f: (f.method == "full") != (f.lora is not None),
        ),
        Rule(
            ".merge",
            "!has(self.merge) || !self.merge || !has(self.method) || self.method == 'lora'",
            "merge applies to method lora (a full fine-tune exports the full model anyway)",
            lambda f: not f.merge or f.method == "lora",
        ),
    )


# -- failure rules, startup timeout, node quarantine -------------------------------------------

#: What a matching failure rule does: restart the gang and count it against maxRestarts; restart
#: it without counting (capped by maxUncountedRestarts); or fail the job at once.
FailureAction = Literal["RestartGang", "RestartGangAndIgnoreMaxRestarts", "FailJob"]
#: Why a worker pod failed, as Capstan reads it from the pod (see capstan.training.failure_rules).
PodFailureReason = Literal[
    "Evicted", "OOMKilled", "DeadlineExceeded", "NodeLost", "NotReady", "Preempted", "Shutdown"
]
FAILURE_ACTIONS: tuple[str, ...] = ("RestartGang", "RestartGangAndIgnoreMaxRestarts", "FailJob")


def _check_pattern(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


#: A regular expression (Python ``re`` syntax, found anywhere in the text).
Pattern = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_check_pattern)]


class FailureRule(ApiModel):
    """One rule of failurePolicy.rules: which worker failures it matches and what it does.

    Every criterion given must match (exitCodes: any of them; reasons: any of them).
    """

    action: FailureAction = Field(
        description="RestartGang: restart and count it against maxRestarts. "
        "RestartGangAndIgnoreMaxRestarts: restart without counting (maxUncountedRestarts caps these). "
        "FailJob: fail the job at once."
    )
    exit_codes: list[Annotated[int, Field(ge=1, le=255)]] | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Exit codes of the worker container (1-255: 0 is success and never fails a pod).",
    )
    reasons: list[PodFailureReason] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="Why the pod failed: Evicted, OOMKilled, DeadlineExceeded, NodeLost (its Node went "
        "away), NotReady (evicted from a NotReady or unreachable node), Preempted (exit 75 or preempted "
        "by the scheduler), Shutdown (node shutdown).",
    )
    message_pattern: Pattern | None = Field(
        default=None,
        description="Regular expression (Python re syntax) searched for in the container's termination "
        "message (/dev/termination-log, or the log tail with terminationMessagePolicy "
        "FallbackToLogsOnError).",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "",
            "has(self.exitCodes) || has(self.reasons) || has(self.messagePattern)",
            "a rule needs at least one of exitCodes, reasons or messagePattern (it would match nothing)",
            lambda r: r.exit_codes is not None or r.reasons is not None or r.message_pattern is not None,
        ),
    )


class ExcludedNode(ApiModel):
    """A node the gang is kept off until the expiry, after a failure blamed on it."""

    node: str = Field(description="Node name.")
    reason: str = Field(
        description="What was blamed on it: NodeLost, NotReady, NodePressure, GPUError, NCCLError, "
        "StartupTimeout."
    )
    message: str = Field(default="", description="The failure, in words.")
    until: str = Field(description="When placement may use the node again (RFC 3339).")


class FailurePolicy(ApiModel):
    """How the gang is restarted when a worker fails."""

    max_restarts: int = Field(default=3, ge=0, le=1000, description="Gang restarts before the job fails.")
    backoff_seconds: int = Field(
        default=30, ge=0, le=3600, description="Wait before recreating a failed gang (doubles each time)."
    )
    non_retryable_exit_codes: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=list,
        max_length=256,
        description="Exit codes that fail the job at once, e.g. 2 for bad arguments.",
    )
    # "rules" on the wire; ApiModel.rules (the CEL rules of a model) keeps the Python name
    failure_rules: list[FailureRule] = Field(
        default_factory=list,
        alias="rules",
        max_length=32,
        description="Ordered rules; the first that matches the failure decides. When none matches: "
        "nonRetryableExitCodes fail the job, failures blamed on the node (lost, NotReady, node-pressure "
        "eviction, GPU Xid or NCCL system errors) and preemptions restart without counting, anything else "
        "restarts and counts.",
    )
    max_uncounted_restarts: int = Field(
        default=100,
        ge=0,
        le=10000,
        description="Restarts not counted against maxRestarts (preemptions, lost workers, node failures) "
        "before the job fails: a job preempted for ever eventually says so.",
    )
    max_startup_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Gangs placed in a row that may miss startupTimeoutSeconds before the job fails.",
    )
    node_quarantine_seconds: int = Field(
        default=3600,
        ge=0,
        le=7 * 24 * 3600,
        description="How long a node blamed for a failure (or where a worker never bound) is kept out of "
        "this job's placement; 0 never excludes nodes.",
    )


class WorkerTemplate(PodTemplate):
    """A pod template merged over the generated worker pod (as in a Job or a JobSet)."""

    template_rules: ClassVar[TemplateRules] = TRAINING

    metadata: TemplateMetadata = Field(
        default_factory=TemplateMetadata, description="Labels and annotations added to every worker pod."
    )
    spec: PodSpecBody = Field(
        default_factory=dict,
        description="A core/v1 PodSpec merged over the generated one: volumes, init and sidecar "
        "containers, imagePullSecrets, priorityClassName, securityContext, affinity and tolerations "
        "are added to Capstan's; a container named worker is merged into the worker container (env "
        "with valueFrom, envFrom, volumeMounts, resources other than GPUs). Fields Capstan owns "
        "(placement, rendezvous, GPU and RDMA resources, the checkpoint and /dev/shm mounts, the "
        "hardened security defaults) are rejected, naming what to use instead.",
    )


class TrainingJobSpec(ApiModel):
    """Desired state of a TrainingJob."""

    image: Image = Field(min_length=1, description="Container image of the workers.")
    launcher: Launcher = Field(
        default="torchrun",
        description="torchrun: the command starts the worker's processes itself (torchrun, or the "
        "reference trainer, reads the PET_* environment). deepspeed: every worker pod runs DeepSpeed's "
        "launcher without ssh (command, default [deepspeed], then --no_ssh --hostfile "
        "/etc/capstan/hostfile --node_rank --master_addr --master_port set by Capstan, then args: the "
        "training script and its flags, e.g. [--module, capstan_workloads.train, --steps, '100']).",
    )
    command: list[str] | None = Field(
        default=None,
        max_length=1024,
        description="Entrypoint; the image's when empty. Usually [torchrun]. With launcher deepspeed: the "
        "DeepSpeed launcher, [deepspeed] when empty.",
    )
    args: list[str] = Field(
        default_factory=list,
        max_length=4096,
        description="Arguments to the entrypoint. With launcher deepspeed: the training script and its "
        "flags, after Capstan's launcher flags.",
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=1024, description="Extra environment for every worker."
    )
    workers: int = Field(ge=1, le=4096, description="Number of worker pods (torchrun --nnodes).")
    gpus_per_worker: int = Field(
        default=0, ge=0, le=64, description="GPUs per worker (torchrun --nproc-per-node); 0 runs on CPU."
    )
    procs_per_worker: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Processes per worker; defaults to gpusPerWorker, or 1 on CPU.",
    )
    resources: Resources = Field(default_factory=Resources, description="CPU, memory and /dev/shm.")
    topology: TopologySpec = Field(default_factory=TopologySpec, description="Topology-aware placement.")
    network: NetworkSpec = Field(default_factory=NetworkSpec, description="NCCL and RDMA wiring.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    fine_tune: FineTuneSpec | None = Field(
        default=None,
        description="Fine-tune a base model (sft, full or LoRA) rather than pre-train; usually with "
        "checkpoint.restoreFrom a snapshot of the pre-training job, whose export becomes the base.",
    )
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="Gang restart policy.")
    suspend: bool = Field(default=False, description="True removes the workers and keeps the status.")
    preemptible: bool = Field(
        default=False,
        description="The gang may lend its GPUs to a ModelServing rollout in its namespace that asks "
        "for them (rollout.borrow: PreemptibleJobs) when the cluster has none spare: it saves a "
        "checkpoint (checkpoint.saveBeforeStopSeconds), stops (phase Lent, condition Lent), and goes "
        "back to the placement queue when that rollout ends, resuming from its checkpoint. Needs a "
        "checkpoint volume it resumes from.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DURATION_S,
        description="Delete the job this long after it succeeds or fails.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=MAX_DURATION_S,
        description=(
            "Run-time limit, like Slurm --time: counted from status.startTime (restarts included); "
            "past it the gang is stopped and the job fails with DeadlineExceeded. The placement queue "
            "uses it to let short gangs backfill and to estimate when GPUs free."
        ),
    )
    startup_timeout_seconds: int = Field(
        default=900,
        ge=1,
        le=MAX_DURATION_S,
        description="A gang Capstan placed that is not all Running this long after it was created is torn "
        "down and placed again, off the nodes where its pods did not bind (failurePolicy.maxStartupAttempts "
        "bounds the tries).",
    )
    priority: int = Field(
        default=0, ge=-1_000_000_000, le=1_000_000_000, description="Queue priority; higher places first."
    )
    queue_name: QueueName | None = Field(
        default=None,
        description="Kueue LocalQueue; when set, Kueue admits the job and Capstan does not place it.",
    )
    master_port: int = Field(default=29500, ge=1024, le=65535, description="torchrun rendezvous port.")
    service_account_name: ServiceAccountName | None = Field(
        default=None,
        description="ServiceAccount of the workers; its token is mounted only when this is set.",
    )
    security_context: PodSecurity | None = Field(
        default=None,
        description="Which non-root user the workers run as (they always run with runAsNonRoot, "
        "seccomp RuntimeDefault, no privilege escalation and no capabilities but IPC_LOCK for RDMA).",
    )
    network_policy: GangNetworkPolicy | None = Field(
        default=None,
        description="Create a NetworkPolicy so the workers accept traffic only from their own gang and "
        "(metrics port) the metrics scraper; {} uses the defaults. Unset: no NetworkPolicy.",
    )
    node_selector: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Extra node selector."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Pod tolerations.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy."
    )
    template: WorkerTemplate | None = Field(
        default=None,
        description="Pod template merged over every worker pod: dataset volumes, env from Secrets "
        "(valueFrom, envFrom), imagePullSecrets, init and sidecar containers, priorityClassName, "
        "securityContext, affinity and tolerations. A container named worker is merged into the "
        "worker container.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".preemptible",
            "!has(self.preemptible) || !self.preemptible || (has(self.checkpoint) && "
            "has(self.checkpoint.volume) && "
            "(!has(self.checkpoint.resume) || self.checkpoint.resume == 'Latest'))",
            "preemptible needs checkpoint.volume and checkpoint.resume Latest: a lent gang resumes from "
            "its checkpoint",
            lambda s: not s.preemptible
            or (s.checkpoint.volume is not None and s.checkpoint.resume == "Latest"),
        ),
        Rule(
            ".checkpoint.snapshots",
            "!has(self.checkpoint) || !has(self.checkpoint.snapshots) || has(self.checkpoint.volume)",
            "snapshots need checkpoint.volume: a snapshot is taken of that volume",
            lambda s: s.checkpoint.snapshots is None or s.checkpoint.volume is not None,
        ),
        Rule(
            ".checkpoint.restoreFrom",
            "!has(self.checkpoint) || !has(self.checkpoint.restoreFrom) || has(self.checkpoint.volume)",
            "restoreFrom needs checkpoint.volume: the snapshot is restored into that volume",
            lambda s: s.checkpoint.restore_from is None or s.checkpoint.volume is not None,
        ),
        Rule(
            ".network.rdma",
            "!has(self.network) || !has(self.network.rdma) || self.network.rdma != 'required' "
            "|| (has(self.gpusPerWorker) && self.gpusPerWorker > 0)",
            "rdma: required needs gpusPerWorker > 0 (RDMA carries GPU collectives)",
            lambda s: s.network.rdma != "required" or s.gpus_per_worker > 0,
        ),
        Rule(
            ".network.rdmaResource",
            "!has(self.network) || !has(self.network.rdma) || self.network.rdma != 'required' "
            "|| has(self.network.rdmaResource)",
            "rdma: required needs rdmaResource, e.g. rdma/rdma_shared_device_a",
            lambda s: s.network.rdma != "required" or s.network.rdma_resource is not None,
        ),
        Rule(
            ".args",
            "!has(self.launcher) || self.launcher != 'deepspeed' || (has(self.args) && size(self.args) > 0)",
            "launcher deepspeed needs args: the training script DeepSpeed starts in every process, e.g. "
            "[--module, capstan_workloads.train] or [train.py, --deepspeed_config, ds.json]",
            lambda s: s.launcher != "deepspeed" or bool(s.args),
        ),
        Rule(
            ".procsPerWorker",
            "!has(self.procsPerWorker) || !has(self.gpusPerWorker) || self.gpusPerWorker == 0 "
            "|| self.procsPerWorker == self.gpusPerWorker",
            "procsPerWorker must equal gpusPerWorker on GPU workers (one process per GPU)",
            lambda s: (
                s.procs_per_worker is None
                or s.gpus_per_worker == 0
                or s.procs_per_worker == s.gpus_per_worker
            ),
        ),
    )

    # Fields naming objects made once (the checkpoint PVC, the headless Service's port, Kueue's
    # workload); every other field is read afresh or restarts the gang (capstan.training.lifecycle).
    immutable: ClassVar[tuple[Immutable, ...]] = (
        Immutable(".checkpoint.volume", "the checkpoint PVC is made once; to change it, create a new "
                  "TrainingJob with checkpoint.restoreFrom a snapshot of this one"),
        Immutable(".checkpoint.restoreFrom", "the checkpoint PVC was seeded from it when it was made"),
        Immutable(".masterPort", "the headless Service publishes it; create a new TrainingJob"),
        Immutable(".queueName", "Kueue admitted the job in this queue; create a new TrainingJob"),
    )

    @model_validator(mode="after")
    def _check_template_against_spec(self) -> Self:
        problems = self.template_conflicts()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _check_launcher(self) -> Self:
        problems = self.launcher_conflicts()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def launcher_conflicts(self) -> list[str]:
        """Why ``command`` and ``args`` make no sense under ``launcher: deepspeed`` (empty if they do)."""
        if self.launcher != "deepspeed":
            return []
        out = []
        if self.command and self.command[0].rsplit("/", 1)[-1] == "torchrun":
            out.append("spec.command[0]: torchrun cannot run under launcher deepspeed (the command is the "
                       "DeepSpeed launcher, [deepspeed] when empty); use launcher torchrun, or drop command")
        # DeepSpeed's own flags come first; the first word that is not a flag is the training script.
        for i, arg in enumerate(self.args):
            if not arg.startswith("-"):
                break
            flag = arg.split("=", 1)[0]
            if flag in DEEPSPEED_OWNED_FLAGS:
                out.append(f"spec.args[{i}]: {flag} is set by Capstan under launcher deepspeed (the "
                           "hostfile holds spec.workers and the slots per worker; the pod gives the node "
                           "rank and the rendezvous address)")
        return out

    def template_conflicts(self) -> list[str]:
        """Fields the template's worker container sets that the rest of the spec sets too."""
        if self.template is None or not self.template.main_container():
            return []
        worker = self.template.main_container()
        at = self.template.main_container_path()
        out = self.template.resource_conflicts(self.resources.cpu, self.resources.memory)
        checkpoints = self.checkpoint.volume.mount_path if self.checkpoint.volume else "/checkpoints"
        for j, mount in enumerate(worker.get("volumeMounts") or []):
            path = mount.get("mountPath")
            if path == checkpoints:
                out.append(f"{at}.volumeMounts[{j}].mountPath: {path} is where the checkpoint volume is "
                           "mounted (spec.checkpoint.volume.mountPath)")
        return out

    def pod_tolerations(self) -> list[dict[str, Any]]:
        """Tolerations of the worker pods: the spec's, then the template's."""
        own = [t.wire() for t in self.tolerations]
        return own + template_tolerations(self.template.wire() if self.template else None)

    @property
    def procs(self) -> int:
        """Processes each worker starts (torchrun nproc-per-node)."""
        return self.procs_per_worker or max(self.gpus_per_worker, 1)

    @property
    def total_gpus(self) -> int:
        """GPUs the whole gang needs."""
        return self.workers * self.gpus_per_worker

    @property
    def movable(self) -> bool:
        """Whether the placement queue may move the gang: allowed, and it resumes from a checkpoint."""
        ckpt = self.checkpoint
        resumes = ckpt.volume is not None and ckpt.resume == "Latest"
        return self.topology.migration == "IfCheckpointed" and resumes

    @property
    def wants_rdma(self) -> bool:
        """Whether workers request RDMA devices."""
        if self.network.rdma == "required":
            return True
        return self.network.rdma == "auto" and self.gpus_per_worker > 0 and bool(self.network.rdma_resource)


class PlacementStatus(ApiModel):
    """Where the gang was placed."""

    level: str = Field(default="", description="Narrowest topology level holding the whole gang.")
    domain: str = Field(default="", description="The domain at that level (e.g. an NVLink clique).")
    nodes: list[str] = Field(default_factory=list, description="Node of each worker, rank 0 first.")


class CheckpointRecord(ApiModel):
    """A checkpoint snapshot."""

    name: str = Field(description="VolumeSnapshot (or local snapshot) name.")
    step: int | None = Field(default=None, description="Training step, when known.")
    time: str | None = Field(default=None, description="When the snapshot was taken (RFC 3339).")
    ready_to_use: bool = Field(default=False, description="Whether the snapshot can be restored.")
    reason: str | None = Field(default=None, description="Why it was taken: Scheduled, Restart, Completion.")


class CheckpointProgress(ApiModel):
    """The newest checkpoint rank 0 reported committed."""

    step: int = Field(description="Training step the checkpoint holds.")
    time: str | None = Field(default=None, description="When it was committed (RFC 3339).")


#: The outcome of a checkpoint request: rank 0 has not answered yet, it reported the checkpoint
#: committed, the wait bound passed first, or the stop it was made for was called off.
RequestOutcome = Literal["Pending", "Saved", "TimedOut", "Cancelled"]


class CheckpointRequest(ApiModel):
    """The last request to rank 0 to save a checkpoint now (before a stop, or asked by a user)."""

    id: int = Field(description="Request number (increases by one per request).")
    reason: str = Field(
        description="Why: Moved, Suspended, Resized, SpecChanged (then the gang stops), or User "
        "(annotation capstan.dev/checkpoint-now; training goes on)."
    )
    stop: bool = Field(default=False, description="Whether the gang is stopped once the checkpoint is saved.")
    requested_at: str = Field(description="When it was made (RFC 3339).")
    outcome: RequestOutcome = Field(default="Pending", description="Pending, Saved, TimedOut or Cancelled.")
    step: int | None = Field(default=None, description="Step of the checkpoint saved for it.")
    annotation: str | None = Field(
        default=None, description="Value of the capstan.dev/checkpoint-now annotation last answered."
    )


class WorkerCounts(ApiModel):
    """Worker pods by state."""

    active: int = Field(default=0, description="Pods pending or running.")
    running: int = Field(default=0, description="Pods running.")
    succeeded: int = Field(default=0, description="Pods exited 0.")
    failed: int = Field(default=0, description="Pods failed.")


class PendingMoveStatus(ApiModel):
    """A defragmentation move the placement queue decided for this gang and that is not done yet."""

    nodes: list[str] = Field(description="Node of each worker after the move, rank 0 first.")
    level: str = Field(default="", description="Narrowest topology level holding the moved gang.")
    domain: str = Field(default="", description="The domain at that level.")
    reason: str = Field(default="", description="Why the gang moves.")
    for_job: str | None = Field(default=None, description="The waiting gang the move makes room for.")
    for_level: str | None = Field(
        default=None,
        description="For a move that makes room in a narrower domain: the topology level that gang is "
        "held to until the move is done.",
    )
    decided: str = Field(description="When the move was decided (RFC 3339).")


class TrainingJobStatus(ApiModel):
    """Observed state of a TrainingJob."""

    phase: TrainingPhase = Field(default="Pending", description="Lifecycle phase.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    observed_generation: int | None = Field(default=None, description="Last generation reconciled.")
    restarts: int = Field(default=0, description="Gang restarts counted against maxRestarts.")
    preemptions: int = Field(
        default=0, description="Gang restarts not counted and not blamed on a node (preemption, lost worker)."
    )
    hardware_restarts: int = Field(
        default=0,
        description="Gang restarts blamed on a node (quarantined); not counted against maxRestarts.",
    )
    startup_timeouts: int = Field(
        default=0, description="Gangs in a row that missed startupTimeoutSeconds; reset once a gang runs."
    )
    gang_created: str | None = Field(
        default=None, description="When the current gang was created; cleared once all its workers ran."
    )
    excluded_nodes: list[ExcludedNode] = Field(
        default_factory=list, description="Nodes this job's placement avoids until their expiry."
    )
    attempt: int = Field(default=0, description="Current gang attempt; part of pod names' generation.")
    workers: WorkerCounts = Field(default_factory=WorkerCounts, description="Worker pods by state.")
    placement: PlacementStatus | None = Field(default=None, description="Where the gang runs.")
    start_time: str | None = Field(default=None, description="When the gang first ran.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    restart_after: str | None = Field(default=None, description="When a failed gang is recreated.")
    moves: int = Field(default=0, description="Times the placement queue moved the gang (not counted).")
    moved_seconds: int = Field(
        default=0, description="Downtime of finished moves; added to activeDeadlineSeconds."
    )
    moving_since: str | None = Field(default=None, description="When the move in progress began.")
    pending_move: PendingMoveStatus | None = Field(
        default=None,
        description="A move decided and not carried out yet (kept here so that an operator restart "
        "does not forget it); cleared when the gang restarts there or the move is dropped.",
    )
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, description="Snapshots, newest last.")
    last_checkpoint: CheckpointProgress | None = Field(
        default=None,
        description="Newest checkpoint rank 0 reported committed (its metrics, or its termination message).",
    )
    resumed_from_step: int | None = Field(
        default=None,
        description="Step of the checkpoint the current gang resumed from (None: a fresh start).",
    )
    checkpoint_request: CheckpointRequest | None = Field(
        default=None, description="The last request to rank 0 to save a checkpoint now."
    )
    message: str = Field(default="", description="What the job is doing or waiting for, in words.")


class TrainingJob(ApiModel):
    """A TrainingJob resource as read from the API server or a file."""

    api_version: str = Field(default="capstan.dev/v1alpha1", description="capstan.dev/v1alpha1")
    kind: Literal["TrainingJob"] = Field(default="TrainingJob", description="TrainingJob")
    metadata: ObjectMeta
    spec: TrainingJobSpec
    status: TrainingJobStatus = Field(default_factory=TrainingJobStatus)
