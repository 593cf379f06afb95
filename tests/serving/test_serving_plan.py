"""The ModelServing planner driven over time against an in-memory cluster (no API server)."""

from __future__ import annotations

from typing import Any

from sim import Cluster, at, make_ms, run

from capstan.serving.analysis import AnalysisResult
from capstan.serving.plan import Observed, analysis_due, plan_modelserving, refused

STEPS = {
    "steps": [{"weight": 10, "pause": "1m"}, {"weight": 50, "pause": "2m"}],
    "analysis": {"maxErrorRate": 0.01, "minRequests": 100},
}


def verdict(ms: Any, step: int, v: str, msg: str = "", requests: int = 200) -> AnalysisResult:
    return AnalysisResult(ms.status.canary_revision, step, v, requests=requests, message=msg)  # type: ignore[arg-type]


def weights(ms: Any) -> dict[str, int]:
    return {r.name: r.weight for r in ms.status.revisions}


def cond(ms: Any, type_: str) -> Any:
    return next(c for c in ms.status.conditions if c.type == type_)


def started(replicas: int = 4, **spec: Any) -> tuple[Any, Cluster, str]:
    """A ModelServing whose first revision is stable and ready."""
    c = Cluster()
    ms = make_ms(replicas=replicas, rollout=STEPS, **spec)
    ms, plan = run(ms, c, at(0))
    assert plan.status.stable_revision and not plan.status.canary_revision
    ms, _ = run(ms, c, at(1))
    assert ms.status.phase == "Ready"
    return ms, c, ms.status.stable_revision


def changed(ms: Any, **spec: Any) -> Any:
    """The same ModelServing with a new spec (generation + 1), status kept."""
    body = {**ms.spec.wire(), **spec}
    new = make_ms(generation=ms.metadata.generation + 1, **body)
    return new.model_copy(update={"status": ms.status})


def test_create_renders_deployment_services_and_no_canary() -> None:
    c = Cluster()
    ms, plan = run(make_ms(replicas=3), c, at(0))
    kinds = sorted(o["kind"] for o in plan.objects)
    assert kinds == ["Deployment", "Service", "Service"]
    rev = plan.status.stable_revision
    assert c.names("Service") == {"gpt", rev}
    assert c.replicas(rev) == 3
    assert plan.status.url == "http://gpt.ml.svc"
    assert plan.status.selector == "capstan.dev/modelserving=gpt"
    assert next(e.reason for e in plan.events) == "RevisionCreated"
    assert plan.status.phase == "Progressing" and plan.requeue_after
    ms, plan = run(ms, c, at(1))
    assert plan.status.phase == "Ready" and plan.status.replicas == 3
    assert cond(ms, "Ready").status == "True" and cond(ms, "Progressing").status == "False"
    assert cond(ms, "RolledBack").status == "False" and cond(ms, "Degraded").status == "False"
    assert plan.requeue_after is None and plan.objects and not plan.deletes


