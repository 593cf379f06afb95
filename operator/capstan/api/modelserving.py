"""ModelServing: an inference deployment rolled out in revisions."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from capstan.api.common import (
    ApiModel,
    Condition,
    Duration,
    EnvVar,
    ObjectMeta,
    Quantity,
    Rule,
    Toleration,
)
from capstan.api.k8s_names import (
    DNS1123_SUBDOMAIN_PATTERN,
    ClaimName,
    GatewayName,
    Image,
    LabelValue,
    QualifiedName,
    StorageClassName,
    TrainingJobName,
    dns1123_subdomain_errors,
)
from capstan.api.podtemplate import SERVING, PodSpecBody, PodTemplate, TemplateMetadata, TemplateRules
from capstan.api.security import PodSecurity, ServingNetworkPolicy

#: Where the server container finds the model (capstan.serving.model_source mounts it there).
MODEL_MOUNT = "/model"

Runtime = Literal["capstan", "vllm", "sglang", "tgi", "custom"]
ScalingMetric = Literal["concurrency", "queue", "kvCache", "cpu"]
#: The autoscaling metrics each runtime exports (capstan.serving.runtimes names the series; a custom
#: runtime is expected to export the reference server's).
SCALING_METRICS: dict[str, tuple[str, ...]] = {
    "capstan": ("concurrency", "queue", "cpu"),
    "vllm": ("concurrency", "queue", "kvCache", "cpu"),
    "sglang": ("concurrency", "queue", "kvCache", "cpu"),
    "tgi": ("concurrency", "queue", "cpu"),
    "custom": ("concurrency", "queue", "cpu"),
}
_SCALING_TABLE = "; ".join(f"{rt}: {', '.join(m)}" for rt, m in SCALING_METRICS.items())
_SCALING_CEL = "{" + ", ".join(
    f"'{rt}': [{', '.join(repr(x) for x in m)}]" for rt, m in SCALING_METRICS.items()
) + "}"
#: Quantization modes, each passed to the runtime's own flag (vLLM and SGLang --quantization, TGI
#: --quantize, the reference server --quantization).
Quantization = Literal[
    "int8", "fp8", "awq", "awq_marlin", "gptq", "gptq_marlin", "marlin", "bitsandbytes",
    "bitsandbytes-nf4", "bitsandbytes-fp4", "compressed-tensors", "eetq", "exl2", "w8a8_int8", "w8a8_fp8",
]
#: The modes each runtime's pinned image accepts (capstan.serving.runtimes pins the images): the
#: reference server quantizes weights to int8 on load; vLLM, SGLang and TGI take their own names
#: (int8 weight-only is not a vLLM mode). custom: put the server's flag in argsTemplate.
QUANTIZATIONS: dict[str, tuple[str, ...]] = {
    "capstan": ("int8",),
    "vllm": ("fp8", "awq", "awq_marlin", "gptq", "gptq_marlin", "marlin", "bitsandbytes",
             "compressed-tensors"),
    "sglang": ("fp8", "awq", "awq_marlin", "gptq", "gptq_marlin", "marlin", "bitsandbytes", "w8a8_int8",
               "w8a8_fp8"),
    "tgi": ("fp8", "awq", "gptq", "marlin", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4",
            "compressed-tensors", "eetq", "exl2"),
    "custom": (),
}
_QUANT_TABLE = "; ".join(f"{rt}: {', '.join(m) or 'none (set it in argsTemplate)'}"
                         for rt, m in QUANTIZATIONS.items())
_QUANT_CEL = "{" + ", ".join(
    f"'{rt}': [{', '.join(repr(x) for x in m)}]" for rt, m in QUANTIZATIONS.items()
) + "}"
#: Runtimes an endpoint picker understands (it reads their queue, KV-cache and prefix-cache metrics).
INFERENCE_RUNTIMES = ("vllm", "sglang")
#: Runtimes that serve one replica from a group of pods (a leader and workers): vLLM over a Ray
#: cluster, SGLang with --nnodes, and custom images that read the group environment.
MULTI_HOST_RUNTIMES = ("vllm", "sglang", "custom")
ServingDomainLevel = Literal["nvlink", "rack", "block", "zone"]
# The replica's shape in CEL (fields may be absent where the rules run without schema defaults).
_CEL_TP = "(has(self.tensorParallel) ? self.tensorParallel : 1)"
_CEL_REPLICA_GPUS = f"({_CEL_TP} * (has(self.pipelineParallel) ? self.pipelineParallel : 1))"
_CEL_POD_GPUS = f"(has(self.gpusPerPod) ? self.gpusPerPod : {_CEL_TP})"
InferencePoolMode = Literal["Auto", "Required", "Disabled"]
ServingPhase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class FromTrainingJob(ApiModel):
    """Serve the model a TrainingJob exported."""

    name: TrainingJobName = Field(min_length=1, description="TrainingJob name in the same namespace.")
    checkpoint: str = Field(
        default="Latest",
        min_length=1,
        max_length=253,
        description="Latest (follow the newest ready snapshot, rolling out each new one) or a snapshot name.",
        json_schema_extra={"pattern": f"^(Latest|{DNS1123_SUBDOMAIN_PATTERN[1:-1]})$"},
    )
    path: str = Field(
        default="export", description="Directory of the exported model inside the checkpoint volume."
    )

    @field_validator("checkpoint")
    @classmethod
    def _snapshot_name(cls, value: str) -> str:
        errors = [] if value == "Latest" else dns1123_subdomain_errors(value)
        if errors:
            what = "neither Latest nor a valid VolumeSnapshot name"
            raise ValueError(f"{value!r} is {what}: {'; '.join(errors)}")
        return value


class PvcSource(ApiModel):
    """Serve a model from an existing PVC."""

    claim_name: ClaimName = Field(min_length=1, description="PersistentVolumeClaim holding the model.")
    path: str = Field(default="", description="Directory of the model inside the volume.")


class ModelCache(ApiModel):
    """A volume the model from ``uri`` is fetched into once per revision, shared by its pods."""

    size: Quantity = Field(description="Size of the volume (the model and some room), e.g. 200Gi.")
    storage_class_name: StorageClassName | None = Field(
        default=None, description="StorageClass; it must offer ReadWriteMany (or ReadOnlyMany) volumes."
    )


class ModelSource(ApiModel):
    """Where the model comes from: exactly one of fromTrainingJob, uri, pvc."""

    from_training_job: FromTrainingJob | None = Field(default=None, description="A TrainingJob's checkpoint.")
    uri: str | None = Field(
        default=None,
        pattern=r"^(s3|gs|https?|hf|pvc)://.+",
        description="Storage URI (s3://, gs://, https://, hf://) fetched by an init container.",
    )
    pvc: PvcSource | None = Field(default=None, description="An existing PVC.")
    cache: ModelCache | None = Field(
        default=None,
        description="Fetch the uri once per revision into a shared volume (a Job), instead of once per "
        "pod into its own scratch space; every replica mounts it read-only.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "",
            "[has(self.fromTrainingJob), has(self.uri), has(self.pvc)].exists_one(x, x)",
            "set exactly one of fromTrainingJob, uri or pvc",
            lambda m: sum(x is not None for x in (m.from_training_job, m.uri, m.pvc)) == 1,
        ),
        Rule(
            ".cache",
            "!has(self.cache) || (has(self.uri) && !self.uri.startsWith('pvc://'))",
            "cache is for a uri that is fetched (s3, gs, https, hf); a PVC or a snapshot is mounted as it is",
            lambda m: m.cache is None or (m.uri is not None and not m.uri.startswith("pvc://")),
        ),
    )


#: Runtimes that serve LoRA adapters, and how: "runtime" loads and unloads them on running servers
#: (POST /v1/load_lora_adapter), "startup" only from the command line (a change restarts the servers).
ADAPTER_RUNTIMES: dict[str, str] = {"capstan": "runtime", "vllm": "runtime", "sglang": "startup"}
#: The reference GPT's linear layers (capstan_workloads.model), what its LoRA adapters can target.
CAPSTAN_LORA_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
#: Largest LoRA rank vLLM accepts (its --max-lora-rank choices end there).
VLLM_MAX_LORA_RANK = 512
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
_ADAPTER_CEL = "[" + ", ".join(f"'{rt}'" for rt in ADAPTER_RUNTIMES) + "]"


def capstan_target_fits(target: str) -> bool:
    """Whether a PEFT target_modules entry selects a linear layer of the reference GPT (PEFT's rule:
    a module is adapted when its name equals the target or ends with ``.<target>``)."""
    target = re.sub(r"^blocks\.\d+\.", "blocks.0.", target)
    names = [f"blocks.0.{x}" for x in CAPSTAN_LORA_LAYERS]
    return any(n == target or n.endswith("." + target) for n in names)


class AdapterRolloutStep(ApiModel):
    """One step of an adapter's canary: this share of the servers serve the new version, then wait."""

    weight: int = Field(ge=1, le=99, description="Percent of the ready servers that load the new version.")
    pause: Duration = Field(default="1m", description="How long to hold this step, e.g. 30s, 2m, 1h.")


