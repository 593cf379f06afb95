"""Canary analysis: error rate, latency and the LLM figures of a revision over a step's window.

Pure core: subtract a baseline scrape (one :class:`PodSample` per pod) from a later one per pod
(a counter that went down means the pod restarted: the later value is the increase, as
Prometheus' ``increase()`` treats resets), sum over pods and judge against
``spec.rollout.analysis``: error rate, p99 end-to-end latency, p95 time to first token and per
output token (histograms), and the mean queue depth and KV-cache use of the canary's pods (gauges,
read at the end of the window). With ``maxRegression`` the stable revision's window is judged
beside the canary's: its latencies are the yardstick. Scraping and parsing each pod's
``/metrics`` is the Kubernetes shell's (:mod:`capstan.kube.scrape`); the planner never scrapes, it
takes the :class:`AnalysisResult` as input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Literal

from capstan.api.modelserving import AnalysisSpec

Verdict = Literal["Pass", "Fail", "Inconclusive"]
Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last


@dataclass(frozen=True)
class PodSample:
    """Figures of one pod (or a window's increase, summed over pods).

    Counters and histograms are cumulative; ``queue`` and ``kv_usage`` are gauges, summed over the
    ``queue_pods`` and ``kv_pods`` pods that exported them.
    """

    requests: float = 0.0
    errors: float = 0.0
    buckets: Buckets = ()  # end-to-end request latency, seconds
    ttft: Buckets = ()  # time to first token, seconds
    tpot: Buckets = ()  # time per output token, seconds
    queue: float = 0.0
    queue_pods: int = 0
    kv_usage: float = 0.0
    kv_pods: int = 0

    @property
    def observations(self) -> float:
        """Requests the latency histogram saw."""
        return _count(self.buckets)


def _count(buckets: Buckets) -> float:
    return buckets[-1][1] if buckets else 0.0


Scrape = dict[str, PodSample]  # pod name → sample


def _sub(after: Buckets, before: Buckets) -> Buckets:
    old = dict(before)
    return tuple((le, c - old.get(le, 0.0)) for le, c in after)


def _minus(after: PodSample, before: PodSample | None) -> PodSample:
    if before is None:
        return after
    reset = (
        after.requests < before.requests
        or after.errors < before.errors
        or any(_count(a) < _count(b) for a, b in
               ((after.buckets, before.buckets), (after.ttft, before.ttft), (after.tpot, before.tpot)))
    )
    if reset:
        return after
    return replace(
        after,
        requests=after.requests - before.requests,
        errors=after.errors - before.errors,
        buckets=_sub(after.buckets, before.buckets),
        ttft=_sub(after.ttft, before.ttft),
        tpot=_sub(after.tpot, before.tpot),
    )


def _add(into: dict[float, float], buckets: Buckets) -> None:
    for le, c in buckets:
        into[le] = into.get(le, 0.0) + c


def _sum(samples: Iterable[PodSample]) -> PodSample:
    requests = errors = queue = kv = 0.0
    queue_pods = kv_pods = 0
    hist: tuple[dict[float, float], dict[float, float], dict[float, float]] = ({}, {}, {})
    for s in samples:
        requests += s.requests
        errors += s.errors
        queue += s.queue
        kv += s.kv_usage
        queue_pods += s.queue_pods
        kv_pods += s.kv_pods
        for into, buckets in zip(hist, (s.buckets, s.ttft, s.tpot), strict=True):
            _add(into, buckets)
    lat, ttft, tpot = (tuple(sorted(h.items())) for h in hist)
    return PodSample(requests, errors, lat, ttft, tpot, queue, queue_pods, kv, kv_pods)


def window(before: Mapping[str, PodSample], after: Mapping[str, PodSample]) -> PodSample:
    """Increase from ``before`` to ``after``, summed over the pods in ``after``.

    A pod only in ``after`` (started during the window) contributes everything it counted.
    """
    return _sum(_minus(s, before.get(pod)) for pod, s in after.items())


def quantile(q: float, buckets: Buckets) -> float | None:
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
    ttft_p95_ms: float | None = None
    tpot_p95_ms: float | None = None
    queue: float | None = None
    kv_usage: float | None = None
    message: str = ""
    scrape_errors: list[str] = field(default_factory=list)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _ms(q: float, buckets: Buckets) -> float | None:
    v = quantile(q, buckets)
    return v * 1000 if v is not None else None


@dataclass(frozen=True)
class Figures:
    """What a window says about one revision, in the units thresholds use."""

    requests: int
    errors: int
    error_rate: float
    p99_ms: float | None
    ttft_p95_ms: float | None
    tpot_p95_ms: float | None
    queue: float | None  # mean per pod that exports it
    kv_usage: float | None

    @classmethod
    def of(cls, win: PodSample) -> Figures:
        """The figures of a window."""
        return cls(
            requests=round(win.requests),
            errors=round(win.errors),
            error_rate=win.errors / win.requests if win.requests > 0 else 0.0,
            p99_ms=_ms(0.99, win.buckets),
            ttft_p95_ms=_ms(0.95, win.ttft),
            tpot_p95_ms=_ms(0.95, win.tpot),
            queue=win.queue / win.queue_pods if win.queue_pods else None,
            kv_usage=win.kv_usage / win.kv_pods if win.kv_pods else None,
        )


# (label in messages, Figures attribute, AnalysisSpec threshold attribute)
_LATENCIES = (
    ("p99 latency", "p99_ms", "max_p99_latency_ms"),
    ("p95 time to first token", "ttft_p95_ms", "max_time_to_first_token_p95_ms"),
    ("p95 time per output token", "tpot_p95_ms", "max_time_per_output_token_p95_ms"),
)


def evaluate(
    revision: str, step: int, win: PodSample, spec: AnalysisSpec, stable: PodSample | None = None
) -> AnalysisResult:
    """Judge a window: Inconclusive under ``minRequests``, else Fail on the first threshold crossed.

    ``stable``: the stable revision's window over the same time, for ``maxRegression`` (without it,
    or with fewer than ``minRequests`` there, the comparison cannot be made and the step holds).
    """
    f = Figures.of(win)
    base = AnalysisResult(
        revision, step, "Pass", requests=f.requests, errors=f.errors, error_rate=f.error_rate,
        p99_ms=f.p99_ms, ttft_p95_ms=f.ttft_p95_ms, tpot_p95_ms=f.tpot_p95_ms, queue=f.queue,
        kv_usage=f.kv_usage,
    )
    total = f.requests
    if total < spec.min_requests:
        return _with(base, "Inconclusive", f"{total} of {spec.min_requests} requests needed for a verdict")
    over = f"over {total} requests"
    if f.error_rate > spec.max_error_rate:
        return _with(base, "Fail", f"error rate {_pct(f.error_rate)} > {_pct(spec.max_error_rate)} {over}")
    for label, attr, limit_attr in _LATENCIES:
        value, limit = getattr(f, attr), getattr(spec, limit_attr)
        if limit is not None and value is not None and value > limit:
            return _with(base, "Fail", f"{label} {value:.0f} ms > {limit} ms {over}")
    if spec.max_queue_depth is not None and f.queue is not None and f.queue > spec.max_queue_depth:
        return _with(base, "Fail", f"{f.queue:.1f} requests waiting per pod > {spec.max_queue_depth:g}")
    kv_limit = spec.max_kv_cache_usage
    if kv_limit is not None and f.kv_usage is not None and f.kv_usage > kv_limit:
        return _with(base, "Fail", f"KV cache {_pct(f.kv_usage)} in use > {_pct(kv_limit)}")
    parts = [f"error rate {_pct(f.error_rate)} {over}"]
    parts += [f"{label} {v:.0f} ms" for label, attr, _ in _LATENCIES if (v := getattr(f, attr)) is not None]
    if spec.max_regression is not None:
        verdict, message = _against_stable(f, stable, spec)
        if verdict != "Pass":
            return _with(base, verdict, message)
        parts.append(message)
    return _with(base, "Pass", ", ".join(parts))


def _against_stable(f: Figures, stable: PodSample | None, spec: AnalysisSpec) -> tuple[Verdict, str]:
    assert spec.max_regression is not None
    s = Figures.of(stable) if stable is not None else None
    if s is None or s.requests < spec.min_requests:
        got = s.requests if s is not None else 0
        return "Inconclusive", (f"the stable revision answered {got} of {spec.min_requests} requests needed "
                                "to compare with it")
    worst = 0.0
    for label, attr, _ in _LATENCIES:
        mine, theirs = getattr(f, attr), getattr(s, attr)
        if mine is None or theirs is None or theirs <= 0:
            continue
        ratio = mine / theirs - 1
        worst = max(worst, ratio)
        if ratio > spec.max_regression:
            return "Fail", (f"{label} {mine:.0f} ms is {_pct(ratio)} above the stable revision's "
                            f"{theirs:.0f} ms (at most {_pct(spec.max_regression)})")
    return "Pass", f"at most {_pct(worst)} slower than the stable revision"


def with_queries(result: AnalysisResult, verdict: str, message: str) -> AnalysisResult:
    """``result`` (a Pass) combined with the PromQL queries' ``verdict`` and ``message``."""
    if result.verdict != "Pass":
        return result
    if verdict == "Pass":
        return replace(result, message=f"{result.message}; queries: {message}")
    return replace(result, verdict="Fail" if verdict == "Fail" else "Inconclusive", message=message)


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
