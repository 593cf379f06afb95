"""Every duration and count in a spec is bounded: by the models, and by the CRD schema the API
server enforces. The largest accepted values plan without overflowing datetime arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import cel
import pytest
from tests.api.bodies import ms, tj

from capstan.api.common import MAX_DURATION_S
from capstan.api.conditions import rfc3339
from capstan.api.crdgen import build_crds
from capstan.api.loading import InvalidObject, parse_object
from capstan.api.modelserving import ModelServing, ModelServingStatus, RolloutStatus
from capstan.api.trainingjob import TrainingJob
from capstan.serving.rollout import RevisionState, tick
from capstan.training.lifecycle import plan_trainingjob


def step(pause: str) -> dict[str, Any]:
    return {"rollout": {"steps": [{"weight": 10, "pause": pause}]}}


TOO_BIG = [
    (tj(activeDeadlineSeconds=300_000_000_000), "spec.activeDeadlineSeconds"),
    (tj(ttlSecondsAfterFinished=300_000_000_000), "spec.ttlSecondsAfterFinished"),
    (tj(activeDeadlineSeconds=MAX_DURATION_S + 1), "spec.activeDeadlineSeconds"),
    (tj(priority=2**40), "spec.priority"),
    (tj(priority=-(2**40)), "spec.priority"),
    (tj(workers=100_000), "spec.workers"),
    (tj(gpusPerWorker=1000), "spec.gpusPerWorker"),
    (tj(masterPort=70_000), "spec.masterPort"),
    (tj(failurePolicy={"maxRestarts": 10**9}), "spec.failurePolicy.maxRestarts"),
    (tj(failurePolicy={"backoffSeconds": 10**9}), "spec.failurePolicy.backoffSeconds"),
    (tj(failurePolicy={"nonRetryableExitCodes": [300]}), "spec.failurePolicy.nonRetryableExitCodes[0]"),
    (tj(failurePolicy={"nonRetryableExitCodes": [1] * 300}), "spec.failurePolicy.nonRetryableExitCodes"),
    (
        tj(checkpoint={"volume": {"size": "1Gi"}, "snapshots": {"everyMinutes": 10**9}}),
        "spec.checkpoint.snapshots.everyMinutes",
    ),
    (
        tj(checkpoint={"volume": {"size": "1Gi"}, "snapshots": {"keep": 10**6}}),
        "spec.checkpoint.snapshots.keep",
    ),
    (
        tj(tolerations=[{"key": "k", "tolerationSeconds": 300_000_000_000}]),
        "spec.tolerations[0].tolerationSeconds",
    ),
    (tj(nodeSelector={f"k{i}": "v" for i in range(65)}), "spec.nodeSelector"),
    (tj(network={"nccl": {f"NCCL_X{i}": "1" for i in range(65)}}), "spec.network.nccl"),
    (ms(**step("100000000h")), "spec.rollout.steps[0].pause"),
    (ms(**step("8761h")), "spec.rollout.steps[0].pause"),
    (ms(**step("525601m")), "spec.rollout.steps[0].pause"),
    (ms(rollout={"steps": [{"weight": 1 + i % 99} for i in range(51)]}), "spec.rollout.steps"),
    (ms(rollout={"analysis": {"maxP99LatencyMs": 10**12}}), "spec.rollout.analysis.maxP99LatencyMs"),
    (ms(rollout={"analysis": {"minRequests": 10**12}}), "spec.rollout.analysis.minRequests"),
    (ms(rollout={"analysis": {"maxErrorRate": 2}}), "spec.rollout.analysis.maxErrorRate"),
    (ms(autoscaling={"target": 10**9}), "spec.autoscaling.target"),
    (ms(replicas=10**6), "spec.replicas"),
    (ms(maxModelLen=10**12), "spec.maxModelLen"),
    (ms(tensorParallel=1000), "spec.tensorParallel"),
    (ms(port=99_999), "spec.port"),
]


@pytest.mark.parametrize(("body", "field"), TOO_BIG, ids=[f for _, f in TOO_BIG])
def test_out_of_bounds_value_is_rejected_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(body)
    assert any(e.startswith(f"{field}: ") for e in err.value.errors), err.value.errors


def test_pause_error_says_the_limit() -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(ms(**step("100000000h")))
    assert err.value.errors == [
        "spec.rollout.steps[0].pause: '100000000h' is longer than the maximum of 8760h (one year)"
    ]


#: Upstream's PodSpec (capstan.api.podspec): bounded by the API server's own Pod validation when the
#: operator creates the pods, never used in Capstan's arithmetic and free of CEL rules; its integers
#: are checked non-negative by capstan.api.podtemplate (tests/api/test_template.py).
UPSTREAM_SCHEMA = "spec.template.spec"


def _spec_nodes(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    if path == UPSTREAM_SCHEMA:
        return out
    for name, sub in (node.get("properties") or {}).items():
        out += _spec_nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _spec_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _spec_nodes(node["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("crd", sorted(build_crds()))
def test_crd_bounds_every_number_list_and_map_of_the_spec(crd: str) -> None:
    schema = build_crds()[crd]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _spec_nodes(schema["properties"]["spec"], "spec"):
        if node.get("type") in ("integer", "number"):
            assert "minimum" in node and "maximum" in node, f"{crd} {path}: unbounded number"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{crd} {path}: unbounded list"
        if isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, f"{crd} {path}: unbounded map"


def _pause_schema() -> dict[str, Any]:
    crd = build_crds()["capstan.dev_modelservings.yaml"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    steps = schema["properties"]["spec"]["properties"]["rollout"]["properties"]["steps"]
    return dict(steps["items"]["properties"]["pause"])


@pytest.mark.parametrize(("pause", "ok"), [("1m", True), ("1h30m", True), ("8760h", True),
                                           ("8761h", False), ("100000000h", False)])
def test_crd_rejects_pauses_over_a_year_like_the_model(pause: str, ok: bool) -> None:
    node = _pause_schema()
    assert node["maxLength"] == 32
    (rule,) = node["x-kubernetes-validations"]
    assert bool(cel.evaluate(rule["rule"], {"self": pause})) is ok
    try:
        parse_object(ms(**step(pause)))
        model_ok = True
    except InvalidObject:
        model_ok = False
    assert model_ok is ok


def test_largest_durations_plan_without_overflow() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = parse_object(tj(activeDeadlineSeconds=MAX_DURATION_S, ttlSecondsAfterFinished=MAX_DURATION_S))
    assert isinstance(job, TrainingJob)
    job.status.start_time = "2026-01-01T00:00:00Z"
    plan = plan_trainingjob(job, [], now)
    assert plan.create and plan.requeue_after is not None
    job.status.phase, job.status.completion_time = "Succeeded", "2026-01-01T00:00:00Z"
    assert plan_trainingjob(job, [], now).requeue_after == MAX_DURATION_S

    serving = parse_object(ms(**step("8760h")))
    assert isinstance(serving, ModelServing)
    st = ModelServingStatus(
        stable_revision="a", canary_revision="b", rollout=RolloutStatus(step=0, step_started_at=rfc3339(now))
    )
    observed = {r: RevisionState(r, 1, 1) for r in ("a", "b")}
    t = tick(st, "b", spec=serving.spec.rollout, observed=observed, canary_replicas=lambda w: 1,
             analysis=None, now=now, straight=False)
    assert t.requeue == MAX_DURATION_S and t.message.startswith("step 1/1 (10%): holding until 2027-01-01")
