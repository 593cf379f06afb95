"""The validating webhook's pure check: a table of bad inputs, each rejected naming its field."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capstan.admission import handlers, validate
from capstan.admission.validation import _jinja_errors, domain_sizes
from capstan.labels import SKIP_CAPACITY_ANNOTATION
from capstan.topology.levels import DEFAULT_LEVELS


def node(name: str, gpus: int, clique: str | None = None, **labels: str) -> dict[str, Any]:
    lab = dict(labels)
    if clique:
        lab["nvidia.com/gpu.clique"] = clique
    return {
        "metadata": {"name": name, "labels": lab},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


W50_10 = {"steps": [{"weight": 50}, {"weight": 10}]}
TRAINER = "ghcr.io/capstan-dev/capstan-trainer:0.1.0"
HGX = [node(f"hgx-{i}", 8) for i in range(4)]  # four 8-GPU nodes, each its own NVLink domain


def tj(**spec: Any) -> dict[str, Any]:
    base = {"image": "registry.example/trainer:1.0", "workers": 2, "gpusPerWorker": 8}
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "gpt", "namespace": "team-a"},
        "spec": {**base, **spec},
    }


def ms(**spec: Any) -> dict[str, Any]:
    base = {"model": {"fromTrainingJob": {"name": "gpt"}}, "tensorParallel": 8}
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "ModelServing",
        "metadata": {"name": "gpt", "namespace": "team-a"},
        "spec": {**base, **spec},
    }


def adapter(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "uri": f"pvc://adapters/{name}", **extra}


def test_good_objects_pass() -> None:
    assert validate(tj(), HGX) == []
    assert validate(tj(launcher="deepspeed", args=["--module", "pkg.train", "--master_port", "1"]), HGX) == []
    assert validate(ms(quantization="int8"), HGX) == []
    assert validate(ms(runtime="tgi", quantization="bitsandbytes-nf4"), HGX) == []
    assert validate(ms(), HGX) == []
    assert validate(ms(rollout={"steps": [{"weight": 10}, {"weight": 50, "pause": "5m"}]}), HGX) == []
    custom = ms(
        runtime="custom",
        image="registry.example/server:1",
        argsTemplate="--model={{ model_path }}\n--port={{ port }}\n--tp={{ tensor_parallel }}",
    )
    assert validate(custom, HGX) == []
    llm = {"maxTimeToFirstTokenP95Ms": 800, "maxTimePerOutputTokenP95Ms": 60, "maxQueueDepth": 4,
           "maxKvCacheUsage": 0.95, "maxRegression": 0.2,
           "queries": [{"name": "errors", "query": 'sum(rate(http_requests_total{pod=~"{{ revision }}-.*",'
                        'status=~"5.."}[2m]))', "max": 0.1}]}
    assert validate(ms(replicas=2, rollout={"maxSurge": 0, "steps": [{"weight": 50}]}), HGX) == []
    for runtime in ("capstan", "vllm", "sglang"):
        assert validate(ms(runtime=runtime, rollout={"steps": [{"weight": 10}], "analysis": llm}), HGX) == []
    lora = tj(image=TRAINER, checkpoint={"volume": {"size": "1Gi"}, "restoreFrom": "pretrain-snap"},
              fineTune={"lora": {"rank": 8, "targetModules": ["qkv", "proj"]}})
    assert validate(lora, HGX) == []
    assert validate(tj(fineTune={"method": "full"}), HGX) == []
    # Other images: their model's module names are theirs (q_proj, ...).
    assert validate(tj(fineTune={"lora": {"rank": 8, "targetModules": ["q_proj", "v_proj"]}}), HGX) == []
    adapters = [{"name": "sql", "uri": "pvc://adapters/sql", "rank": 16},
                {"name": "chat", "fromTrainingJob": {"name": "ft"}, "targetModules": ["qkv", "fc"]}]
    assert validate(ms(adapters=adapters), HGX) == []
    assert validate(ms(runtime="vllm", adapters=adapters[:1]), HGX) == []
    assert validate(ms(runtime="sglang", adapters=adapters[:1]), HGX) == []


BAD = [
    # (case, object, field the message must name)
    ("zero workers", tj(workers=0), "spec.workers"),
    ("negative GPUs", tj(gpusPerWorker=-1), "spec.gpusPerWorker"),
    ("unknown enum", tj(topology={"policy": "Sometimes"}), "spec.topology.policy"),
    ("bad quantity", tj(resources={"memory": "lots"}), "spec.resources.memory"),
    ("gpus above largest node", tj(gpusPerWorker=16), "spec.gpusPerWorker"),
    ("tensorParallel above NVLink domain", ms(tensorParallel=16), "spec.tensorParallel"),
    ("weights not increasing", ms(rollout=W50_10), "spec.rollout.steps[1].weight"),
    ("weights equal", ms(rollout={"steps": [{"weight": 20}, {"weight": 20}]}), "steps[1].weight"),
    (
        "unknown template variable",
        ms(runtime="custom", image="registry.example/server:1", argsTemplate="--token={{ secret }}"),
        "spec.argsTemplate",
    ),
    ("custom runtime without image", ms(runtime="custom", argsTemplate="--port={{ port }}"), "image"),
    ("unknown field", tj(wrokers=3), "spec.wrokers"),
    ("required gang wider than NVLink", tj(topology={"policy": "Required"}), "spec.topology.maxDomain"),
    ("bad duration", ms(rollout={"steps": [{"weight": 10, "pause": "2 min"}]}), "steps[0].pause"),
    ("snapshots without a volume", tj(checkpoint={"snapshots": {"everyMinutes": 5}}), "checkpoint"),
    ("two model sources", ms(model={"uri": "s3://b/m", "pvc": {"claimName": "m"}}), "spec.model"),
    (
        "an analysis figure the runtime does not export",
        ms(runtime="tgi", rollout={"steps": [{"weight": 10}], "analysis": {"maxTimeToFirstTokenP95Ms": 500}}),
        "spec.rollout.analysis.maxTimeToFirstTokenP95Ms",
    ),
    (
        "KV-cache analysis on TGI",
        ms(runtime="tgi", rollout={"steps": [{"weight": 10}], "analysis": {"maxKvCacheUsage": 0.9}}),
        "spec.rollout.analysis.maxKvCacheUsage",
    ),
    (
        "a PromQL query that does not parse",
        ms(rollout={"steps": [{"weight": 10}], "analysis": {"queries": [
            {"name": "ok", "query": "sum(up)", "max": 1},
            {"name": "bad", "query": "sum(rate(x[5m])", "max": 1},
        ]}}),
        "spec.rollout.analysis.queries[1].query",
    ),
    (
        "maxSurge without steps",
        ms(replicas=4, rollout={"maxSurge": 0}),
        "spec.rollout: maxSurge",
    ),
    (
        "maxSurge 0 with one replica",
        ms(replicas=1, rollout={"maxSurge": 0, "steps": [{"weight": 50}]}),
        "spec.rollout.maxSurge",
    ),
    (
        "maxSurge with autoscaling",
        ms(autoscaling={"maxReplicas": 4}, rollout={"maxSurge": 0, "steps": [{"weight": 50}]}),
        "spec.rollout.maxSurge",
    ),
    (
        "a query without bounds",
        ms(rollout={"steps": [{"weight": 10}], "analysis": {"queries": [{"name": "q", "query": "up"}]}}),
        "spec.rollout.analysis.queries[0]",
    ),
    ("unknown launcher", tj(launcher="mpirun"), "spec.launcher"),
    ("deepspeed without a script", tj(launcher="deepspeed"), "args"),
    ("torchrun under deepspeed", tj(launcher="deepspeed", command=["torchrun"], args=["t.py"]),
     "spec.command[0]"),
    ("deepspeed flag Capstan owns", tj(launcher="deepspeed", args=["--hostfile=/h", "t.py"]), "spec.args[0]"),
    ("int8 is not a vLLM mode", ms(runtime="vllm", quantization="int8"), "quantization"),
    ("fp8 is not the reference server's", ms(quantization="fp8"), "quantization"),
    ("unknown quantization", ms(runtime="vllm", quantization="int3"), "spec.quantization"),
    # LoRA fine-tuning
    ("lora rank 0", tj(fineTune={"lora": {"rank": 0}}), "spec.fineTune.lora.rank"),
    ("lora rank negative", tj(fineTune={"lora": {"rank": -4}}), "spec.fineTune.lora.rank"),
    ("lora method without lora", tj(fineTune={"method": "lora"}), "spec.fineTune: lora: method lora needs"),
    ("full method with lora", tj(fineTune={"method": "full", "lora": {"rank": 4}}), "spec.fineTune: lora:"),
    ("merge without lora", tj(fineTune={"method": "full", "merge": True}), "spec.fineTune: merge:"),
    ("no target modules", tj(fineTune={"lora": {"rank": 4, "targetModules": []}}),
     "spec.fineTune.lora.targetModules"),
    ("unknown target module of the reference trainer",
     tj(image=TRAINER, fineTune={"lora": {"rank": 4, "targetModules": ["qkv", "q_proj"]}}),
     "spec.fineTune.lora.targetModules[1]: 'q_proj' is no linear layer"),
    # LoRA adapters in serving
    ("adapter named like the base", ms(adapters=[adapter("gpt")]),
     "spec.adapters[0].name: 'gpt' is the base model's served name"),
    ("duplicate adapter names", ms(adapters=[adapter("a"), adapter("a")]),
     "adapters: adapter names must be unique"),
    ("adapters on tgi", ms(runtime="tgi", adapters=[adapter("a")]), "adapters: this runtime serves no LoRA"),
    ("adapters on custom", ms(runtime="custom", image="registry.example/s:1",
                              argsTemplate="--port={{ port }}", adapters=[adapter("a")]),
     "adapters: this runtime serves no LoRA"),
    ("adapter with two sources", ms(adapters=[adapter("a", fromTrainingJob={"name": "t"})]),
     "spec.adapters[0]"),
    ("adapter without a source", ms(adapters=[{"name": "a"}]), "spec.adapters[0]"),
    ("adapter rank 0", ms(adapters=[adapter("a", rank=0)]), "spec.adapters[0].rank"),
    ("adapter rank above vLLM's", ms(runtime="vllm", adapters=[adapter("a", rank=1024)]),
     "spec.adapters[0].rank: vLLM serves LoRA ranks up to 512"),
    ("adapter target the GPT lacks", ms(adapters=[adapter("a", targetModules=["gate_proj"])]),
     "spec.adapters[0].targetModules[0]: 'gate_proj' is no linear layer"),
    ("adapter name not a served name", ms(adapters=[adapter("My Adapter")]), "spec.adapters[0].name"),
]


@pytest.mark.parametrize(("case", "obj", "field"), BAD, ids=[c for c, _, _ in BAD])
def test_bad_input_is_rejected_naming_the_field(case: str, obj: dict[str, Any], field: str) -> None:
    errors = validate(obj, HGX)
    assert errors, f"{case}: admitted"
    assert any(field in e for e in errors), f"{case}: no message names {field}: {errors}"
    for e in errors:
        assert ": " in e, f"{case}: message does not start with a field path: {e}"


def test_weights_message_says_how_to_fix() -> None:
    [err] = validate(ms(rollout={"steps": [{"weight": 50}, {"weight": 10}]}), HGX)
    assert "strictly increase" in err


def test_gpu_message_suggests_a_shape() -> None:
    [err] = validate(tj(workers=2, gpusPerWorker=16), HGX)
    assert "workers: 4, gpusPerWorker: 8" in err


def test_several_problems_reported_together() -> None:
    obj = ms(
        runtime="custom",
        argsTemplate="{{ secret }}",
        rollout={"steps": [{"weight": 50}, {"weight": 10}], "analysis": {"maxErrorRate": 7}},
    )
    errors = validate(obj, HGX)
    text = "\n".join(errors)
    fields = ("spec.rollout.analysis.maxErrorRate", "spec.image", "spec.argsTemplate", "steps[1]")
    for field in fields:
        assert field in text, errors


def test_status_is_not_validated() -> None:
    obj = tj()
    obj["status"] = {"phase": "SomethingNew", "restarts": "x"}
    assert validate(obj, HGX) == []


def test_capacity_checks_skip_without_gpu_nodes_or_with_annotation() -> None:
    big = tj(gpusPerWorker=16)
    assert validate(big, []) == []  # no nodes known
    assert validate(big, [node("cpu-0", 0)]) == []  # GPU pool scaled to zero: job queues
    big["metadata"]["annotations"] = {SKIP_CAPACITY_ANNOTATION: "true"}
    assert validate(big, HGX) == []


def test_cpu_jobs_and_cpu_serving_ignore_gpu_capacity() -> None:
    assert validate(tj(gpusPerWorker=0, workers=64), HGX) == []
    assert validate(ms(gpu=False, tensorParallel=16), HGX) == []


def test_nvlink_clique_spans_nodes() -> None:
    # GB200 NVL72-style: 18 nodes x 4 GPUs in one clique = a 72-GPU NVLink domain.
    nvl = [node(f"gb-{i}", 4, clique="c1") for i in range(18)]
    assert domain_sizes(nvl, DEFAULT_LEVELS, "nvlink") == {"nvlink=c1": 72}
    # a 16-GPU replica is a group of 4 pods of 4 GPUs in the clique; as one pod no node holds it
    assert validate(ms(tensorParallel=16, gpusPerPod=4, runtime="vllm"), nvl) == []
    [one_pod] = validate(ms(tensorParallel=16, runtime="vllm"), nvl)
    assert one_pod.startswith("spec.tensorParallel: 16 GPUs in one pod") and "set gpusPerPod: 4" in one_pod
    assert validate(tj(workers=16, gpusPerWorker=4, topology={"policy": "Required"}), nvl) == []
    errors = validate(tj(workers=19, gpusPerWorker=4, topology={"policy": "Required"}), nvl)
    assert errors and "spec.topology.maxDomain" in errors[0]
    assert any("spec.tensorParallel" in e for e in validate(ms(tensorParallel=72 + 8), nvl))


def test_multi_host_replicas_are_checked_against_nodes_and_domains() -> None:
    hgx = [node(f"n{i}", 8, **{"capstan.dev/rack": "r1"}) for i in range(4)]
    # two pipeline stages, one HGX node each: Preferred (the default) widens to the rack
    assert validate(ms(runtime="vllm", pipelineParallel=2), hgx) == []
    [wide] = validate(ms(runtime="vllm", pipelineParallel=2, topology={"policy": "Required"}), hgx)
    assert wide.startswith("spec.topology.maxDomain: a replica needs 16 GPUs inside one nvlink domain")
    assert validate(ms(runtime="vllm", pipelineParallel=2,
                       topology={"policy": "Required", "maxDomain": "rack"}), hgx) == []
    [big] = validate(ms(runtime="sglang", tensorParallel=4, pipelineParallel=4, gpusPerPod=16), hgx)
    assert big.startswith("spec.gpusPerPod: 16 GPUs in one pod, but the largest node")


def test_multi_host_replicas_need_a_runtime_that_serves_from_a_group() -> None:
    for runtime in ("capstan", "tgi"):
        errors = validate(ms(runtime=runtime, pipelineParallel=2))
        assert any(e.startswith("spec.runtime: a replica of several pods") for e in errors), errors
    [split] = validate(ms(runtime="vllm", tensorParallel=8, gpusPerPod=3))
    assert split.startswith("spec.gpusPerPod: gpusPerPod must divide the replica's GPUs")
    [odd] = validate(ms(runtime="vllm", tensorParallel=6, pipelineParallel=2, gpusPerPod=4))
    assert odd.startswith("spec.gpusPerPod: gpusPerPod below tensorParallel must divide it")
    [cpu] = validate(ms(runtime="vllm", gpu=False, pipelineParallel=2))
    assert cpu.startswith("spec.gpu: a replica of several pods")


def test_autoscaled_multi_host_replicas_need_leaderworkerset() -> None:
    spec = ms(runtime="vllm", pipelineParallel=2, autoscaling={"minReplicas": 1, "maxReplicas": 4})
    [err] = validate(spec, lws=False)
    assert err.startswith("spec.autoscaling: replicas of 2 pods are autoscaled through LeaderWorkerSet")
    assert validate(spec, lws=True) == [] and validate(spec) == []  # unknown: the operator decides


def test_required_at_rack_level_sums_the_rack() -> None:
    rack = [node(f"n{i}", 8, **{"capstan.dev/rack": "r1"}) for i in range(4)]
    job = tj(workers=4, gpusPerWorker=8, topology={"policy": "Required", "maxDomain": "rack"})
    assert validate(job, rack) == []
    job["spec"]["workers"] = 5
    assert "spec.topology.maxDomain" in validate(job, rack)[0]


def test_jinja_fallback_names_unknown_variables() -> None:
    assert _jinja_errors("--model={{ model_path }} {{ port }}") == []
    [err] = _jinja_errors("--x={{ secret }} {{ port }}")
    assert err.startswith("spec.argsTemplate:") and "secret" in err
    [err] = _jinja_errors("{% if %}")
    assert err.startswith("spec.argsTemplate:")


def test_input_not_mutated() -> None:
    obj = ms(rollout={"steps": [{"weight": 50}, {"weight": 10}]})
    before = copy.deepcopy(obj)
    validate(obj, HGX)
    assert obj == before


_LOCATED = re.compile(r"^(\(root\)|(apiVersion|kind|metadata|spec|status)\b[^\n]*?): \S")
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([-1, 0, 10**18, 2**64, "x" * 500, "{{ name|indent(1500000000) }}"]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=20,
)


@st.composite
def _mangled(draw: st.DrawFn) -> Any:
    """A valid TrainingJob or custom ModelServing with one stanza or field replaced by any JSON."""
    obj = copy.deepcopy(draw(st.sampled_from([
        tj(), ms(), ms(runtime="custom", image="s:1", argsTemplate="--port={{ port }}"),
    ])))
    where = draw(st.sampled_from([obj, obj["metadata"], obj["spec"]]))
    where[draw(st.sampled_from(sorted(where)) | st.text(max_size=8))] = draw(_JSON)
    return obj


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_JSON | _mangled())
def test_validate_never_raises_and_names_a_field(body: Any) -> None:
    errors = validate(body, HGX)
    assert isinstance(errors, list)
    for e in errors:
        assert _LOCATED.match(e), e
        assert len(e) < 1000


@pytest.mark.parametrize(
    "body",
    [[], "TrainingJob", 3, None, {"kind": ["TrainingJob"]}, {"kind": "TrainingJob", "metadata": [1]},
     {"kind": "ModelServing", "metadata": {"name": {"a": 1}}, "spec": "x"}],
    ids=["list", "string", "number", "null", "kind-list", "metadata-list", "spec-string"],
)
def test_malformed_objects_get_errors_not_exceptions(body: Any) -> None:
    errors = validate(body, HGX)
    assert errors and all(_LOCATED.match(e) for e in errors), errors
    assert handlers.describe(body if isinstance(body, dict) else {})  # the denial's header never fails
