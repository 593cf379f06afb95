"""Autoscaling per runtime: each runtime's own load gauge, a KEDA ScaledObject when the cluster
serves KEDA (scale to zero, woken by activationQuery), else an HPA through prometheus-adapter;
minReplicas 0 works with KEDA or is refused, never changed silently; SGLang's server arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml
from sim import Cluster, at, make_ms, run

from capstan.admission.validation import validate
from capstan.api.loading import InvalidObject, parse_object
from capstan.api.modelserving import SCALING_METRICS
from capstan.serving.plan import plan_modelserving
from capstan.serving.runtimes import RUNTIMES, ArgsContext, load_signals

Validate = Callable[[dict[str, Any]], None]
PROM = "http://prometheus.monitoring.svc:9090"
WAKE = 'sum(gateway_pending_requests{service="gpt"})'


def _autoscaler(plan: Any, kind: str) -> dict[str, Any]:
    (obj,) = [o for o in plan.objects if o["kind"] == kind]
    return obj


HPA_METRICS = [
    ("capstan", "concurrency", "capstan_serving_requests_running", "16"),
    ("capstan", "queue", "capstan_serving_requests_waiting", "16"),
    ("vllm", "concurrency", "vllm_num_requests_running", "16"),
    ("vllm", "queue", "vllm_num_requests_waiting", "16"),
    ("vllm", "kvCache", "vllm_gpu_cache_usage_perc", "160m"),
    ("sglang", "queue", "sglang_num_queue_reqs", "16"),
    ("sglang", "kvCache", "sglang_token_usage", "160m"),
    ("tgi", "concurrency", "tgi_batch_current_size", "16"),
    ("tgi", "queue", "tgi_queue_size", "16"),
]


@pytest.mark.parametrize(("runtime", "metric", "name", "value"), HPA_METRICS)
def test_hpa_targets_the_runtimes_own_gauge(runtime: str, metric: str, name: str, value: str,
                                            k8s_valid: Validate) -> None:
    ms = make_ms(runtime=runtime, autoscaling={"minReplicas": 2, "maxReplicas": 6, "metric": metric,
                                               "target": 16})
    _, plan = run(ms, Cluster(), at(0))
    hpa = _autoscaler(plan, "HorizontalPodAutoscaler")
    k8s_valid(hpa)
    (m,) = hpa["spec"]["metrics"]
    assert m["pods"]["metric"]["name"] == name
    assert m["pods"]["target"] == {"type": "AverageValue", "averageValue": value}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert not [o for o in plan.objects if o["kind"] == "ScaledObject"]


def test_every_hpa_metric_is_served_by_a_shipped_adapter_rule() -> None:
    from pathlib import Path

    rules = yaml.safe_load((Path(__file__).parents[2] / "charts/capstan/files/prometheus-adapter-rules.yaml")
                           .read_text())["rules"]
    served = {r["name"]["as"] for r in rules}
    assert {sig.adapter_name for sig in load_signals().values()} == served
    for rt in RUNTIMES.values():
        assert {m for m, _ in rt.load} | {"cpu"} == set(SCALING_METRICS[rt.name]), rt.name


def test_with_keda_a_scaled_object_queries_the_runtimes_gauge_of_the_revision() -> None:
    ms = make_ms(runtime="vllm", autoscaling={"minReplicas": 1, "maxReplicas": 8, "metric": "queue",
                                              "target": 4})
    plan = plan_modelserving(ms, Cluster().observed(), at(0), keda=True, prometheus=PROM)
    so = _autoscaler(plan, "ScaledObject")
    rev = so["metadata"]["name"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": rev}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 8)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["serverAddress"] == PROM
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="ml",pod=~"{rev}-[a-z0-9]+-[a-z0-9]+"}})')
    assert trigger["metadata"]["threshold"] == "4"
    assert not [o for o in plan.objects if o["kind"] == "HorizontalPodAutoscaler"]


def test_with_keda_min_zero_scales_to_zero_and_wakes_on_the_activation_query() -> None:
    ms = make_ms(runtime="sglang", autoscaling={"minReplicas": 0, "maxReplicas": 4, "metric": "kvCache",
                                                "target": 80, "activationQuery": WAKE})
    cluster = Cluster()
    ms, plan = run_keda(ms, cluster, 0)
    so = _autoscaler(plan, "ScaledObject")
    assert so["spec"]["minReplicaCount"] == 0
    load, wake = so["spec"]["triggers"]
    assert load["metadata"]["threshold"] == "0.8" and "sglang:token_usage" in load["metadata"]["query"]
    assert wake["metadata"]["query"] == WAKE and wake["metadata"]["activationThreshold"] == "0"
    # KEDA scales the idle revision to zero: the ModelServing says so, it is not degraded.
    dep = next(o for (k, _), o in cluster.objects.items() if k == "Deployment")
    dep["spec"]["replicas"] = 0
    ms, plan = run_keda(ms, cluster, 30)
    assert ms.status.phase == "Pending" and "scaled to zero by KEDA" in ms.status.message
    degraded = next(c for c in ms.status.conditions if c.type == "Degraded")
    assert degraded.status == "False"


def run_keda(ms: Any, cluster: Cluster, t: float) -> tuple[Any, Any]:
    plan = plan_modelserving(ms, cluster.observed(), at(t), keda=True, prometheus=PROM)
    cluster.apply(plan)
    return ms.model_copy(update={"status": plan.status}), plan


def test_a_canary_keeps_a_replica_while_the_stable_may_idle_at_zero() -> None:
    auto = {"minReplicas": 0, "maxReplicas": 4, "activationQuery": WAKE}
    ms = make_ms(autoscaling=auto, rollout={"steps": [{"weight": 20, "pause": "1m"}]})
    cluster = Cluster()
    ms, _ = run_keda(ms, cluster, 0)
    stable = ms.status.stable_revision
    ms2 = make_ms(generation=2, autoscaling=auto, image="ghcr.io/capstan-dev/capstan-server:0.2.0",
                  rollout={"steps": [{"weight": 20, "pause": "1m"}]}).model_copy(update={"status": ms.status})
    ms2, plan = run_keda(ms2, cluster, 10)
    canary = ms2.status.canary_revision
    assert canary and canary != stable
    mins = {o["metadata"]["name"]: o["spec"]["minReplicaCount"] for o in plan.objects
            if o["kind"] == "ScaledObject"}
    assert mins == {stable: 0, canary: 1}


def test_keda_takes_over_from_capstans_hpa_and_leaves_its_own() -> None:
    ms = make_ms(autoscaling={"minReplicas": 1, "maxReplicas": 4})
    cluster = Cluster()
    ms, _ = run(ms, cluster, at(0))
    rev = ms.status.stable_revision
    keda_hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": f"keda-hpa-{rev}", "namespace": "ml",
                             "labels": {"capstan.dev/modelserving": "gpt", "capstan.dev/revision": rev}}}
    cluster.objects[("HorizontalPodAutoscaler", f"keda-hpa-{rev}")] = keda_hpa
    plan = plan_modelserving(ms, cluster.observed(), at(10), keda=True, prometheus=PROM)
    assert [(d.kind, d.name) for d in plan.deletes] == [("HorizontalPodAutoscaler", rev)]
    assert _autoscaler(plan, "ScaledObject")["metadata"]["name"] == rev
    # KEDA gone again: the ScaledObject goes, an HPA comes back.
    cluster.apply(plan)
    back = plan_modelserving(ms, cluster.observed(), at(20), keda=False)
    assert ("ScaledObject", rev) in [(d.kind, d.name) for d in back.deletes]
    assert _autoscaler(back, "HorizontalPodAutoscaler")["metadata"]["name"] == rev


def test_min_zero_without_keda_is_refused_at_reconcile_not_changed() -> None:
    ms = make_ms(autoscaling={"minReplicas": 0, "maxReplicas": 4, "activationQuery": WAKE})
    _, plan = run(ms, Cluster(), at(0))
    assert plan.status.phase == "Failed"
    assert plan.status.message.startswith("spec.autoscaling.minReplicas: 0 needs KEDA")
    assert not [o for o in plan.objects if o["kind"] in ("Deployment", "HorizontalPodAutoscaler")]


def test_cpu_scaling_with_keda_uses_the_cpu_trigger() -> None:
    ms = make_ms(autoscaling={"metric": "cpu", "target": 60})
    plan = plan_modelserving(ms, Cluster().observed(), at(0), keda=True, prometheus=PROM)
    (trigger,) = _autoscaler(plan, "ScaledObject")["spec"]["triggers"]
    assert trigger == {"type": "cpu", "name": "load", "metricType": "Utilization",
                       "metadata": {"value": "60"}}


def _body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "capstan.dev/v1alpha1", "kind": "ModelServing",
            "metadata": {"name": "gpt", "namespace": "ml"},
            "spec": {"model": {"pvc": {"claimName": "models"}}, **spec}}


def test_admission_refuses_min_zero_without_keda_naming_the_field() -> None:
    body = _body(autoscaling={"minReplicas": 0, "activationQuery": WAKE})
    errors = validate(body, keda=False)
    assert len(errors) == 1 and errors[0].startswith("spec.autoscaling.minReplicas: 0 needs KEDA")
    assert validate(body, keda=True) == []
    assert validate(body) == []  # unknown (no API to ask): the operator decides at reconcile


def test_min_zero_needs_an_activation_query() -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(_body(autoscaling={"minReplicas": 0}))
    assert any(e.startswith("spec.autoscaling: activationQuery: minReplicas 0 needs activationQuery")
               for e in err.value.errors), err.value.errors


@pytest.mark.parametrize("runtime", ["tgi", "capstan"])
def test_a_metric_the_runtime_does_not_export_is_rejected(runtime: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(_body(runtime=runtime, autoscaling={"metric": "kvCache"}))
    (error,) = err.value.errors
    assert error.startswith("spec: autoscaling.metric: the runtime does not export this metric")
    assert f"{runtime}: concurrency, queue, cpu" in error


def test_sglang_arguments_listen_everywhere_and_publish_metrics() -> None:
    rt = RUNTIMES["sglang"]
    args = rt.args(ArgsContext("/model/m", 8000, 4, 8192, "gpt"))
    assert args == ["--model-path", "/model/m", "--served-model-name", "gpt", "--tp-size", "4",
                    "--host", "0.0.0.0", "--port", "8000", "--enable-metrics", "--context-length", "8192"]
    assert rt.command == ("python3", "-m", "sglang.launch_server")
    assert "--context-length" not in rt.args(ArgsContext("/model/m", 8000, 1, None, "gpt"))


def test_sglang_deployment_is_valid(k8s_valid: Validate) -> None:
    _, plan = run(make_ms(runtime="sglang", gpu=True, tensorParallel=2), Cluster(), at(0))
    dep = _autoscaler(plan, "Deployment")
    k8s_valid(dep)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("lmsysorg/sglang:") and c["readinessProbe"]["httpGet"]["path"] == "/health"
