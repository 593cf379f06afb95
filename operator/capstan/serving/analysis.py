"""Canary analysis: error rate and p99 latency of a revision over a step's window.

Pure core: subtract a baseline scrape (one :class:`PodSample` per pod) from a later one per pod
(a counter that went down means the pod restarted: the later value is the increase, as
Prometheus' ``increase()`` treats resets), sum over pods and judge against
``spec.rollout.analysis``. Scraping and parsing each pod's ``/metrics`` is the Kubernetes shell's
(:mod:`capstan.kube.scrape`); the planner never scrapes, it takes the :class:`AnalysisResult` as
input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Literal

from capstan.api.modelserving import AnalysisSpec

Verdict = Literal["Pass", "Fail", "Inconclusive"]


@dataclass(frozen=True)
class PodSample:
    """Cumulative figures of one pod (or a window's increase, summed over pods)."""

    requests: float = 0.0
    errors: float = 0.0
    # (upper bound, cumulative count), ascending, +Inf last; the latency histogram.
    buckets: tuple[tuple[float, float], ...] = ()

    @property
    def observations(self) -> float:
        """Requests the latency histogram saw."""
        return self.buckets[-1][1] if self.buckets else 0.0


Scrape = dict[str, PodSample]  # pod name → sample


def _minus(after: PodSample, before: PodSample | None) -> PodSample:
    if before is None:
        return after
    reset = (
        after.requests < before.requests
        or after.errors < before.errors
        or after.observations < before.observations
    )
    if reset:
        return after
    old = dict(before.buckets)
    return PodSample(
        after.requests - before.requests,
        after.errors - before.errors,
        tuple((le, c - old.get(le, 0.0)) for le, c in after.buckets),
    )


def _sum(samples: Iterable[PodSample]) -> PodSample:
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for s in samples:
        requests += s.requests
        errors += s.errors
        for le, c in s.buckets:
            buckets[le] = buckets.get(le, 0.0) + c
    return PodSample(requests, errors, tuple(sorted(buckets.items())))


def window(before: Mapping[str, PodSample], after: Mapping[str, PodSample]) -> PodSample:
    """Increase from ``before`` to ``after``, summed over the pods in ``after``.

    A pod only in ``after`` (started during the window) contributes everything it counted.
    """
    return _sum(_minus(s, before.get(pod)) for pod, s in after.items())


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative buckets: linear inside the bucket hit.

    None when the histogram is empty; the highest finite bound when the rank falls in +Inf.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


@dataclass(frozen=True)
class AnalysisResult:
    """The verdict on one revision at one step (``step`` is 0-based)."""

    revision: str
    step: int
    verdict: Verdict
    _: KW_ONLY
    requests: int = 0
    errors: int = 0
    error_rate: float = 0.0
    p99_ms: float | None = None
    message: str = ""
    scrape_errors: list[str] = field(default_factory=list)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def evaluate(revision: str, step: int, win: PodSample, spec: AnalysisSpec) -> AnalysisResult:
    """Judge a window: Inconclusive under ``minRequests``, else Fail on the first threshold crossed."""
    total = round(win.requests)
    errors = round(win.errors)
    rate = win.errors / win.requests if win.requests > 0 else 0.0
    p99 = quantile(0.99, win.buckets)
    p99_ms = p99 * 1000 if p99 is not None else None
    base = AnalysisResult(
        revision, step, "Pass", requests=total, errors=errors, error_rate=rate, p99_ms=p99_ms
    )
    if total < spec.min_requests:
        return _with(base, "Inconclusive", f"{total} of {spec.min_requests} requests needed for a verdict")
    if rate > spec.max_error_rate:
        return _with(
            base, "Fail", f"error rate {_pct(rate)} > {_pct(spec.max_error_rate)} over {total} requests"
        )
    if spec.max_p99_latency_ms is not None and p99_ms is not None and p99_ms > spec.max_p99_latency_ms:
        return _with(
            base, "Fail", f"p99 latency {p99_ms:.0f} ms > {spec.max_p99_latency_ms} ms over {total} requests"
        )
    p99_txt = f", p99 {p99_ms:.0f} ms" if p99_ms is not None else ""
    return _with(base, "Pass", f"error rate {_pct(rate)} over {total} requests{p99_txt}")


def _with(r: AnalysisResult, verdict: Verdict, message: str) -> AnalysisResult:
    return replace(r, verdict=verdict, message=message)


class Baselines:
    """Scrapes taken when a step began, keyed by (ModelServing uid, revision, step).

    In memory on purpose: after an operator restart the baseline is retaken and the step's window
    simply starts later (the verdict holds until ``minRequests`` arrive), which is safe.
    """

    def __init__(self) -> None:
        self._data: dict[tuple[str, str, int], Scrape] = {}

    def get(self, uid: str, revision: str, step: int) -> Scrape | None:
        """The baseline of that step, if taken."""
        return self._data.get((uid, revision, step))

    def put(self, uid: str, revision: str, step: int, scrape: Scrape) -> None:
        """Remember a baseline; older baselines of the same ModelServing are dropped."""
        for key in [k for k in self._data if k[0] == uid]:
            del self._data[key]
        self._data[(uid, revision, step)] = scrape

    def forget(self, uid: str) -> None:
        """Drop everything about one ModelServing (deleted, or no rollout in progress)."""
        for key in [k for k in self._data if k[0] == uid]:
            del self._data[key]
