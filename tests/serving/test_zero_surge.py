"""Rollouts on a full cluster: ``rollout.maxSurge`` swaps stable replicas for canary ones step by step.

The in-memory cluster here has room for exactly ``replicas`` server pods: a pod starts only when a
GPU is free, and a replica that is scaled away frees its GPU at once (as its pod stops).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from sim import Cluster, at, make_ms, run

from capstan.serving.analysis import AnalysisResult
from capstan.serving.plan import Observed

STEPS = [{"weight": 25, "pause": "1m"}, {"weight": 50, "pause": "1m"}, {"weight": 75, "pause": "1m"}]


@dataclass
class FullCluster(Cluster):
    """Room for ``capacity`` pods; pods that were running keep their place, new ones wait for room."""

    capacity: int = 4
    running: dict[str, int] = field(default_factory=dict)
    wanted_peak: int = 0  # most replicas the Deployments ever asked for together

    def observed(self, training_job: dict[str, Any] | None = None) -> Observed:
        deps = [o for (k, _), o in self.objects.items() if k == "Deployment"]
        wanted = {d["metadata"]["name"]: d["spec"].get("replicas", 1) for d in deps}
        self.wanted_peak = max(self.wanted_peak, sum(wanted.values()))
        keep = {n: min(self.running.get(n, 0), w) for n, w in wanted.items()}
        free = self.capacity - sum(keep.values())
        for name, want in wanted.items():  # oldest Deployment first
            start = min(want - keep[name], free)
            keep[name] += start
            free -= start
        self.running = keep
        for d in deps:
            name = d["metadata"]["name"]
            d["status"] = {"replicas": wanted[name], "readyReplicas": keep[name]}
        others = [o for (k, _), o in self.objects.items() if k != "Deployment"]
        return Observed(deployments=[dict(d) for d in deps], children=others, training_job=training_job)


def _changed(ms: Any, **spec: Any) -> Any:
    body = {**ms.spec.wire(), **spec}
    return make_ms(generation=ms.metadata.generation + 1, **body).model_copy(update={"status": ms.status})


def _started(rollout: dict[str, Any]) -> tuple[Any, FullCluster, str]:
    c = FullCluster()
    ms, _ = run(make_ms(replicas=4, rollout=rollout), c, at(0))
    ms, _ = run(ms, c, at(1))
    assert ms.status.phase == "Ready" and c.running == {ms.status.stable_revision: 4}
    return ms, c, ms.status.stable_revision


def _pass(ms: Any) -> AnalysisResult:
    rev, step = ms.status.canary_revision, ms.status.rollout.step
    return AnalysisResult(rev, step, "Pass", requests=100, message="ok")


def test_without_max_surge_a_full_cluster_never_starts_the_canary() -> None:
    ms, c, stable = _started({"steps": STEPS})
    ms, _ = run(_changed(ms, image="server:2"), c, at(10))
    for t in range(11, 40):
        ms, _ = run(ms, c, at(t))
    canary = ms.status.canary_revision
    assert canary and c.running == {stable: 4, canary: 0}
    assert "0/1 replicas ready" in ms.status.message


@pytest.mark.parametrize("surge", [0, 1])
def test_max_surge_swaps_replicas_step_by_step_then_promotes(surge: int) -> None:
    ms, c, stable = _started({"steps": STEPS, "maxSurge": surge})
    c.capacity = 4 + surge
    ms, _ = run(_changed(ms, image="server:2"), c, at(10))
    canary = ms.status.canary_revision
    assert canary
    seen: list[tuple[int, int]] = []
    t = 11
    while ms.status.canary_revision == canary and t < 2000:
        due = ms.status.rollout and ms.status.rollout.step_started_at
        ms, _ = run(ms, c, at(t), analysis=_pass(ms) if due else None)
        pair = (c.running.get(stable, 0), c.running.get(canary, 0))
        if not seen or seen[-1] != pair:
            seen.append(pair)
        assert sum(c.running.values()) <= 4 + surge and c.wanted_peak <= 4 + surge
        t += 30
    assert ms.status.stable_revision == canary, ms.status.message
    for _ in range(3):  # the old revision gives its last replicas back; the new one fills up
        ms, _ = run(ms, c, at(t))
        t += 1
    assert c.running == {canary: 4} and stable not in c.names("Deployment")
    if surge == 0:
        # 25 % → 1 of 4, 50 % → 2, 75 % → 3: one stable replica stopped for each canary one started.
        # (stable, canary) running: the promotion then hands the canary the last stable replica.
        assert seen == [(3, 1), (2, 2), (1, 3)]


def test_weights_follow_the_swapped_replicas() -> None:
    ms, c, stable = _started({"steps": STEPS, "maxSurge": 0})
    ms, _ = run(_changed(ms, image="server:2"), c, at(10))
    canary = ms.status.canary_revision
    ms, _ = run(ms, c, at(11))
    ms, _ = run(ms, c, at(12))
    assert {r.name: r.weight for r in ms.status.revisions} == {stable: 75, canary: 25}
    assert c.running == {stable: 3, canary: 1}
