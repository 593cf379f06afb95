"""Canary analysis: Prometheus text → per-pod samples → window deltas → verdict; the scraper."""

from __future__ import annotations

import pytest
from aiohttp import web

from capstan.api.modelserving import AnalysisSpec
from capstan.kube.scrape import Target, parse_sample, pod_targets, scrape_pods
from capstan.serving.analysis import PodSample, evaluate, quantile, window
from capstan.serving.runtimes import CAPSTAN_METRICS, RUNTIMES


def text(ok: int, bad: int, fast: int, slow: int) -> str:
    return (
        "# TYPE capstan_serving_requests counter\n"
        f'capstan_serving_requests_total{{code="200"}} {ok}\n'
        f'capstan_serving_requests_total{{code="503"}} {bad}\n'
        "# TYPE capstan_serving_request_latency_seconds histogram\n"
        f'capstan_serving_request_latency_seconds_bucket{{le="0.5"}} {fast}\n'
        f'capstan_serving_request_latency_seconds_bucket{{le="2.0"}} {fast + slow}\n'
        f'capstan_serving_request_latency_seconds_bucket{{le="+Inf"}} {fast + slow}\n'
        f"capstan_serving_request_latency_seconds_count {fast + slow}\n"
        "capstan_serving_request_latency_seconds_sum 1.0\n"
    )


def test_parse_and_window_with_counter_reset() -> None:
    before = {
        "a": parse_sample(text(100, 0, 100, 0), CAPSTAN_METRICS),
        "b": parse_sample(text(500, 10, 500, 0), CAPSTAN_METRICS),
    }
    after = {
        "a": parse_sample(text(280, 20, 250, 50), CAPSTAN_METRICS),  # +180 ok, +20 errors
        "b": parse_sample(text(5, 0, 5, 0), CAPSTAN_METRICS),  # restarted: counts from zero
        "c": parse_sample(text(10, 0, 10, 0), CAPSTAN_METRICS),
    }  # new pod
    win = window(before, after)
    assert win.requests == 180 + 20 + 5 + 10 and win.errors == 20
    assert dict(win.buckets)[float("inf")] == 150 + 50 + 5 + 10


def test_quantile_matches_histogram_quantile() -> None:
    buckets = ((0.5, 90.0), (2.0, 100.0), (float("inf"), 100.0))
    assert quantile(0.99, buckets) == pytest.approx(0.5 + 1.5 * (99 - 90) / 10)
    assert quantile(0.99, ((0.5, 0.0), (float("inf"), 10.0))) == 0.5  # rank in +Inf: highest bound
    assert quantile(0.99, ()) is None


def test_verdicts() -> None:
    spec = AnalysisSpec(max_error_rate=0.01, max_p99_latency_ms=1500, min_requests=100)
    few = PodSample(50, 0, ((float("inf"), 50),))
    assert evaluate("r", 0, few, spec).verdict == "Inconclusive"
    errors = PodSample(200, 15, ((0.1, 185), (float("inf"), 185)))
    r = evaluate("r", 0, errors, spec)
    assert r.verdict == "Fail" and r.message == "error rate 7.5% > 1.0% over 200 requests"
    slow = PodSample(200, 0, ((0.5, 100), (2.0, 200), (float("inf"), 200)))
    r = evaluate("r", 0, slow, spec)
    assert r.verdict == "Fail" and r.message.startswith("p99 latency 1970 ms > 1500 ms over 200 requests")
    good = PodSample(200, 1, ((0.5, 199), (float("inf"), 199)))
    assert evaluate("r", 0, good, spec).verdict == "Pass"


def test_vllm_and_tgi_metric_names() -> None:
    vllm = (
        "# TYPE http_requests counter\n"
        'http_requests_total{handler="/v1/completions",method="POST",status="2xx"} 90\n'
        'http_requests_total{handler="/v1/completions",method="POST",status="5xx"} 10\n'
        'http_requests_total{handler="/health",method="GET",status="2xx"} 1000\n'
        "# TYPE vllm:e2e_request_latency_seconds histogram\n"
        'vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 90\n'
        'vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 90\n'
    )
    s = parse_sample(vllm, RUNTIMES["vllm"].metrics)
    assert (s.requests, s.errors, s.observations) == (100, 10, 90)  # probes left out
    tgi = (
        "# TYPE tgi_request_count counter\ntgi_request_count 40\n"
        '# TYPE tgi_request_failure counter\ntgi_request_failure{err="overloaded"} 4\n'
        '# TYPE tgi_request_duration histogram\ntgi_request_duration_bucket{le="+Inf"} 36\n'
    )
    s = parse_sample(tgi, RUNTIMES["tgi"].metrics)
    assert (s.requests, s.errors, s.observations) == (40, 4, 36)


def test_pod_targets_only_ready_running_pods() -> None:
    def pod(name: str, ip: str | None, ready: str = "True", phase: str = "Running") -> dict[str, object]:
        return {
            "metadata": {"name": name},
            "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 9001}]}]},
            "status": {"phase": phase, "podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
        }

    got = pod_targets(
        [pod("a", "10.0.0.1"), pod("b", None), pod("c", "10.0.0.3", "False"), pod("d", "fd00::1")],
        "/metrics",
        8000,
    )
    assert got == [Target("a", "http://10.0.0.1:9001/metrics"), Target("d", "http://[fd00::1]:9001/metrics")]


async def test_scrape_pods_over_http() -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=text(10, 1, 11, 0))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        scrape, errors = await scrape_pods(
            [
                Target("ok", f"http://127.0.0.1:{port}/metrics"),
                Target("gone", f"http://127.0.0.1:{port}/nope"),
            ],
            CAPSTAN_METRICS,
        )
    finally:
        await runner.cleanup()
    assert scrape["ok"].requests == 11 and scrape["ok"].errors == 1
    assert errors == ["gone: HTTP 404"]
