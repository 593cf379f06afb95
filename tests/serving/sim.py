"""A tiny in-memory cluster for driving the ModelServing planner over time (no API server)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from capstan.api.modelserving import ModelServing
from capstan.serving.analysis import AnalysisResult
from capstan.serving.plan import Observed, ServingPlan, plan_modelserving

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def make_ms(name: str = "gpt", generation: int = 1, **spec: Any) -> ModelServing:
    """A ModelServing with a uid; ``spec`` in wire (camelCase) form, model defaults to a PVC."""
    body = {"model": {"pvc": {"claimName": "models", "path": "gpt"}}, "gpu": False, **spec}
    return ModelServing.model_validate(
        {"metadata": {"name": name, "namespace": "ml", "uid": "u-1", "generation": generation}, "spec": body}
    )


@dataclass
class Cluster:
    """Objects by (kind, name); Deployments become ready at once unless ``hold`` names them."""

    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    hold: set[str] = field(default_factory=set)
    events: list[Any] = field(default_factory=list)

    def observed(self, training_job: dict[str, Any] | None = None) -> Observed:
        deps = [o for (k, _), o in self.objects.items() if k == "Deployment"]
        for d in deps:
            n = d["spec"].get("replicas", 1)
            d["status"] = {"replicas": n, "readyReplicas": 0 if d["metadata"]["name"] in self.hold else n}
        others = [o for (k, _), o in self.objects.items() if k != "Deployment"]
        return Observed(
            deployments=copy.deepcopy(deps), children=copy.deepcopy(others), training_job=training_job
        )

    def apply(self, plan: ServingPlan) -> None:
        for obj in plan.objects:
            key = (obj["kind"], obj["metadata"]["name"])
            old = self.objects.get(key)
            new = copy.deepcopy(obj)
            if old is not None and obj["kind"] == "Deployment" and "replicas" not in obj["spec"]:
                new["spec"]["replicas"] = old["spec"].get("replicas", 1)
            self.objects[key] = new
        for obj in plan.objects:  # what the HPA controller would do: keep replicas within its bounds
            if obj["kind"] == "HorizontalPodAutoscaler":
                dep = self.objects.get(("Deployment", obj["spec"]["scaleTargetRef"]["name"]))
                if dep is not None:
                    n = dep["spec"].get("replicas", 1)
                    lo, hi = obj["spec"]["minReplicas"], obj["spec"]["maxReplicas"]
                    dep["spec"]["replicas"] = min(max(n, lo), hi)
        for name, n in plan.scale.items():
            self.objects[("Deployment", name)]["spec"]["replicas"] = n
        for ref in plan.deletes:
            self.objects.pop((ref.kind, ref.name), None)
        self.events.extend(plan.events)

    def names(self, kind: str) -> set[str]:
        return {n for k, n in self.objects if k == kind}

    def replicas(self, name: str) -> int:
        return int(self.objects[("Deployment", name)]["spec"].get("replicas", 1))


def run(
    ms: ModelServing,
    cluster: Cluster,
    now: datetime,
    analysis: AnalysisResult | None = None,
    gateway_api: bool = False,
    training_job: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[ModelServing, ServingPlan]:
    """One reconcile: plan, apply, return the ModelServing with the new status (``options``: more
    keyword arguments of :func:`plan_modelserving`)."""
    plan = plan_modelserving(
        ms, cluster.observed(training_job), now, gateway_api=gateway_api, analysis=analysis, **options
    )
    cluster.apply(plan)
    return ms.model_copy(update={"status": plan.status}), plan


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)
