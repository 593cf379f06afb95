"""Canary analysis on LLM figures (time to first token, time per output token, queue depth, KV-cache
use), canary against stable, and PromQL queries: from each runtime's own metric names to a verdict."""

from __future__ import annotations

import math

import pytest

from capstan.api.modelserving import ANALYSIS_FIGURES, AnalysisSpec
from capstan.kube.scrape import parse_sample
from capstan.serving.analysis import PodSample, evaluate, window, with_queries
from capstan.serving.promql import QueryOutcome, judge_queries, query_problem, render_query, scalar_of
from capstan.serving.runtimes import CAPSTAN_METRICS, RUNTIMES, MetricNames


def hist(name: str, fast: int, slow: int, fast_le: float, slow_le: float) -> str:
    """A histogram with ``fast`` observations under ``fast_le`` s and ``slow`` under ``slow_le``."""
    return (
        f"# TYPE {name} histogram\n"
        f'{name}_bucket{{le="{fast_le}"}} {fast}\n'
        f'{name}_bucket{{le="{slow_le}"}} {fast + slow}\n'
        f'{name}_bucket{{le="+Inf"}} {fast + slow}\n'
        f"{name}_count {fast + slow}\n{name}_sum 1.0\n"
    )


def gauge(name: str, value: float) -> str:
    return f"# TYPE {name} gauge\n{name} {value}\n"


def capstan_pod(
    requests: int, ttft_slow: int = 0, tpot_slow: int = 0, waiting: float = 0, kv: float = 0
) -> str:
    return (
        "# TYPE capstan_serving_requests counter\n"
        f'capstan_serving_requests_total{{code="200"}} {requests}\n'
        + hist("capstan_serving_request_latency_seconds", requests, 0, 1.0, 4.0)
        + hist("capstan_serving_time_to_first_token_seconds", requests - ttft_slow, ttft_slow, 0.1, 1.0)
        + hist("capstan_serving_time_per_output_token_seconds", requests - tpot_slow, tpot_slow, 0.02, 0.2)
        + gauge("capstan_serving_requests_waiting", waiting)
        + gauge("capstan_serving_kv_cache_usage", kv)
    )


def test_the_reference_server_figures_are_read_and_windowed() -> None:
    before = {"a": parse_sample(capstan_pod(100, waiting=9, kv=0.9), CAPSTAN_METRICS)}
    after = {
        "a": parse_sample(capstan_pod(200, ttft_slow=50, waiting=2, kv=0.5), CAPSTAN_METRICS),
        "b": parse_sample(capstan_pod(100, waiting=4, kv=0.7), CAPSTAN_METRICS),  # started in the window
    }
    win = window(before, after)
    assert win.requests == 200
    # Histograms are increases (50 of the 200 window requests were slow); gauges are read at the
    # end of the window and averaged over the pods.
    assert dict(win.ttft)[1.0] == 200 and dict(win.ttft)[0.1] == 150
    assert (win.queue / win.queue_pods, round(win.kv_usage / win.kv_pods, 3)) == (3.0, 0.6)


@pytest.mark.parametrize(
    ("spec", "verdict", "says"),
    [
        ({"maxTimeToFirstTokenP95Ms": 500}, "Fail", "p95 time to first token"),
        ({"maxTimeToFirstTokenP95Ms": 1000}, "Pass", "p95 time to first token"),
        ({"maxTimePerOutputTokenP95Ms": 30}, "Pass", "p95 time per output token"),
        ({"maxTimePerOutputTokenP95Ms": 10}, "Fail", "p95 time per output token"),
        ({"maxQueueDepth": 2}, "Fail", "3.0 requests waiting per pod > 2"),
        ({"maxQueueDepth": 3}, "Pass", ""),
        ({"maxKvCacheUsage": 0.5}, "Fail", "KV cache 60.0% in use > 50.0%"),
        ({"maxKvCacheUsage": 0.95}, "Pass", ""),
    ],
)
def test_each_llm_threshold_decides(spec: dict[str, float], verdict: str, says: str) -> None:
    # 20% of requests had a slow first token (0.1-1 s): the p95 is in the slow bucket, ~775 ms.
    pods = {
        "a": parse_sample(capstan_pod(100, ttft_slow=20, waiting=2, kv=0.5), CAPSTAN_METRICS),
        "b": parse_sample(capstan_pod(100, ttft_slow=20, waiting=4, kv=0.7), CAPSTAN_METRICS),
    }
    result = evaluate("rev", 0, window({}, pods), AnalysisSpec.model_validate({"minRequests": 10, **spec}))
    assert result.verdict == verdict, result.message
    assert says in result.message
    assert result.ttft_p95_ms is not None and 700 < result.ttft_p95_ms < 850
    assert result.tpot_p95_ms is not None and result.tpot_p95_ms <= 20


def test_canary_against_stable() -> None:
    spec = AnalysisSpec.model_validate({"minRequests": 10, "maxRegression": 0.2})
    stable = window({}, {"s": parse_sample(capstan_pod(100, ttft_slow=10), CAPSTAN_METRICS)})
    slower = window({}, {"c": parse_sample(capstan_pod(100, ttft_slow=40), CAPSTAN_METRICS)})
    same = window({}, {"c": parse_sample(capstan_pod(100, ttft_slow=10), CAPSTAN_METRICS)})

    failed = evaluate("rev", 0, slower, spec, stable=stable)
    assert failed.verdict == "Fail"
    assert "p95 time to first token" in failed.message and "above the stable revision's" in failed.message
    passed = evaluate("rev", 0, same, spec, stable=stable)
    assert passed.verdict == "Pass" and "at most 0.0% slower than the stable revision" in passed.message
    # No traffic on stable in the window: nothing to compare with, the step holds.
    idle = evaluate("rev", 0, same, spec, stable=PodSample())
    assert idle.verdict == "Inconclusive" and "stable revision answered 0 of 10" in idle.message