class AdapterRollout(ApiModel):
    """Time-based canary steps of a new adapter version (requests for the adapter reach the new
    version in proportion to the servers holding it)."""

    steps: list[AdapterRolloutStep] = Field(min_length=1, max_length=20, description="Canary steps.")


class AdapterFromTrainingJob(FromTrainingJob):
    """An adapter a TrainingJob exported (the reference trainer's ``--task sft --lora-rank``)."""

    path: str = Field(
        default="sft/adapter",
        description="Directory of the adapter (adapter_config.json, adapter_model.safetensors) inside "
        "the checkpoint volume; the reference trainer writes it to sft/adapter.",
    )


class AdapterSpec(ApiModel):
    """A LoRA adapter served over the base model, requested by its name as the OpenAI ``model``."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=ADAPTER_NAME_PATTERN,
        description="Served name: requests with this model name use the adapter. Must differ from the "
        "base's (the ModelServing's name) and from every other adapter's.",
    )
    from_training_job: AdapterFromTrainingJob | None = Field(
        default=None, description="An adapter a TrainingJob exported, from its checkpoint snapshot."
    )
    uri: str | None = Field(
        default=None,
        max_length=4096,
        pattern=r"^(s3|gs|https?|hf|pvc)://.+",
        description="Where the adapter directory is: pvc://claim/dir, s3://, gs://, https:// (.tar.gz) "
        "or hf://org/repo[@rev].",
    )
    rank: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="The adapter's rank r, when known: checked against the runtime's limit at admission, "
        "and the largest sets vLLM's and SGLang's --max-lora-rank.",
    )
    target_modules: list[Annotated[str, Field(min_length=1, max_length=253)]] | None = Field(
        default=None,
        max_length=64,
        description="The adapter's target_modules, when known: for the capstan runtime each must name a "
        "linear layer of the reference GPT (qkv, attn.proj, fc, mlp.proj, proj).",
    )

    rollout: AdapterRollout | None = Field(
        default=None,
        description="Roll a new version of this adapter out as a canary of this adapter alone: when its "
        "path changes on volumes the servers already mount (pvc://claim/new-dir), the new version is "
        "loaded on a growing share of the ready servers, step by step, while the others keep the old one "
        "(no server restarts). A version on a new volume (a new snapshot, claim or download) makes a new "
        "revision, which spec.rollout rolls out.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "",
            "[has(self.fromTrainingJob), has(self.uri)].exists_one(x, x)",
            "set exactly one of fromTrainingJob or uri",
            lambda a: (a.from_training_job is None) != (a.uri is None),
        ),
    )


class AutoscalingSpec(ApiModel):
    """Horizontal autoscaling of each live revision: KEDA (a ScaledObject with a Prometheus trigger)
    when the cluster serves keda.sh/v1alpha1, else a HorizontalPodAutoscaler whose metric
    prometheus-adapter serves (the chart ships its rules)."""

    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest replicas. 0 scales an idle revision to zero: it needs KEDA and "
        "activationQuery (the runtime's own metrics vanish with its last replica).",
    )
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas.")
    metric: ScalingMetric = Field(
        default="concurrency",
        description="The load signal, from the runtime's own metrics. concurrency: requests being "
        "served per replica (vLLM vllm:num_requests_running, SGLang sglang:num_running_reqs, TGI "
        "tgi_batch_current_size, capstan capstan_serving_requests_running); queue: requests waiting "
        "per replica (vllm:num_requests_waiting, sglang:num_queue_reqs, tgi_queue_size, "
        "capstan_serving_requests_waiting); kvCache: percent of the KV cache in use "
        "(vllm:gpu_cache_usage_perc, sglang:token_usage; vLLM and SGLang only); cpu: CPU utilisation "
        "percent.",
    )
    target: int = Field(default=16, ge=1, le=100_000, description="Target value of the metric per replica.")
    activation_query: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="With minReplicas 0: a PromQL query of the requests waiting for this ModelServing "
        "while it has no replica (e.g. your gateway's pending requests to its Service); KEDA wakes the "
        "revision when it is above 0.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".minReplicas",
            "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "minReplicas must not exceed maxReplicas",
            lambda a: a.min_replicas <= a.max_replicas,
        ),
        Rule(
            ".activationQuery",
            "!has(self.minReplicas) || self.minReplicas > 0 || has(self.activationQuery)",
            "minReplicas 0 needs activationQuery: at zero replicas the runtime exports no metric, so "
            "only a signal from in front of the servers can wake them",
            lambda a: a.min_replicas > 0 or a.activation_query is not None,
        ),
    )


class RolloutStep(ApiModel):
    """One canary step: send this share of traffic to the new revision, then wait."""

    weight: int = Field(ge=1, le=100, description="Percent of traffic to the new revision.")
    pause: Duration = Field(default="1m", description="How long to hold and analyse, e.g. 30s, 2m, 1h.")


#: The LLM figures each runtime exports for canary analysis (capstan.serving.runtimes names the
#: series; a custom runtime is expected to export the reference server's).
ANALYSIS_FIGURES: dict[str, tuple[str, ...]] = {
    "capstan": ("ttft", "tpot", "queue", "kvCache"),
    "vllm": ("ttft", "tpot", "queue", "kvCache"),
    "sglang": ("ttft", "tpot", "queue", "kvCache"),
    "tgi": ("tpot", "queue"),
    "custom": ("ttft", "tpot", "queue", "kvCache"),
}
#: spec.rollout.analysis field → the figure it reads.
ANALYSIS_FIELDS = {
    "maxTimeToFirstTokenP95Ms": "ttft",
    "maxTimePerOutputTokenP95Ms": "tpot",
    "maxQueueDepth": "queue",
    "maxKvCacheUsage": "kvCache",
}


class AnalysisQuery(ApiModel):
    """A PromQL query judged at the end of each step (Argo Rollouts' AnalysisTemplate is the model)."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Its name in messages.",
    )
    query: str = Field(
        min_length=1,
        max_length=2000,
        description="PromQL giving one number, a template: {{ namespace }}, {{ name }}, {{ revision }} (the "
        "canary) and {{ stableRevision }}. Sent to the operator's Prometheus (CAPSTAN_PROMETHEUS_URL); no "
        "data, NaN or an error holds the step.",
    )
    max: float | None = Field(
        default=None, ge=-1e15, le=1e15, description="Fail the step when the result is above this."
    )
    min: float | None = Field(
        default=None, ge=-1e15, le=1e15, description="Fail the step when the result is below this."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(".max", "has(self.max) || has(self.min)", "a query needs max, min or both",
             lambda q: q.max is not None or q.min is not None),
    )


