"""Canary analysis: error rate and p99 latency of a revision over a step's window.

Pure core: parse each pod's Prometheus text into a :class:`PodSample`, subtract a baseline scrape
from a later one per pod (a counter that went down means the pod restarted: the later value is the
increase, as Prometheus' ``increase()`` treats resets), sum over pods and judge against
``spec.rollout.analysis``. The only I/O is :func:`scrape_pods` (aiohttp GET of each ready pod's
``/metrics``); the planner never scrapes, it takes the :class:`AnalysisResult` as input.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from capstan.api.modelserving import AnalysisSpec
from capstan.serving.runtimes import MetricNames

Verdict = Literal["Pass", "Fail", "Inconclusive"]
SCRAPE_TIMEOUT_S = 5.0


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


def _is_error(code: str) -> bool:
    # "200", "2xx" (grouped by prometheus-fastapi-instrumentator) are successes; anything else is not.
    return not code.startswith("2")


def _base(name: str) -> str:
    return name.removesuffix("_total")


def parse_sample(text: str, names: MetricNames) -> PodSample:
    """The figures ``names`` points at in one pod's exposition ``text`` (missing series count as 0)."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    # Counters are matched with or without "_total": the parser adds it to a counter sample the
    # exposition wrote without it (TGI's Rust exporter: "tgi_request_count"), and keeps it on
    # samples whose TYPE line named the family without it.
    want_requests, want_errors = _base(names.requests), _base(names.errors)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = _base(s.name)
            if name == want_requests:
                if names.request_filter is not None:
                    label, prefix = names.request_filter
                    if not s.labels.get(label, "").startswith(prefix):
                        continue
                requests += s.value
                if names.code_label and _is_error(s.labels.get(names.code_label, "")):
                    errors += s.value
            elif want_errors and name == want_errors:
                errors += s.value
            elif s.name == f"{names.latency}_bucket":
                le = float(s.labels.get("le", "+Inf"))
                buckets[le] = buckets.get(le, 0.0) + s.value
    return PodSample(requests, errors, tuple(sorted(buckets.items())))


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
    base = AnalysisResult(revision, step, "Pass", total, errors, rate, p99_ms)
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
    return AnalysisResult(r.revision, r.step, verdict, r.requests, r.errors, r.error_rate, r.p99_ms, message)


# --- the I/O edge -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One pod to scrape."""

    pod: str
    url: str


def pod_targets(pods: Iterable[Mapping[str, Any]], metrics_path: str, default_port: int) -> list[Target]:
    """Scrape targets of the running, ready pods among ``pods``: ``http://{podIP}:{http port}{path}``."""
    out = []
    for pod in pods:
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or status.get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        if not ready:
            continue
        port = default_port
        for container in (pod.get("spec") or {}).get("containers") or []:
            for p in container.get("ports") or []:
                if p.get("name") == "http":
                    port = int(p["containerPort"])
        host = f"[{ip}]" if ":" in ip else ip
        out.append(Target(pod["metadata"]["name"], f"http://{host}:{port}{metrics_path}"))
    return out


async def scrape_pods(
    targets: list[Target],
    names: MetricNames,
    session: aiohttp.ClientSession | None = None,
    timeout: float = SCRAPE_TIMEOUT_S,
) -> tuple[Scrape, list[str]]:
    """Scrape every target concurrently; pods that fail are left out and reported as errors."""
    own = session is None
    sess = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def one(t: Target) -> tuple[str, PodSample | str]:
        try:
            async with sess.get(t.url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    return t.pod, f"{t.pod}: HTTP {resp.status}"
                return t.pod, parse_sample(await resp.text(), names)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return t.pod, f"{t.pod}: {type(exc).__name__}: {exc}"

    try:
        results = await asyncio.gather(*(one(t) for t in targets))
    finally:
        if own:
            await sess.close()
    scrape: Scrape = {}
    errors: list[str] = []
    for pod, r in results:
        if isinstance(r, str):
            errors.append(r)
        else:
            scrape[pod] = r
    return scrape, errors


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
