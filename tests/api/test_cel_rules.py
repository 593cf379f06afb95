"""The CEL rules in the CRDs agree with the Python checks, on valid and invalid samples."""

from __future__ import annotations

from typing import Any

import cel
import pytest
from pydantic import ValidationError

from capstan.api.common import ApiModel, Toleration
from capstan.api.modelserving import AdapterSpec, AutoscalingSpec, ModelServingSpec, ModelSource
from capstan.api.trainingjob import CheckpointVolume, FailureRule, FineTuneSpec, TrainingJobSpec

TJ = {"image": "img", "workers": 2}
MS_MODEL = {"uri": "s3://bucket/model"}
ADAPTER = {"name": "a", "uri": "pvc://adapters/a"}

SAMPLES: list[tuple[type[ApiModel], dict[str, Any], bool]] = [
    (TrainingJobSpec, TJ, True),
    (TrainingJobSpec, {**TJ, "checkpoint": {"snapshots": {"keep": 2}}}, False),
    (TrainingJobSpec, {**TJ, "checkpoint": {"volume": {"size": "1Gi"}, "snapshots": {}}}, True),
    (TrainingJobSpec, {**TJ, "checkpoint": {"restoreFrom": "snap-1"}}, False),
    (TrainingJobSpec, {**TJ, "preemptible": True}, False),
    (TrainingJobSpec, {**TJ, "preemptible": True, "checkpoint": {"volume": {"size": "1Gi"}}}, True),
    (TrainingJobSpec, {**TJ, "preemptible": True,
                       "checkpoint": {"volume": {"size": "1Gi"}, "resume": "None"}}, False),
    (TrainingJobSpec, {**TJ, "checkpoint": {"volume": {"size": "1Gi"}, "restoreFrom": "snap-1"}}, True),
    (TrainingJobSpec, {**TJ, "network": {"rdma": "required", "rdmaResource": "rdma/hca"}}, False),
    (TrainingJobSpec, {**TJ, "gpusPerWorker": 8, "network": {"rdma": "required"}}, False),
    (
        TrainingJobSpec,
        {**TJ, "gpusPerWorker": 8, "network": {"rdma": "required", "rdmaResource": "rdma/hca"}},
        True,
    ),
    (TrainingJobSpec, {**TJ, "gpusPerWorker": 8, "procsPerWorker": 4}, False),
    (TrainingJobSpec, {**TJ, "gpusPerWorker": 0, "procsPerWorker": 4}, True),
    (FailureRule, {"action": "FailJob", "exitCodes": [3]}, True),
    (FailureRule, {"action": "RestartGang", "reasons": ["OOMKilled"]}, True),
    (FailureRule, {"action": "RestartGangAndIgnoreMaxRestarts", "messagePattern": "Xid"}, True),
    (FailureRule, {"action": "FailJob"}, False),
    (CheckpointVolume, {"size": "10Gi"}, True),
    (CheckpointVolume, {"claimName": "mine"}, True),
    (CheckpointVolume, {}, False),
    (CheckpointVolume, {"size": "10Gi", "claimName": "mine"}, False),
    (ModelSource, {"uri": "s3://b/m"}, True),
    (ModelSource, {"pvc": {"claimName": "models"}}, True),
    (ModelSource, {}, False),
    (ModelSource, {"uri": "s3://b/m", "fromTrainingJob": {"name": "gpt"}}, False),
    (AutoscalingSpec, {"minReplicas": 2, "maxReplicas": 4}, True),
    (AutoscalingSpec, {"minReplicas": 5, "maxReplicas": 4}, False),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "custom", "image": "srv"}, False),
    (
        ModelServingSpec,
        {"model": MS_MODEL, "runtime": "custom", "image": "srv", "argsTemplate": "--port={{ port }}"},
        True,
    ),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "vllm"}, True),
    (ModelServingSpec, {"model": MS_MODEL, "adapters": [ADAPTER, {**ADAPTER, "name": "b"}]}, True),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "sglang", "adapters": [ADAPTER]}, True),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "tgi", "adapters": [ADAPTER]}, False),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "tgi", "adapters": []}, True),
    (ModelServingSpec, {"model": MS_MODEL, "adapters": [ADAPTER, ADAPTER]}, False),
    # multi-host replicas: whole pods, tensor-parallel groups over whole pods, runtimes that serve groups
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "vllm", "tensorParallel": 8, "pipelineParallel": 2},
     True),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "sglang", "tensorParallel": 16, "gpusPerPod": 4}, True),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "vllm", "tensorParallel": 8, "gpusPerPod": 3}, False),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "vllm", "tensorParallel": 6, "pipelineParallel": 2,
                        "gpusPerPod": 4}, False),
    (ModelServingSpec, {"model": MS_MODEL, "pipelineParallel": 2}, False),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "tgi", "tensorParallel": 4, "gpusPerPod": 2}, False),
    (ModelServingSpec, {"model": MS_MODEL, "runtime": "vllm", "gpu": False, "pipelineParallel": 2}, False),
    (ModelServingSpec, {"model": MS_MODEL, "tensorParallel": 4, "gpusPerPod": 4}, True),
    (AdapterSpec, ADAPTER, True),
    (AdapterSpec, {"name": "a", "fromTrainingJob": {"name": "ft"}}, True),
    (AdapterSpec, {"name": "a"}, False),
    (AdapterSpec, {**ADAPTER, "fromTrainingJob": {"name": "ft"}}, False),
    (FineTuneSpec, {"lora": {"rank": 4}}, True),
    (FineTuneSpec, {"method": "full"}, True),
    (FineTuneSpec, {}, False),
    (FineTuneSpec, {"method": "full", "lora": {"rank": 4}}, False),
    (FineTuneSpec, {"lora": {"rank": 4}, "merge": True}, True),
    (FineTuneSpec, {"method": "full", "merge": True}, False),
    (Toleration, {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}, True),
    (Toleration, {"key": "gpu", "value": "a"}, True),
    (Toleration, {"operator": "Exists"}, True),
    (Toleration, {"key": "gpu", "effect": "NoExecute", "tolerationSeconds": 30}, True),
    (Toleration, {"effect": "NoSchedule"}, False),
    (Toleration, {"key": "", "operator": "Equal"}, False),
    (Toleration, {"key": "gpu", "operator": "Exists", "value": "a"}, False),
    (Toleration, {"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 30}, False),
]


def _cel_ok(model: type[ApiModel], sample: dict[str, Any]) -> tuple[bool, list[str]]:
    failed = [r.message for r in model.rules if not cel.evaluate(r.cel, {"self": sample})]
    return not failed, failed


@pytest.mark.parametrize(("model", "sample", "valid"), SAMPLES)
def test_cel_and_python_agree(model: type[ApiModel], sample: dict[str, Any], valid: bool) -> None:
    cel_valid, messages = _cel_ok(model, sample)
    assert cel_valid is valid, messages
    if valid:
        model.model_validate(sample)
    else:
        with pytest.raises(ValidationError) as err:
            model.model_validate(sample)
        assert any(m in str(err.value) for m in messages)


@pytest.mark.parametrize(("model", "sample"), [(m, s) for m, s, ok in SAMPLES if ok])
def test_cel_holds_after_api_server_defaulting(model: type[ApiModel], sample: dict[str, Any]) -> None:
    # The API server applies schema defaults before CEL runs; valid objects must stay valid.
    assert _cel_ok(model, model.model_validate(sample).wire())[0]


def test_every_rule_compiles() -> None:
    models = (TrainingJobSpec, CheckpointVolume, FailureRule, ModelSource, AutoscalingSpec, ModelServingSpec,
              Toleration)
    for model in models:
        for rule in model.rules:
            cel.compile(rule.cel)


#: Each immutable field of a TrainingJob: a stored spec, an update changing the field.
CKPT = {"volume": {"size": "1Gi"}}
IMMUTABLE_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    ".checkpoint.volume": ({**TJ, "checkpoint": CKPT}, {**TJ, "checkpoint": {"volume": {"size": "2Gi"}}}),
    ".checkpoint.restoreFrom": (
        {**TJ, "checkpoint": {**CKPT, "restoreFrom": "a"}},
        {**TJ, "checkpoint": {**CKPT, "restoreFrom": "b"}},
    ),
    ".masterPort": ({**TJ, "masterPort": 29500}, {**TJ, "masterPort": 29600}),
    ".queueName": ({**TJ, "queueName": "team-a"}, {**TJ}),
}


def test_every_immutable_field_has_a_case() -> None:
    assert set(IMMUTABLE_CASES) == {i.field for i in TrainingJobSpec.immutable}


@pytest.mark.parametrize("field", list(IMMUTABLE_CASES))
def test_immutable_field_cel_refuses_a_change_and_admission_agrees(field: str) -> None:
    from capstan.admission.validation import validate

    (rule,) = [i for i in TrainingJobSpec.immutable if i.field == field]
    before, after = (TrainingJobSpec.model_validate(s).wire() for s in IMMUTABLE_CASES[field])
    assert cel.evaluate(rule.cel, {"self": before, "oldSelf": before})
    assert cel.evaluate(rule.cel, {"self": after, "oldSelf": after})
    assert not cel.evaluate(rule.cel, {"self": after, "oldSelf": before})
    other = {**before, "workers": 5, "image": "img:2"}  # other fields change freely
    assert cel.evaluate(rule.cel, {"self": other, "oldSelf": before})

    def obj(spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "capstan.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "j"},
                "spec": spec}

    assert validate(obj(after), old=obj(before)) == [f"spec{field}: {rule.message}"]
    assert validate(obj(other), old=obj(before)) == []