class AnalysisSpec(ApiModel):
    """Thresholds the new revision must meet at every step."""

    max_error_rate: float = Field(
        default=0.01, ge=0, le=1, description="Highest share of non-2xx responses (0.01 = 1%)."
    )
    max_p99_latency_ms: int | None = Field(
        default=None, ge=1, le=3_600_000, description="Highest p99 end-to-end latency in milliseconds."
    )
    min_requests: int = Field(
        default=20,
        ge=0,
        le=1_000_000_000,
        description="Requests needed before a verdict; fewer holds the step.",
    )
    max_time_to_first_token_p95_ms: int | None = Field(
        default=None, ge=1, le=3_600_000, description="Highest p95 time to first token in milliseconds."
    )
    max_time_per_output_token_p95_ms: int | None = Field(
        default=None, ge=1, le=600_000, description="Highest p95 time per output token in milliseconds."
    )
    max_queue_depth: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Highest mean of requests waiting per canary pod."
    )
    max_kv_cache_usage: float | None = Field(
        default=None, ge=0, le=1, description="Highest mean KV-cache use of the canary pods (0.9 = 90%)."
    )
    max_regression: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Compare with the stable revision over the same window: the canary's p99 latency, p95 "
        "time to first token and p95 time per output token may be at most this much higher (0.2 = 20%).",
    )
    queries: list[AnalysisQuery] = Field(
        default_factory=list, max_length=10, description="PromQL queries, each judged against its bounds."
    )


