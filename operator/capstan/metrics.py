"""Prometheus metrics the operator exports (names are a contract with the chart's alerts and dashboard)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "capstan_reconcile",
    "Reconciles by kind and outcome (ok, requeue, error, invalid).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "capstan_reconcile_duration_seconds",
    "Reconcile latency by kind and outcome.",
    ["kind", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
TRAININGJOBS = Gauge(
    "capstan_trainingjobs",
    "TrainingJobs by namespace and phase.",
    ["namespace", "phase"],
    registry=REGISTRY,
)
GANG_RESTARTS = Counter(
    "capstan_gang_restarts",
    "Gang restarts by namespace and reason (WorkerFailed, Preempted, WorkerLost).",
    ["namespace", "reason"],
    registry=REGISTRY,
)
GANG_WAITING_SECONDS = Gauge(
    "capstan_trainingjob_waiting_seconds",
    "Seconds a TrainingJob's gang has been waiting for placement (0 once placed).",
    ["namespace", "trainingjob"],
    registry=REGISTRY,
)
QUEUE_WAIT_SECONDS = Histogram(
    "capstan_gang_queue_wait_seconds",
    "Time from gang creation request to placement.",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
    registry=REGISTRY,
)
GPUS_ALLOCATED = Gauge(
    "capstan_gpus_allocated",
    "GPUs allocated to Capstan gangs by topology level and domain.",
    ["level", "domain"],
    registry=REGISTRY,
)
MODELSERVINGS = Gauge(
    "capstan_modelservings",
    "ModelServings by namespace and phase.",
    ["namespace", "phase"],
    registry=REGISTRY,
)
REVISION_WEIGHT = Gauge(
    "capstan_modelserving_revision_weight",
    "Traffic percent of each live revision.",
    ["namespace", "modelserving", "revision"],
    registry=REGISTRY,
)
ROLLOUTS = Counter(
    "capstan_rollouts",
    "Finished rollouts by namespace and outcome (promoted, rolled_back).",
    ["namespace", "outcome"],
    registry=REGISTRY,
)
ROLLOUT_STEP = Gauge(
    "capstan_modelserving_rollout_step",
    "Current canary step of a rollout in progress (-1 when none).",
    ["namespace", "modelserving"],
    registry=REGISTRY,
)


class PhaseGauge:
    """A "<kind>s by namespace and phase" gauge kept consistent as objects change phase or go.

    It remembers each object's phase and re-exports its namespace's counts on every change,
    every phase in ``phases`` included (0 rather than absent, so dashboards see a drop to zero).
    """

    def __init__(self, gauge: Gauge, phases: Sequence[str]) -> None:
        self.gauge = gauge
        self.phases = tuple(phases)
        self.of: dict[tuple[str, str], str] = {}  # (namespace, name) -> phase

    def set(self, namespace: str, name: str, phase: str) -> None:
        """Object ``namespace/name`` is in ``phase`` now."""
        self.of[(namespace, name)] = phase
        self._export(namespace)

    def forget(self, namespace: str, name: str) -> None:
        """Object ``namespace/name`` is gone."""
        self.of.pop((namespace, name), None)
        self._export(namespace)

    def _export(self, namespace: str) -> None:
        counts = dict.fromkeys(self.phases, 0)
        for (ns, _), phase in self.of.items():
            if ns == namespace:
                counts[phase] = counts.get(phase, 0) + 1
        for phase, n in counts.items():
            self.gauge.labels(namespace, phase).set(n)