def test_autoscaling_renders_hpa_per_revision() -> None:
    c = Cluster()
    _ms, plan = run(make_ms(autoscaling={"minReplicas": 2, "maxReplicas": 8, "target": 16}), c, at(0))
    (hpa,) = [o for o in plan.objects if o["kind"] == "HorizontalPodAutoscaler"]
    dep = next(o for o in plan.objects if o["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]  # the HPA owns it
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 8
    metric = hpa["spec"]["metrics"][0]
    assert metric["pods"]["metric"]["name"] == "capstan_serving_requests_running"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "16"}
    cpu = make_ms(autoscaling={"metric": "cpu", "target": 70})
    _, plan = run(cpu, Cluster(), at(0))
    (hpa,) = [o for o in plan.objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["resource"]["target"] == {
        "type": "Utilization",
        "averageUtilization": 70,
    }


def test_scaling_does_not_make_a_revision() -> None:
    ms, c, stable = started()
    ms, plan = run(changed(ms, replicas=7), c, at(5))
    assert plan.status.stable_revision == stable and plan.status.canary_revision is None
    assert c.replicas(stable) == 7


def test_canary_steps_weights_over_time_then_promote() -> None:
    ms, c, stable = started(replicas=4)
    ms = changed(ms, image="server:2")
    ms, plan = run(ms, c, at(10))  # canary created, step 1 pending until it is ready
    canary = ms.status.canary_revision
    assert canary and canary != stable
    assert "RolloutStarted" in [e.reason for e in plan.events]
    assert weights(ms) == {stable: 100, canary: 0}
    assert c.replicas(canary) == 1  # ceil(4 x 10%), min 1
    ms, plan = run(ms, c, at(11))  # canary ready → step 1 starts
    assert weights(ms) == {stable: 90, canary: 10}
    assert "CanaryStep" in [e.reason for e in plan.events]
    assert plan.requeue_after == 60
    assert analysis_due(ms, at(30)) is not None and not analysis_due(ms, at(30)).verdict_needed  # type: ignore[union-attr]
    ms, plan = run(ms, c, at(71))  # pause over, no verdict yet → waits
    assert weights(ms)[canary] == 10 and "analysis" in ms.status.message
    ms, plan = run(ms, c, at(72), analysis=verdict(ms, 0, "Inconclusive", "12 of 100 requests"))
    assert weights(ms)[canary] == 10 and "holding" in ms.status.message
    ms, plan = run(ms, c, at(80), analysis=verdict(ms, 0, "Pass", "error rate 0.0%"))
    assert "AnalysisPassed" in [e.reason for e in plan.events]
    assert ms.status.rollout.step == 1 and weights(ms)[canary] == 10  # scale up first
    assert c.replicas(canary) == 2  # ceil(4 x 50%)
    ms, plan = run(ms, c, at(81))  # ready → 50%
    assert weights(ms) == {stable: 50, canary: 50}
    assert c.replicas(stable) == 2
    ms, plan = run(ms, c, at(81 + 121), analysis=verdict(ms, 1, "Pass", "ok"))
    assert plan.outcome == "promoted"
    assert ms.status.stable_revision == canary and ms.status.canary_revision is None
    assert c.replicas(canary) == 4
    assert "Promoted" in [e.reason for e in plan.events]
    # the old revision retires once the new stable is fully ready
    ms, plan = run(ms, c, at(205))
    assert weights(ms) == {canary: 100}
    assert stable not in c.names("Deployment") and stable not in c.names("Service")
    assert "RevisionRemoved" in [e.reason for e in plan.events]
    assert ms.status.phase == "Ready" and cond(ms, "RolledBack").reason == "Promoted"


def test_failing_analysis_rolls_back_and_is_not_retried() -> None:
    ms, c, stable = started(replicas=4)
    ms = changed(ms, image="server:bad")
    ms, _ = run(ms, c, at(10))
    ms, _ = run(ms, c, at(11))
    canary = ms.status.canary_revision
    fail = AnalysisResult(canary, 0, "Fail", requests=200, errors=15, error_rate=0.075,
                          message="error rate 7.5% > 1.0% over 200 requests")
    ms, plan = run(ms, c, at(72), analysis=fail)
    assert plan.outcome == "rolled_back"
    rb = cond(ms, "RolledBack")
    assert rb.status == "True" and rb.reason == "AnalysisFailed"
    assert rb.message.endswith("error rate 7.5% > 1.0% over 200 requests at step 1 (weight 10%)")
    assert ms.status.failed_revisions == [canary] and ms.status.canary_revision is None
    assert weights(ms) == {stable: 100}
    assert canary not in c.names("Deployment") and canary not in c.names("Service")
    assert c.replicas(stable) == 4
    assert any(e.type == "Warning" and e.reason == "RolledBack" for e in plan.events)
    # same spec again: no new canary
    ms, plan = run(ms, c, at(100))
    assert ms.status.canary_revision is None and canary not in c.names("Deployment")
    assert "not retried" in ms.status.message
    # a spec change makes a new revision that rolls out
    ms, plan = run(changed(ms, image="server:fixed"), c, at(120))
    assert ms.status.canary_revision not in (None, canary)
    assert cond(ms, "RolledBack").status == "False"


def test_progress_deadline_rolls_back() -> None:
    ms, c, _stable = started()
    ms, _ = run(changed(ms, image="server:crashloop"), c, at(10))
    canary = ms.status.canary_revision
    c.objects[("Deployment", canary)]["status"] = {}
    obs = c.observed()
    for d in obs.deployments:
        if d["metadata"]["name"] == canary:
            d["status"] = {
                "conditions": [
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
                ]
            }
    from capstan.serving.plan import plan_modelserving

    plan = plan_modelserving(ms, obs, at(20))
    assert plan.status.failed_revisions == [canary]
    assert (
        cond(ms.model_copy(update={"status": plan.status}), "RolledBack").reason == "ProgressDeadlineExceeded"
    )


def test_no_steps_promotes_when_ready() -> None:
    c = Cluster()
    ms, _ = run(make_ms(replicas=2), c, at(0))
    stable = ms.status.stable_revision
    ms, _ = run(ms, c, at(1))
    ms, plan = run(changed(ms, image="server:2"), c, at(5))
    canary = ms.status.canary_revision
    assert c.replicas(canary) == 2 and weights(ms)[canary] == 0
    ms, plan = run(ms, c, at(6))
    assert plan.outcome == "promoted" and ms.status.stable_revision == canary
    ms, plan = run(ms, c, at(7))
    assert stable not in c.names("Deployment")


def test_spec_reverted_during_rollout_aborts_canary() -> None:
    ms, c, _stable = started()
    original = ms.spec.wire()
    ms, _ = run(changed(ms, image="server:2"), c, at(10))
    canary = ms.status.canary_revision
    reverted = make_ms(generation=3, **original).model_copy(update={"status": ms.status})
    ms, plan = run(reverted, c, at(12))
    assert ms.status.canary_revision is None and "RolloutAborted" in [e.reason for e in plan.events]
    assert canary not in c.names("Deployment")


def test_gateway_api_route_weights() -> None:
    c = Cluster()
    ms = make_ms(replicas=4, rollout=STEPS)
    ms, plan = run(ms, c, at(0), gateway_api=True)
    ms, plan = run(ms, c, at(1), gateway_api=True)
    assert ms.status.rollout.traffic == "gateway"
    stable = ms.status.stable_revision
    ms, _ = run(changed(ms, image="server:2"), c, at(5), gateway_api=True)
    ms, plan = run(ms, c, at(6), gateway_api=True)
    canary = ms.status.canary_revision
    (route,) = [o for o in plan.objects if o["kind"] == "HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    backends = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert backends == {stable: 90, canary: 10}
    assert route["spec"]["parentRefs"][0] == {"group": "", "kind": "Service", "name": "gpt", "port": 80}
    # Gateway API gone → the route is deleted, traffic falls back to replicas
    ms, plan = run(ms, c, at(7))
    assert ms.status.rollout.traffic == "replicas"
    assert [(d.kind, d.name) for d in plan.deletes] == [("HTTPRoute", "gpt")]


def test_from_trainingjob_new_snapshot_rolls_out_new_revision() -> None:
    def tj(*snaps: tuple[str, bool]) -> dict[str, Any]:
        return {
            "spec": {"checkpoint": {"volume": {"size": "100Gi", "storageClassName": "fast"}}},
            "status": {"checkpoints": [{"name": n, "readyToUse": r} for n, r in snaps]},
        }

    c = Cluster()
    ms = make_ms(replicas=2, model={"fromTrainingJob": {"name": "train"}}, rollout=STEPS)
    ms, plan = run(ms, c, at(0), training_job=tj(("train-1", False)))
    assert ms.status.phase == "Pending" and "waiting for a ready checkpoint" in ms.status.message
    assert not plan.objects
    ms, plan = run(ms, c, at(1), training_job=tj(("train-1", True)))
    rev = ms.status.stable_revision
    (pvc,) = [o for o in plan.objects if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == f"{rev}-model"
    assert pvc["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "train-1",
    }
    dep = next(o for o in plan.objects if o["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--model-dir", "/model/export"]
    ms, plan = run(ms, c, at(2), training_job=tj(("train-1", True)))
    assert ms.status.phase == "Ready" and ms.status.revisions[0].model == "snapshot:train/train-1"
    ms, plan = run(ms, c, at(3), training_job=tj(("train-1", True), ("train-2", True)))
    assert ms.status.canary_revision not in (None, rev)
    assert f"{ms.status.canary_revision}-model" in c.names("PersistentVolumeClaim")


def test_long_and_odd_names_stay_dns_safe() -> None:
    import re

    name = "a" * 250
    _, plan = run(make_ms(name=name, replicas=1), Cluster(), at(0))
    for obj in plan.objects:
        n = obj["metadata"]["name"]
        assert len(n) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n), n
        for v in obj["metadata"]["labels"].values():
            assert len(v) <= 63
    dotted = make_ms(name="llama.v3", replicas=1)
    _, plan = run(dotted, Cluster(), at(0))
    assert all("." not in o["metadata"]["name"] for o in plan.objects)


def test_refusal_stays_on_show_while_applies_are_retried() -> None:
    ms = make_ms(replicas=1)
    plan = plan_modelserving(ms, Observed(), at(0))
    refused_status = refused(ms, plan.status, "Deployment gpt-x", "invalid image", at(0))
    assert cond(ms.model_copy(update={"status": refused_status}), "Progressing").reason == "CreateFailed"
    assert refused_status.message == "the API server refused Deployment gpt-x: invalid image"
    ms = ms.model_copy(update={"status": refused_status})
    retry = plan_modelserving(ms, Observed(), at(30))
    assert retry.objects and retry.status == refused_status  # nothing to write while it is refused
    assert retry.on_applied is not None
    assert next(x for x in retry.on_applied.conditions if x.type == "Progressing").reason != "CreateFailed"
    # A new spec is judged afresh.
    fresh = plan_modelserving(changed(ms, replicas=2), Observed(), at(31))
    assert fresh.on_applied is None