class RolloutSpec(ApiModel):
    """How a new revision replaces the stable one."""

    steps: list[RolloutStep] = Field(
        default_factory=list,
        max_length=50,
        description="Canary steps; empty promotes a ready revision at once.",
    )
    analysis: AnalysisSpec | None = Field(default=None, description="Metric analysis between steps.")
    max_surge: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="Replicas the rollout may run above spec.replicas (unset: no limit, the canary is "
        "added beside the stable revision). 0 replaces stable replicas with canary ones step by step, "
        "for clusters with no spare GPUs; needs steps and fixed replicas.",
    )
    borrow: Literal["Never", "PreemptibleJobs"] | None = Field(
        default=None,
        description="PreemptibleJobs: while canary pods cannot be scheduled for want of GPUs, borrow "
        "the GPUs of running TrainingJobs of this namespace marked spec.preemptible (lowest priority "
        "first, as few as cover the need); they checkpoint, stop and requeue, and get their GPUs back "
        "when the rollout ends (promoted or rolled back). Both objects say so in a condition "
        "(Borrowing, Lent). Unset or Never: never.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".maxSurge",
            "!has(self.maxSurge) || (has(self.steps) && size(self.steps) > 0)",
            "maxSurge needs steps: each step swaps stable replicas for canary ones (without steps the whole "
            "new revision would have to start before the old one stops)",
            lambda r: r.max_surge is None or bool(r.steps),
        ),
    )


class ServingResources(ApiModel):
    """CPU and memory of each replica's server container."""

    cpu: Quantity | None = Field(default=None, description="CPU request and limit.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")


class ServerTemplate(PodTemplate):
    """A pod template merged over every revision's server pods (as in a Deployment)."""

    template_rules: ClassVar[TemplateRules] = SERVING

    metadata: TemplateMetadata = Field(
        default_factory=TemplateMetadata, description="Labels and annotations added to every server pod."
    )
    spec: PodSpecBody = Field(
        default_factory=dict,
        description="A core/v1 PodSpec merged over the generated one: volumes, init and sidecar "
        "containers, imagePullSecrets, priorityClassName, serviceAccountName, securityContext, affinity "
        "and tolerations are added to Capstan's; a container named server is merged into the server "
        "container (env with valueFrom, envFrom, volumeMounts, resources other than GPUs). Fields "
        "Capstan owns (image, arguments and probes of the runtime, GPUs, the model and /dev/shm mounts, "
        "the hardened security defaults) are rejected, naming what to use instead.",
    )


class ServingTopology(ApiModel):
    """Where the pods of one multi-host replica may be placed (a replica of one pod needs nothing)."""

    policy: Literal["Required", "Preferred"] = Field(
        default="Preferred",
        description="Required: a replica's pods wait until they fit inside one maxDomain domain. "
        "Preferred: the narrowest domain that fits, widening only when it must. Pods that share a "
        "tensor-parallel group (gpusPerPod below tensorParallel) always stay in one NVLink domain.",
    )
    max_domain: ServingDomainLevel = Field(
        default="nvlink",
        description="Widest topology domain one replica may span under Required (nvlink, rack, block, "
        "zone).",
    )


