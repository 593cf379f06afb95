"""Inference runtimes: how each server is started, probed and measured.

A :class:`Runtime` turns the revision's settings (model path, port, tensor parallelism, context
length) into a container command line, and says which HTTP paths answer liveness and readiness and
which Prometheus series the rollout analysis reads. ``custom`` renders ``spec.argsTemplate`` in a
restricted jinja2 (:mod:`capstan.serving.argstemplate`): the template is user input evaluated
inside the operator, the admission webhook and ``capstan render``, so it may read the
documented variables and nothing else, and every render has a bounded cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capstan.api.modelserving import ModelServingSpec
from capstan.security import REFERENCE_UID
from capstan.serving.argstemplate import (
    MAX_RENDERED_CHARS,
    MAX_TEMPLATE_CHARS,
    TEMPLATE_FIELD,
    TEMPLATE_VARIABLES,
    ArgsTemplateError,
    render_template,
)

__all__ = [
    "MAX_RENDERED_CHARS",
    "MAX_TEMPLATE_CHARS",
    "TEMPLATE_FIELD",
    "TEMPLATE_VARIABLES",
    "ArgsContext",
    "ArgsTemplateError",
    "LoadSignal",
    "MetricNames",
    "Runtime",
    "custom_runtime",
    "render_args",
    "runtime_for",
    "validate_args_template",
]

CAPSTAN_IMAGE = "ghcr.io/capstan-dev/capstan-server:0.1.0"
# Pinned so a revision's content hash (and therefore what runs) never changes under a floating tag.
VLLM_IMAGE = "vllm/vllm-openai:v0.10.1.1"
TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.4"
SGLANG_IMAGE = "lmsysorg/sglang:v0.5.2"
# Where the pods of a multi-host SGLang replica meet (torch.distributed init on the leader).
SGLANG_DIST_PORT = 20000

@dataclass(frozen=True)
class MetricNames:
    """Where a runtime publishes the figures the canary analysis needs.

    ``requests``: a counter of answered requests. Errors are either the series whose
    ``code_label`` is not 2xx, or (when ``code_label`` is empty) the ``errors`` counter.
    ``request_filter``: (label, prefix) a series must match to count, e.g. only ``/v1/`` handlers so
    probe traffic does not dilute the error rate. ``latency``: a histogram of request seconds.
    ``ttft``, ``tpot``, ``queue``, ``kv_usage``: the LLM figures of canary analysis.
    """

    requests: str
    latency: str
    code_label: str = "code"
    errors: str = ""
    request_filter: tuple[str, str] | None = None
    # LLM figures (ANALYSIS_FIGURES says which runtime has which). Each is a tuple of names, newest
    # first: runtimes rename series between versions, and the first one a pod exports is read.
    ttft: tuple[str, ...] = ()  # histogram: time to first token, seconds
    tpot: tuple[str, ...] = ()  # histogram: time per output token, seconds
    queue: tuple[str, ...] = ()  # gauge: requests waiting
    kv_usage: tuple[str, ...] = ()  # gauge: KV-cache use, 0..1


@dataclass(frozen=True)
class LoadSignal:
    """A per-replica load gauge a runtime exports, that autoscaling can target.

    ``series``: the Prometheus series. ``per_percent``: what one percent of the user's target is in
    the series' unit (0.01 for a 0..1 fraction such as vLLM's KV cache usage; 1 for a count).
    """

    series: str
    per_percent: float = 1.0

    @property
    def adapter_name(self) -> str:
        """The name prometheus-adapter serves it under (custom.metrics.k8s.io): ``:`` becomes ``_``."""
        return self.series.replace(":", "_")


@dataclass(frozen=True)
class ArgsContext:
    """The values a runtime (or an args template) may use."""

    model_path: str
    port: int
    tensor_parallel: int
    max_model_len: int | None
    name: str
    # not a template variable: a custom runtime's quantization flag is written in its argsTemplate
    quantization: str | None = None
    # LoRA: serve adapters (lora), those given on the command line (name, path), and the rank limit.
    lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_lora_rank: int = 0
    pipeline_parallel: int = 1
    nodes: int = 1  # pods per replica: more than one is a multi-host group (a leader and workers)

    def variables(self) -> dict[str, Any]:
        """The template variables, by their documented names."""
        return {k: getattr(self, k) for k in TEMPLATE_VARIABLES}


@dataclass(frozen=True)
class Runtime:
    """One inference server flavour."""

    name: str
    image: str
    command: tuple[str, ...]
    args: Callable[[ArgsContext], list[str]]
    health_path: str
    ready_path: str
    metrics_path: str
    metrics: MetricNames
    env: tuple[tuple[str, str], ...] = ()
    # UID Capstan runs the runtime's default image as (None: the image's own USER decides).
    image_user: int | None = None
    # Load signals by autoscaling metric (capstan.api.modelserving.SCALING_METRICS lists the same
    # metrics per runtime, for admission; cpu needs no signal).
    load: tuple[tuple[str, LoadSignal], ...] = ()
    # Environment the runtime needs to serve LoRA adapters (vLLM's run-time loading switch).
    lora_env: tuple[tuple[str, str], ...] = ()

    def load_signal(self, metric: str) -> LoadSignal | None:
        """The gauge behind autoscaling ``metric`` (None for cpu, or one this runtime lacks)."""
        return dict(self.load).get(metric)


def _quantization(flag: str, c: ArgsContext) -> list[str]:
    """``[flag, mode]`` when spec.quantization is set (admission checked the runtime has the mode)."""
    return [flag, c.quantization] if c.quantization else []


#: Adapters in one batch for vLLM (--max-loras) and SGLang (--max-loras-per-batch).
MAX_LORAS_PER_BATCH = 4


def _modules(c: ArgsContext) -> list[str]:
    return [f"{name}={path}" for name, path in c.lora_modules]


def _capstan_args(c: ArgsContext) -> list[str]:
    args = ["--model-dir", c.model_path, "--port", str(c.port), "--model-name", c.name]
    if c.lora:
        args += ["--enable-lora", "--max-lora-rank", str(c.max_lora_rank)]
        if c.lora_modules:
            args += ["--lora-modules", *_modules(c)]
    return args + _quantization("--quantization", c)


def _vllm_args(c: ArgsContext) -> list[str]:
    args = [
        "--model",
        c.model_path,
        "--served-model-name",
        c.name,
        "--tensor-parallel-size",
        str(c.tensor_parallel),
        "--port",
        str(c.port),
    ]
    if c.pipeline_parallel > 1:
        args += ["--pipeline-parallel-size", str(c.pipeline_parallel)]
    if c.nodes > 1:
        # Across pods vLLM (0.10) runs its workers in the Ray cluster the group forms (groups module).
        args += ["--distributed-executor-backend", "ray"]
    if c.max_model_len:
        args += ["--max-model-len", str(c.max_model_len)]
    if c.lora:
        args += ["--enable-lora", "--max-lora-rank", str(c.max_lora_rank), "--max-loras",
                 str(MAX_LORAS_PER_BATCH)]
        if c.lora_modules:
            args += ["--lora-modules", *_modules(c)]
    return args + _quantization("--quantization", c)


def _sglang_args(c: ArgsContext) -> list[str]:
    # SGLang listens on 127.0.0.1 and publishes no metrics unless told to.
    args = [
        "--model-path",
        c.model_path,
        "--served-model-name",
        c.name,
        "--tp-size",
        str(c.tensor_parallel),
        "--host",
        "0.0.0.0",
        "--port",
        str(c.port),
        "--enable-metrics",
    ]
    if c.pipeline_parallel > 1:
        args += ["--pp-size", str(c.pipeline_parallel)]
    if c.nodes > 1:
        # Every pod of the group runs the same command with its own rank; rank 0 serves HTTP.
        args += ["--nnodes", str(c.nodes), "--node-rank", "$(LWS_WORKER_INDEX)",
                 "--dist-init-addr", f"$(LWS_LEADER_ADDRESS):{SGLANG_DIST_PORT}"]
    if c.max_model_len:
        args += ["--context-length", str(c.max_model_len)]
    if c.lora:
        args += ["--enable-lora", "--max-lora-rank", str(c.max_lora_rank), "--max-loras-per-batch",
                 str(MAX_LORAS_PER_BATCH)]
        if c.lora_modules:
            args += ["--lora-paths", *_modules(c)]
    return args + _quantization("--quantization", c)


def _tgi_args(c: ArgsContext) -> list[str]:
    args = ["--model-id", c.model_path, "--num-shard", str(c.tensor_parallel), "--port", str(c.port)]
    if c.max_model_len:
        args += ["--max-total-tokens", str(c.max_model_len)]
        if c.max_model_len > 1:
            # TGI refuses a max-input-tokens default that does not fit under max-total-tokens.
            args += ["--max-input-tokens", str(c.max_model_len - 1)]
    return args + _quantization("--quantize", c)


# The vLLM and TGI images run as root and have no user 10001: as any other UID they need a writable
# HOME for their caches (HF, vLLM, Triton, torch compile), and a USER so getpass.getuser(), which
# torch's compile cache calls, does not look the UID up in /etc/passwd and fail.
NON_ROOT_ENV = (("HOME", "/tmp"), ("USER", "capstan"))

CAPSTAN_METRICS = MetricNames(
    requests="capstan_serving_requests_total",
    latency="capstan_serving_request_latency_seconds",
    ttft=("capstan_serving_time_to_first_token_seconds",),
    tpot=("capstan_serving_time_per_output_token_seconds",),
    queue=("capstan_serving_requests_waiting",),
    kv_usage=("capstan_serving_kv_cache_usage",),
)
CAPSTAN_LOAD = (
    ("concurrency", LoadSignal("capstan_serving_requests_running")),
    ("queue", LoadSignal("capstan_serving_requests_waiting")),
)

RUNTIMES: dict[str, Runtime] = {
    "capstan": Runtime(
        name="capstan",
        image=CAPSTAN_IMAGE,
        command=("python", "-m", "capstan_workloads.serve"),
        args=_capstan_args,
        health_path="/healthz",
        ready_path="/readyz",
        metrics_path="/metrics",
        metrics=CAPSTAN_METRICS,
        env=(("PYTHONUNBUFFERED", "1"),),
        image_user=REFERENCE_UID,
        load=CAPSTAN_LOAD,
    ),
    "vllm": Runtime(
        name="vllm",
        image=VLLM_IMAGE,
        # The module entry point (not the image's `vllm serve`) takes --model as a flag on every
        # vLLM release, so the same args work whatever the image's ENTRYPOINT is.
        command=("python3", "-m", "vllm.entrypoints.openai.api_server"),
        args=_vllm_args,
        health_path="/health",
        ready_path="/health",
        metrics_path="/metrics",
        # vLLM's HTTP counters come from prometheus-fastapi-instrumentator: status is grouped ("2xx").
        metrics=MetricNames(
            requests="http_requests_total",
            latency="vllm:e2e_request_latency_seconds",
            code_label="status",
            request_filter=("handler", "/v1/"),
            ttft=("vllm:time_to_first_token_seconds",),
            # vLLM 0.11 renamed time per output token to inter-token latency.
            tpot=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
            queue=("vllm:num_requests_waiting",),
            kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        ),
        env=NON_ROOT_ENV,
        image_user=REFERENCE_UID,
        # Without it vLLM has no /v1/load_lora_adapter and /v1/unload_lora_adapter.
        lora_env=(("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"),),
        load=(
            ("concurrency", LoadSignal("vllm:num_requests_running")),
            ("queue", LoadSignal("vllm:num_requests_waiting")),
            ("kvCache", LoadSignal("vllm:gpu_cache_usage_perc", per_percent=0.01)),
        ),
    ),
    "sglang": Runtime(
        name="sglang",
        image=SGLANG_IMAGE,
        command=("python3", "-m", "sglang.launch_server"),
        args=_sglang_args,
        health_path="/health",
        ready_path="/health",
        metrics_path="/metrics",
        # SGLang counts requests and aborted ones; it has no per-status HTTP counter.
        metrics=MetricNames(
            requests="sglang:num_requests_total",
            latency="sglang:e2e_request_latency_seconds",
            code_label="",
            errors="sglang:num_aborted_requests_total",
            ttft=("sglang:time_to_first_token_seconds",),
            tpot=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
            queue=("sglang:num_queue_reqs",),
            kv_usage=("sglang:token_usage",),
        ),
        env=NON_ROOT_ENV,
        image_user=REFERENCE_UID,
        load=(
            ("concurrency", LoadSignal("sglang:num_running_reqs")),
            ("queue", LoadSignal("sglang:num_queue_reqs")),
            ("kvCache", LoadSignal("sglang:token_usage", per_percent=0.01)),
        ),
    ),
    "tgi": Runtime(
        name="tgi",
        image=TGI_IMAGE,
        command=("text-generation-launcher",),
        args=_tgi_args,
        health_path="/health",
        ready_path="/health",
        metrics_path="/metrics",
        metrics=MetricNames(
            requests="tgi_request_count",
            latency="tgi_request_duration",
            code_label="",
            errors="tgi_request_failure",
            tpot=("tgi_request_mean_time_per_token_duration",),
            queue=("tgi_queue_size",),
        ),
        env=NON_ROOT_ENV,
        image_user=REFERENCE_UID,
        load=(
            ("concurrency", LoadSignal("tgi_batch_current_size")),
            ("queue", LoadSignal("tgi_queue_size")),
        ),
    ),
}


def custom_runtime(spec: ModelServingSpec) -> Runtime:
    """The ``custom`` runtime: the user's image and argsTemplate; probes and metrics as capstan's."""
    template = spec.args_template or ""
    return Runtime(
        name="custom",
        image=spec.image or "",
        command=(),
        args=lambda c: render_args(template, c),
        health_path="/healthz",
        ready_path="/readyz",
        metrics_path="/metrics",
        metrics=CAPSTAN_METRICS,
        load=CAPSTAN_LOAD,
    )


def load_signals() -> dict[str, LoadSignal]:
    """Every load signal of every runtime, by series (the chart's prometheus-adapter rules)."""
    runtimes = [*RUNTIMES.values(), custom_runtime(ModelServingSpec.model_validate(
        {"model": {"uri": "hf://x"}, "runtime": "custom", "image": "x", "argsTemplate": "x"}))]
    return {sig.series: sig for rt in runtimes for _, sig in rt.load}


def runtime_for(spec: ModelServingSpec) -> Runtime:
    """The runtime of ``spec`` (custom: built from its template)."""
    if spec.runtime == "custom":
        return custom_runtime(spec)
    return RUNTIMES[spec.runtime]


def render_args(template: str, ctx: ArgsContext) -> list[str]:
    """Render ``template`` with ``ctx``: one argument per non-empty line (surrounding blanks trimmed).

    Raises :class:`ArgsTemplateError` naming ``spec.argsTemplate`` on a syntax error, an unknown
    variable, a construct outside the template language (:mod:`capstan.serving.argstemplate`), a
    sandbox violation (``{{ ''.__class__ }}``), or a value, output or amount of work beyond its cap.
    """
    return render_template(template, ctx.variables())


# Sample contexts the webhook renders with: every variable set, and the optional one unset, so a
# template that only works when max_model_len is given is caught at admission, not at rollout.
_SAMPLES = (
    ArgsContext("/model", 8000, 1, 4096, "example"),
    ArgsContext("/model/export", 8000, 8, None, "example", pipeline_parallel=2, nodes=2),
)


def validate_args_template(template: str) -> list[str]:
    """Errors (each naming ``spec.argsTemplate``) that rendering ``template`` would raise; [] if fine."""
    errors: list[str] = []
    for ctx in _SAMPLES:
        try:
            args = render_args(template, ctx)
        except ArgsTemplateError as exc:
            msg = str(exc)
            if msg not in errors:
                errors.append(msg)
            continue
        if not args and not errors:
            errors.append(f"{TEMPLATE_FIELD}: renders no arguments")
    return errors
