"""Scraping pods: a revision's for canary analysis (the I/O edge of :mod:`capstan.serving.analysis`),
and a training gang's rank 0 for its checkpoint progress (:mod:`capstan.training.progress`).

:func:`pod_targets` picks the running, ready pods; :func:`scrape_pods` GETs each one's ``/metrics``
(aiohttp) and :func:`parse_sample` turns its Prometheus text into a
:class:`~capstan.serving.analysis.PodSample`, the planner's input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from capstan.fields import dig
from capstan.serving.analysis import PodSample, Scrape
from capstan.serving.runtimes import MetricNames
from capstan.training.progress import Progress, from_gauges

SCRAPE_TIMEOUT_S = 5.0
PROGRESS_TIMEOUT_S = 2.0  # rank 0 answers at once or is busy; the next reconcile tries again


def _is_error(code: str) -> bool:
    # "200", "2xx" (grouped by prometheus-fastapi-instrumentator) are successes; anything else is not.
    return not code.startswith("2")


def _base(name: str) -> str:
    return name.removesuffix("_total")


def parse_sample(text: str, names: MetricNames) -> PodSample:
    """The figures ``names`` points at in one pod's exposition ``text`` (missing series count as 0)."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    hists: dict[str, dict[float, float]] = {}  # LLM histograms, by series name
    gauges: dict[str, float] = {}
    wanted_hists = {f"{n}_bucket": n for n in (*names.ttft, *names.tpot)}
    wanted_gauges = {*names.queue, *names.kv_usage}
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
            elif s.name in wanted_hists:
                le = float(s.labels.get("le", "+Inf"))
                hist = hists.setdefault(wanted_hists[s.name], {})
                hist[le] = hist.get(le, 0.0) + s.value
            elif s.name in wanted_gauges:
                gauges[s.name] = gauges.get(s.name, 0.0) + s.value

    def hist_of(candidates: tuple[str, ...]) -> tuple[tuple[float, float], ...]:
        found = next((hists[n] for n in candidates if n in hists), {})
        return tuple(sorted(found.items()))

    queue = next((gauges[n] for n in names.queue if n in gauges), None)
    kv = next((gauges[n] for n in names.kv_usage if n in gauges), None)
    return PodSample(
        requests,
        errors,
        tuple(sorted(buckets.items())),
        ttft=hist_of(names.ttft),
        tpot=hist_of(names.tpot),
        queue=queue or 0.0,
        queue_pods=int(queue is not None),
        kv_usage=kv or 0.0,
        kv_pods=int(kv is not None),
    )


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
        if not ip or status.get("phase") != "Running" or dig(pod, "metadata", "deletionTimestamp"):
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        if not ready:
            continue
        port = default_port
        for container in dig(pod, "spec", "containers") or []:
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


def parse_progress_metrics(text: str) -> Progress | None:
    """Rank 0's checkpoint progress from its Prometheus exposition ``text`` (None: not reported)."""
    gauges = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("capstan_train_") and not s.labels
    }
    return from_gauges(gauges)


def metrics_url(pod: Mapping[str, Any], default_port: int) -> str | None:
    """``http://{podIP}:{metrics port}/metrics`` of a running pod; None when it has no IP or runs not."""
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or status.get("phase") != "Running" or dig(pod, "metadata", "deletionTimestamp"):
        return None
    port = default_port
    for container in dig(pod, "spec", "containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "metrics":
                port = int(p["containerPort"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


async def scrape_progress(url: str, timeout: float = PROGRESS_TIMEOUT_S) -> Progress | None:
    """GET ``url`` and parse rank 0's progress; None when it cannot be read (the pass goes on)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as sess,
            sess.get(url) as resp,
        ):
            if resp.status != 200:
                return None
            return parse_progress_metrics(await resp.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