class GatewayRef(ApiModel):
    """The Gateway (gateway.networking.k8s.io) the ModelServing's HTTPRoute attaches to."""

    name: GatewayName = Field(min_length=1, description="Gateway name.")
    namespace: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Its namespace; default: the ModelServing's.",
    )
    section_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="A listener of the Gateway; default: all.",
    )


class RoutingSpec(ApiModel):
    """How traffic reaches the revisions: an InferencePool per revision, behind a Gateway."""

    gateway: GatewayRef | None = Field(
        default=None,
        description="Gateway the HTTPRoute attaches to (north-south). Needed for an InferencePool.",
    )
    inference_pool: InferencePoolMode = Field(
        default="Auto",
        description="Auto: an InferencePool and endpoint picker per revision (requests go by queue, "
        "KV-cache and prefix-cache state) for vllm and sglang when the cluster serves "
        "inference.networking.k8s.io/v1 and a gateway is set, else HTTPRoute weights or the Service. "
        "Required: refuse the spec when that cannot be. Disabled: never.",
    )
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailOpen",
        description="When the endpoint picker does not answer: FailOpen routes to any ready pod of "
        "the pool, FailClose refuses the request.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".gateway",
            "!has(self.inferencePool) || self.inferencePool != 'Required' || has(self.gateway)",
            "inferencePool Required needs gateway: an InferencePool is reached through a Gateway's "
            "HTTPRoute",
            lambda r: r.inference_pool != "Required" or r.gateway is not None,
        ),
    )


def _figure_check(field: str, figure: str) -> Callable[[ModelServingSpec], bool]:
    """The Python side of the rule that ``spec.rollout.analysis.<field>`` reads ``figure``."""
    return lambda spec: _analysis_figure_ok(spec, field, figure)


def _analysis_figure_ok(spec: ModelServingSpec, field: str, figure: str) -> bool:
    """Whether ``spec.rollout.analysis.<field>`` is unset or reads a figure the runtime exports."""
    analysis = spec.rollout.analysis
    if analysis is None:
        return True
    attr = next(name for name, info in AnalysisSpec.model_fields.items() if info.alias == field)
    return getattr(analysis, attr) is None or figure in ANALYSIS_FIGURES[spec.runtime]


