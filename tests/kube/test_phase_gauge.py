"""The per-namespace phase gauge both kinds export (capstan_trainingjobs, capstan_modelservings)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from capstan.metrics import PhaseGauge


def test_counts_follow_objects_through_phases_and_deletion_and_zeros_stay_visible() -> None:
    registry = CollectorRegistry()
    gauge = PhaseGauge(Gauge("things", "Things by phase.", ["namespace", "phase"], registry=registry),
                       ("Pending", "Running"))

    def count(ns: str, phase: str) -> float | None:
        return registry.get_sample_value("things", {"namespace": ns, "phase": phase})

    gauge.set("a", "x", "Pending")
    gauge.set("a", "y", "Pending")
    gauge.set("b", "z", "Running")
    assert (count("a", "Pending"), count("a", "Running"), count("b", "Running")) == (2, 0, 1)
    gauge.set("a", "x", "Running")  # a change of phase moves the object, it does not add one
    assert (count("a", "Pending"), count("a", "Running")) == (1, 1)
    gauge.forget("a", "y")
    gauge.forget("a", "gone-before")  # forgetting an unknown object is harmless
    assert (count("a", "Pending"), count("a", "Running"), count("b", "Running")) == (0, 1, 1)
