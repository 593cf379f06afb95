"""Rendered objects are valid Kubernetes 1.33 (strict schema); runtimes; the args-template sandbox."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sim import Cluster, at, make_ms, run

from capstan.serving.runtimes import ArgsContext, ArgsTemplateError, render_args, validate_args_template

Validate = Callable[[dict[str, Any]], None]
SPECS: dict[str, dict[str, Any]] = {
    "capstan-pvc-autoscaled": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
    "vllm-tp4-gpu": {
        "runtime": "vllm",
        "gpu": True,
        "tensorParallel": 4,
        "maxModelLen": 8192,
        "resources": {"cpu": "16", "memory": "128Gi"},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "tgi-uri-s3": {
        "runtime": "tgi",
        "gpu": True,
        "tensorParallel": 2,
        "maxModelLen": 4096,
        "model": {"uri": "s3://bucket/models/llama"},
        "env": [{"name": "AWS_REGION", "value": "x"}],
    },
    "custom-hf": {
        "runtime": "custom",
        "image": "me/server:1",
        "model": {"uri": "hf://org/model@main"},
        "argsTemplate": "--model={{ model_path }}\n--port={{ port }}\n{% if max_model_len %}"
        "--ctx={{ max_model_len }}{% endif %}",
    },
    "https-cpu-autoscaled-cpu": {
        "model": {"uri": "https://example.com/m.tar.gz"},
        "autoscaling": {"metric": "cpu", "target": 60},
    },
}


@pytest.mark.parametrize("key", sorted(SPECS))
def test_rendered_builtin_objects_validate(key: str, k8s_valid: Validate) -> None:
    _, plan = run(make_ms(**SPECS[key]), Cluster(), at(0))
    kinds = set()
    for obj in plan.objects:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("gateway.networking.k8s.io"):
            continue  # not a built-in kind: kubernetes-validate has no schema for it
        k8s_valid(obj)
    assert {"Deployment", "Service"} <= kinds


def test_snapshot_pvc_and_route_shapes(k8s_valid: Validate) -> None:
    tj = {
        "spec": {"checkpoint": {"volume": {"size": "50Gi"}}},
        "status": {"checkpoints": [{"name": "s1", "readyToUse": True}]},
    }
    ms = make_ms(model={"fromTrainingJob": {"name": "t", "path": "export"}})
    _, plan = run(ms, Cluster(), at(0), gateway_api=True, training_job=tj)
    for obj in plan.objects:
        if obj["kind"] != "HTTPRoute":
            k8s_valid(obj)
    route = next(o for o in plan.objects if o["kind"] == "HTTPRoute")
    assert set(route["spec"]) == {"parentRefs", "rules"}


def _container(spec: dict[str, Any]) -> dict[str, Any]:
    _, plan = run(make_ms(**spec), Cluster(), at(0))
    dep = next(o for o in plan.objects if o["kind"] == "Deployment")
    return dep["spec"]["template"]  # type: ignore[no-any-return]


def test_vllm_args_image_probes_gpus_and_tp_affinity() -> None:
    tpl = _container(SPECS["vllm-tp4-gpu"])
    c = tpl["spec"]["containers"][0]
    assert c["image"].startswith("vllm/vllm-openai:v")
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = c["args"]
    assert args[args.index("--model") + 1] == "/model/gpt"
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--max-model-len") + 1] == "8192"
    assert args[args.index("--port") + 1] == "8000"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    terms = tpl["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    exprs = [t["matchExpressions"][0] for t in terms["nodeSelectorTerms"]]
    assert {"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["3"]} in exprs


def test_tgi_args_and_s3_init_container() -> None:
    tpl = _container(SPECS["tgi-uri-s3"])
    c = tpl["spec"]["containers"][0]
    assert c["image"].startswith("ghcr.io/huggingface/text-generation-inference:")
    args = c["args"]
    assert args[args.index("--model-id") + 1] == "/model"
    assert args[args.index("--num-shard") + 1] == "2"
    assert args[args.index("--max-total-tokens") + 1] == "4096"
    (init,) = tpl["spec"]["initContainers"]
    assert "s5cmd" in init["image"]
    assert {"name": "MODEL_URI", "value": "s3://bucket/models/llama"} in init["env"]
    assert "s3://" not in " ".join(init["command"])  # the URI travels by env, never inside shell text


def test_capstan_runtime_defaults_and_cpu_only() -> None:
    tpl = _container({})
    c = tpl["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/capstan-dev/capstan-server:0.1.0"
    assert c["args"][:4] == ["--model-dir", "/model/gpt", "--port", "8000"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "resources" not in c and "affinity" not in tpl["spec"]
    assert tpl["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_custom_template_renders_one_arg_per_line() -> None:
    ctx = ArgsContext("/model", 9000, 2, None, "gpt")
    tpl = "serve\n  {{ model_path }}  \n\n--tp={{ tensor_parallel }}\n{% if max_model_len %}--len{% endif %}"
    assert render_args(tpl, ctx) == ["serve", "/model", "--tp=2"]
    c = _container(SPECS["custom-hf"])["spec"]["containers"][0]
    assert c["args"] == ["--model=/model", "--port=8000"]
    assert "command" not in c


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{{ ''.__class__ }}", "sandbox"),
        ("{{ model_path.__class__.__mro__ }}", "sandbox"),
        ("{{ ().__class__.__base__.__subclasses__() }}", "sandbox"),
        ("{{ secret_key }}", "unknown variable(s) secret_key"),
        ("{{ range(10) }}", "unknown variable(s) range"),
        ("{{ 'a' * 100000000 }}", "sandbox"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "macro blocks are not allowed"),
        (
            "{% for a in name %}{% for b in name %}{% for c in name %}x{% endfor %}{% endfor %}{% endfor %}",
            "loops nest deeper",
        ),
        ("{% include 'x' %}", "include blocks are not allowed"),
        ("{{ model_path", "syntax error"),
    ],
)
def test_template_sandbox_rejects(template: str, needle: str) -> None:
    errors = validate_args_template(template)
    assert errors and all(e.startswith("spec.argsTemplate: ") for e in errors)
    assert any(needle in e for e in errors), errors


def test_template_error_surfaces_as_failed_status() -> None:
    ms = make_ms(runtime="custom", image="x:1", argsTemplate="{{ nope }}")
    _, plan = run(ms, Cluster(), at(0))
    assert plan.status.phase == "Failed" and not plan.objects
    assert "spec.argsTemplate: unknown variable(s) nope" in plan.status.message


def test_valid_template_has_no_errors() -> None:
    assert validate_args_template("--model\n{{ model_path }}\n--name={{ name | upper }}") == []
    with pytest.raises(ArgsTemplateError):
        render_args("{{ port.__class__ }}", ArgsContext("/m", 1, 1, None, "n"))