class ModelServingSpec(ApiModel):
    """Desired state of a ModelServing."""

    model: ModelSource = Field(description="The model to serve.")
    runtime: Runtime = Field(
        default="capstan",
        description="Inference server: capstan (reference), vllm, sglang, tgi (in maintenance mode "
        "upstream: prefer vllm or sglang) or custom.",
    )
    image: Image | None = Field(default=None, description="Server image; each runtime has a default.")
    command: list[str] | None = Field(default=None, max_length=1024, description="Entrypoint override.")
    args_template: str | None = Field(
        default=None,
        max_length=65536,
        description="custom runtime: jinja2 template of the server arguments, one per line. Variables: "
        "model_path, port, tensor_parallel, max_model_len, name, pipeline_parallel, nodes (pods per "
        "replica; in a multi-host replica every pod runs these arguments, with LWS_LEADER_ADDRESS, "
        "LWS_GROUP_SIZE and LWS_WORKER_INDEX in its environment).",
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=1024, description="Extra environment.")
    quantization: Quantization | None = Field(
        default=None,
        description="Serve the model quantized, through the runtime's own flag (vLLM and SGLang "
        "--quantization, TGI --quantize, the reference server --quantization). Modes per runtime: "
        + _QUANT_TABLE + ". Unset: the model's own precision.",
    )
    tensor_parallel: int = Field(
        default=1, ge=1, le=72,
        description="Tensor-parallel GPUs of each pipeline stage, kept inside one NVLink domain.",
    )
    pipeline_parallel: int | None = Field(
        default=None, ge=1, le=64,
        description="Pipeline stages per replica (unset: 1). A replica holds tensorParallel x "
        "pipelineParallel GPUs; with more than one stage each stage is one pod by default.",
    )
    gpus_per_pod: int | None = Field(
        default=None, ge=1, le=72,
        description="GPUs of each pod of a replica (unset: tensorParallel, one stage per pod). Below "
        "the replica's GPUs a replica is a group of pods, a leader serving the API and workers, "
        "placed together by topology (spec.topology), started and restarted as a unit; rendered as a "
        "LeaderWorkerSet where that CRD is installed, else as Capstan-managed groups. E.g. "
        "tensorParallel 16 on GB200 NVL72 nodes of 4 GPUs: gpusPerPod 4.",
    )
    topology: ServingTopology | None = Field(
        default=None,
        description="Placement of multi-host replicas (unset: Preferred, from the NVLink domain up).",
    )
    gpu: bool = Field(default=True, description="Request the replica's GPUs (false: CPU).")
    replicas: int = Field(default=1, ge=0, le=1000, description="Replicas when not autoscaled.")
    max_model_len: int | None = Field(
        default=None, ge=1, le=16_777_216, description="Longest sequence served."
    )
    port: int = Field(default=8000, ge=1024, le=65535, description="Container port of the server.")
    resources: ServingResources = Field(default_factory=ServingResources, description="CPU and memory.")
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Autoscaling; fixed replicas when empty."
    )
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Canary rollout and analysis.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Pod tolerations.")
    node_selector: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Extra node selector."
    )
    security_context: PodSecurity | None = Field(
        default=None,
        description="Which non-root user the servers run as (they always run with runAsNonRoot, "
        "seccomp RuntimeDefault, no privilege escalation, no capabilities and no ServiceAccount token).",
    )
    network_policy: ServingNetworkPolicy | None = Field(
        default=None,
        description="Create a NetworkPolicy so the servers accept traffic only from the routing layer "
        "(clientsFrom), the Capstan operator's canary analysis and the metrics scraper; {} uses the "
        "defaults. Unset: no NetworkPolicy.",
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=64,
        description="LoRA adapters served over the one base model, each requested by its name (OpenAI "
        "model field). capstan and vllm load and unload them on the running servers (adding or removing "
        "one does not restart the base); sglang takes them on its command line (a change rolls out a new "
        "revision); tgi and custom serve none.",
    )
    routing: RoutingSpec | None = Field(
        default=None,
        description="Routing through a Gateway: an InferencePool per revision (vllm, sglang) or "
        "HTTPRoute weights. Unset: the HTTPRoute attaches to the Service (mesh), when Gateway API "
        "is served.",
    )
    template: ServerTemplate | None = Field(
        default=None,
        description="Pod template merged over every server pod: env from Secrets (valueFrom, envFrom; "
        "also given to the model download), volumes, imagePullSecrets, init and sidecar containers, "
        "serviceAccountName, priorityClassName, securityContext, affinity and tolerations. A container "
        "named server is merged into the server container. A change rolls out a new revision.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".argsTemplate",
            "!has(self.runtime) || self.runtime != 'custom' || (has(self.argsTemplate) && has(self.image))",
            "runtime custom needs argsTemplate and image",
            lambda s: s.runtime != "custom" or (s.args_template is not None and s.image is not None),
        ),
        Rule(
            ".autoscaling.metric",
            f"!has(self.autoscaling) || (has(self.autoscaling.metric) ? self.autoscaling.metric : "
            f"'concurrency') in {_SCALING_CEL}[has(self.runtime) ? self.runtime : 'capstan']",
            f"the runtime does not export this metric; each runtime's: {_SCALING_TABLE}",
            lambda s: s.autoscaling is None or s.autoscaling.metric in SCALING_METRICS[s.runtime],
        ),
        Rule(
            ".rollout.maxSurge",
            "!has(self.rollout) || !has(self.rollout.maxSurge) || (!has(self.autoscaling) && "
            "(self.rollout.maxSurge > 0 || (has(self.replicas) ? self.replicas : 1) >= 2))",
            "maxSurge needs fixed replicas (no autoscaling: the autoscaler sizes each revision), and "
            "maxSurge 0 needs replicas >= 2 (one replica cannot be shared by two revisions)",
            lambda s: s.rollout.max_surge is None
            or (s.autoscaling is None and (s.rollout.max_surge > 0 or s.replicas >= 2)),
        ),
        *(
            Rule(
                f".rollout.analysis.{field}",
                f"!has(self.rollout) || !has(self.rollout.analysis) || "
                f"!has(self.rollout.analysis.{field}) || (has(self.runtime) ? self.runtime : 'capstan') in "
                f"{[rt for rt, figs in ANALYSIS_FIGURES.items() if figure in figs]}",
                f"the runtime does not export this figure; runtimes that do: "
                f"{', '.join(rt for rt, figs in ANALYSIS_FIGURES.items() if figure in figs)}",
                _figure_check(field, figure),
            )
            for field, figure in ANALYSIS_FIELDS.items()
            # A figure every runtime exports needs no rule (it could never refuse anything).
            if any(figure not in figures for figures in ANALYSIS_FIGURES.values())
        ),
        Rule(
            ".quantization",
            f"!has(self.quantization) || self.quantization in "
            f"{_QUANT_CEL}[has(self.runtime) ? self.runtime : 'capstan']",
            f"the runtime has no such quantization mode; each runtime's: {_QUANT_TABLE}",
            lambda s: s.quantization is None or s.quantization in QUANTIZATIONS[s.runtime],
        ),
        Rule(
            ".adapters",
            f"!has(self.adapters) || size(self.adapters) == 0 || "
            f"(has(self.runtime) ? self.runtime : 'capstan') in {_ADAPTER_CEL}",
            f"this runtime serves no LoRA adapters; runtimes that do: {', '.join(ADAPTER_RUNTIMES)}",
            lambda s: not s.adapters or s.runtime in ADAPTER_RUNTIMES,
        ),
        Rule(
            ".adapters",
            "!has(self.adapters) || "
            "self.adapters.all(a, size(self.adapters.filter(b, b.name == a.name)) == 1)",
            "adapter names must be unique",
            lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
        ),
        Rule(
            ".gpusPerPod",
            f"{_CEL_REPLICA_GPUS} % {_CEL_POD_GPUS} == 0",
            "gpusPerPod must divide the replica's GPUs (tensorParallel x pipelineParallel) into whole pods",
            lambda s: s.replica_gpus % s.pod_gpus == 0,
        ),
        Rule(
            ".gpusPerPod",
            f"{_CEL_POD_GPUS} >= {_CEL_TP} || {_CEL_TP} % {_CEL_POD_GPUS} == 0",
            "gpusPerPod below tensorParallel must divide it: a tensor-parallel group spans whole pods",
            lambda s: s.pod_gpus >= s.tensor_parallel or s.tensor_parallel % s.pod_gpus == 0,
        ),
        Rule(
            ".runtime",
            f"{_CEL_REPLICA_GPUS} == {_CEL_POD_GPUS} || "
            f"(has(self.runtime) && self.runtime in {list(MULTI_HOST_RUNTIMES)})",
            f"a replica of several pods (pipelineParallel or gpusPerPod) needs runtime "
            f"{', '.join(MULTI_HOST_RUNTIMES)}: the others serve from one pod",
            lambda s: s.pods_per_replica == 1 or s.runtime in MULTI_HOST_RUNTIMES,
        ),
        Rule(
            ".gpu",
            f"!has(self.gpu) || self.gpu || {_CEL_REPLICA_GPUS} == {_CEL_POD_GPUS}",
            "a replica of several pods (pipelineParallel or gpusPerPod) runs on GPUs: gpu must be true",
            lambda s: s.gpu or s.pods_per_replica == 1,
        ),
        Rule(
            ".routing.inferencePool",
            "!has(self.routing) || !has(self.routing.inferencePool) || "
            "self.routing.inferencePool != 'Required' || (has(self.runtime) && self.runtime in "
            f"{list(INFERENCE_RUNTIMES)})",
            f"inferencePool Required needs runtime {' or '.join(INFERENCE_RUNTIMES)}: the endpoint "
            "picker reads their queue and KV-cache metrics",
            lambda s: s.routing is None or s.routing.inference_pool != "Required"
            or s.runtime in INFERENCE_RUNTIMES,
        ),
    )

    @model_validator(mode="after")
    def _check_template_against_spec(self) -> Self:
        problems = self.template_conflicts() + self.adapter_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def adapter_problems(self) -> list[str]:
        """Adapters whose declared rank or target modules the runtime cannot serve (when known)."""
        out = []
        for i, a in enumerate(self.adapters):
            at = f"spec.adapters[{i}]"
            if self.runtime == "vllm" and a.rank is not None and a.rank > VLLM_MAX_LORA_RANK:
                out.append(f"{at}.rank: vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANK}, got {a.rank}")
            if self.runtime == "capstan":
                for j, t in enumerate(a.target_modules or []):
                    if not capstan_target_fits(t):
                        out.append(f"{at}.targetModules[{j}]: {t!r} is no linear layer of the reference GPT; "
                                   "use qkv, attn.proj, fc, mlp.proj or proj")
        return out

    @property
    def stages(self) -> int:
        """Pipeline stages per replica."""
        return self.pipeline_parallel or 1

    @property
    def replica_gpus(self) -> int:
        """GPUs one replica holds: tensorParallel x pipelineParallel."""
        return self.tensor_parallel * self.stages

    @property
    def pod_gpus(self) -> int:
        """GPUs each pod of a replica holds."""
        return self.gpus_per_pod or self.tensor_parallel

    @property
    def pods_per_replica(self) -> int:
        """Pods in one replica: 1, or a group of a leader and workers (multi-host)."""
        return max(1, self.replica_gpus // self.pod_gpus)

    @property
    def placement(self) -> ServingTopology:
        """``spec.topology`` with its defaults."""
        return self.topology or ServingTopology()

    def multi_host_problem(self, lws: bool) -> str:
        """Why multi-host replicas cannot run as written in a cluster with or without LeaderWorkerSet
        ("": they can, or the replicas are single pods)."""
        if self.pods_per_replica == 1 or lws or self.autoscaling is None:
            return ""
        return (f"spec.autoscaling: replicas of {self.pods_per_replica} pods are autoscaled through "
                "LeaderWorkerSet's scale subresource (leaderworkerset.x-k8s.io/v1), which this cluster "
                "does not serve: install LeaderWorkerSet, or use fixed replicas")

    def scale_to_zero_problem(self, keda: bool) -> str:
        """Why the autoscaling cannot run as written in a cluster with or without KEDA ("": it can)."""
        if self.autoscaling is None or self.autoscaling.min_replicas > 0 or keda:
            return ""
        return ("spec.autoscaling.minReplicas: 0 needs KEDA (keda.sh/v1alpha1 ScaledObject), which this "
                "cluster does not serve: install KEDA, or set minReplicas to 1 or more")

    def inference_pool_problem(self, served: bool, enabled: bool = True) -> str:
        """Why ``routing.inferencePool: Required`` cannot be honoured in a cluster that does or does
        not serve InferencePool and HTTPRoute (``served``), by an operator that may or may not
        create endpoint pickers (``enabled``); "" when it can, or is not asked for."""
        if self.routing is None or self.routing.inference_pool != "Required" or (served and enabled):
            return ""
        if not served:
            return ("spec.routing.inferencePool: Required needs the Gateway API Inference Extension "
                    "(inference.networking.k8s.io/v1 InferencePool) and Gateway API HTTPRoute, which this "
                    "cluster does not serve: install them, or set inferencePool to Auto")
        return ("spec.routing.inferencePool: Required needs endpoint pickers, which this Capstan install "
                "may not create (their Roles): set the chart's routing.endpointPickers to true, or set "
                "inferencePool to Auto")

    def template_conflicts(self) -> list[str]:
        """Fields the template's server container sets that the rest of the spec sets too."""
        if self.template is None or not self.template.main_container():
            return []
        server = self.template.main_container()
        at = self.template.main_container_path()
        out = self.template.resource_conflicts(self.resources.cpu, self.resources.memory)
        own_env = {e.name for e in self.env}
        for j, env in enumerate(server.get("env") or []):
            if env.get("name") in own_env:
                out.append(f"{at}.env[{j}].name: {env['name']} is also in spec.env; set it in one place")
        for j, mount in enumerate(server.get("volumeMounts") or []):
            path = str(mount.get("mountPath", "")).rstrip("/")
            if path == MODEL_MOUNT or path.startswith(MODEL_MOUNT + "/"):
                out.append(f"{at}.volumeMounts[{j}].mountPath: {MODEL_MOUNT} is where Capstan mounts the "
                           "model (spec.model)")
        return out


class RevisionStatus(ApiModel):
    """A live revision."""

    name: str = Field(description="Revision name (content hash of model, runtime and resources).")
    weight: int = Field(default=0, description="Percent of traffic it receives.")
    replicas: int = Field(default=0, description="Desired replicas.")
    ready: int = Field(default=0, description="Ready replicas.")
    model: str = Field(default="", description="What it serves (snapshot, URI or PVC).")


class RolloutStatus(ApiModel):
    """Progress of the current rollout."""

    step: int = Field(default=0, description="Index of the current step.")
    step_started_at: str | None = Field(default=None, description="When the current step began.")
    traffic: Literal["gateway", "replicas"] = Field(
        default="replicas",
        description="gateway: HTTPRoute weights; replicas: split by replica share behind one Service.",
    )


class AdapterStatus(ApiModel):
    """A LoRA adapter as the servers hold it."""

    name: str = Field(description="Served name.")
    source: str = Field(default="", description="What it serves (snapshot or URI).")
    path: str = Field(default="", description="Where the servers read it.")
    loaded: int = Field(default=0, description="Ready servers that hold it.")
    message: str = Field(default="", description="Why it is not loaded everywhere, when it is not.")
    canary_path: str = Field(default="", description="A new version being rolled out (rollout steps).")
    canary_step: int = Field(default=0, description="Index of the canary's current step.")
    canary_step_started_at: str | None = Field(default=None, description="When the current step began.")
    canary_loaded: int = Field(default=0, description="Ready servers that hold the new version.")


class ModelServingStatus(ApiModel):
    """Observed state of a ModelServing."""

    phase: ServingPhase = Field(default="Pending", description="Lifecycle phase.")
    url: str | None = Field(default=None, description="In-cluster URL of the stable Service.")
    replicas: int = Field(default=0, description="Ready replicas over all revisions (scale subresource).")
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    stable_revision: str | None = Field(default=None, description="Revision serving most traffic.")
    canary_revision: str | None = Field(default=None, description="Revision being rolled out.")
    failed_revisions: list[str] = Field(
        default_factory=list, description="Revisions rolled back; not retried until the spec changes."
    )
    revisions: list[RevisionStatus] = Field(default_factory=list, description="Live revisions.")
    rollout: RolloutStatus | None = Field(default=None, description="Current rollout.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    observed_generation: int | None = Field(default=None, description="Last generation reconciled.")
    message: str = Field(default="", description="What the deployment is doing, in words.")
    adapters: list[AdapterStatus] = Field(default_factory=list, description="LoRA adapters served.")
    borrowed_from: list[str] = Field(
        default_factory=list,
        description="TrainingJobs whose GPUs the current rollout borrows (rollout.borrow); they get them "
        "back when it ends.",
    )


class ModelServing(ApiModel):
    """A ModelServing resource as read from the API server or a file."""

    api_version: str = Field(default="capstan.dev/v1alpha1", description="capstan.dev/v1alpha1")
    kind: Literal["ModelServing"] = Field(default="ModelServing", description="ModelServing")
    metadata: ObjectMeta
    spec: ModelServingSpec
    status: ModelServingStatus = Field(default_factory=ModelServingStatus)

    @model_validator(mode="after")
    def _adapter_names(self) -> Self:
        # The base is served under the ModelServing's name (every runtime's --served-model-name).
        for i, a in enumerate(self.spec.adapters):
            if a.name == self.metadata.name:
                raise ValueError(f"spec.adapters[{i}].name: {a.name!r} is the base model's served name (the "
                                 "ModelServing's name); give the adapter another name")
        return self