def test_each_runtime_exports_the_figures_admission_allows() -> None:
    """ANALYSIS_FIGURES (what admission accepts) matches the series each runtime table names."""
    table = {"ttft": "ttft", "tpot": "tpot", "queue": "queue", "kvCache": "kv_usage"}
    for name, rt in RUNTIMES.items():
        names: MetricNames = rt.metrics
        exported = {fig for fig, attr in table.items() if getattr(names, attr)}
        assert exported == set(ANALYSIS_FIGURES[name]), name


def test_vllm_renamed_series_are_read_whichever_the_version_exports() -> None:
    names = RUNTIMES["vllm"].metrics
    old = hist("vllm:time_per_output_token_seconds", 10, 0, 0.02, 0.2)
    old += gauge("vllm:gpu_cache_usage_perc", 0.4)
    new = hist("vllm:inter_token_latency_seconds", 10, 0, 0.02, 0.2) + gauge("vllm:kv_cache_usage_perc", 0.3)
    for text, kv in ((old, 0.4), (new, 0.3)):
        sample = parse_sample(text, names)
        assert dict(sample.tpot)[0.02] == 10 and (sample.kv_usage, sample.kv_pods) == (kv, 1)


def test_a_pod_without_the_gauges_does_not_count_in_their_mean() -> None:
    names = RUNTIMES["tgi"].metrics
    sample = parse_sample(gauge("tgi_queue_size", 5), names)
    assert (sample.queue, sample.queue_pods, sample.kv_pods) == (5, 1, 0)


# ---- PromQL ----------------------------------------------------------------------------------------


def test_a_query_template_fills_in_the_revision_and_parses() -> None:
    template = (
        'histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
        '{namespace="{{ namespace }}", pod=~"{{revision}}-.*"}[5m])))'
    )
    assert query_problem(template) is None
    out = render_query(template, {"namespace": "ml", "name": "m", "revision": "m-1", "stableRevision": "m-0"})
    assert 'namespace="ml"' in out and 'pod=~"m-1-.*"' in out


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("sum(rate(x[5m])", "not valid PromQL"),
        ("rate(x[5m]) >", "not valid PromQL"),
        ('up{pod="{{ pod }}"}', "unknown variable 'pod'"),
        ("{% for x in y %}up{% endfor %}", "only {{ variable }} placeholders"),
    ],
)
def test_bad_queries_are_named(template: str, problem: str) -> None:
    found = query_problem(template)
    assert found is not None and problem in found


def test_query_verdicts() -> None:
    queries = [("errors", None, 0.01), ("throughput", 5.0, None)]
    ok = {"errors": QueryOutcome("errors", 0.001), "throughput": QueryOutcome("throughput", 9.0)}
    assert judge_queries(queries, ok) == ("Pass", "errors = 0.001, throughput = 9")
    high = {**ok, "errors": QueryOutcome("errors", 0.05)}
    assert judge_queries(queries, high) == ("Fail", "query errors = 0.05 > 0.01")
    low = {**ok, "throughput": QueryOutcome("throughput", 1.0)}
    assert judge_queries(queries, low) == ("Fail", "query throughput = 1 < 5")
    nodata = {**ok, "throughput": QueryOutcome("throughput", problem="no data")}
    assert judge_queries(queries, nodata) == ("Inconclusive", "query throughput: no data")
    nan = {**ok, "errors": QueryOutcome("errors", math.nan)}
    assert judge_queries(queries, nan)[0] == "Inconclusive"


def test_prometheus_answers_become_one_number_or_a_reason() -> None:
    one = {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "0.25"]}]}
    assert scalar_of(one).value == 0.25
    assert scalar_of({"resultType": "scalar", "result": [1.0, "3"]}).value == 3.0
    assert scalar_of({"resultType": "vector", "result": []}).problem == "no data"
    two = scalar_of({"resultType": "vector", "result": [{"value": [1, "1"]}, {"value": [1, "2"]}]})
    assert two.value is None and "aggregate it" in two.problem
    assert "unexpected result type 'matrix'" in scalar_of({"resultType": "matrix", "result": []}).problem


def test_queries_only_turn_a_pass_into_fail_or_hold() -> None:
    pods = {"a": parse_sample(capstan_pod(100), CAPSTAN_METRICS)}
    passed = evaluate("rev", 0, window({}, pods), AnalysisSpec.model_validate({"minRequests": 10}))
    assert with_queries(passed, "Fail", "query e = 1 > 0").verdict == "Fail"
    held = with_queries(passed, "Inconclusive", "query e: no data")
    assert (held.verdict, held.message) == ("Inconclusive", "query e: no data")
    assert with_queries(passed, "Pass", "e = 0").message.endswith("; queries: e = 0")
    failed = evaluate("rev", 0, window({}, pods), AnalysisSpec.model_validate({"minRequests": 500}))
    assert with_queries(failed, "Pass", "e = 0") == failed
