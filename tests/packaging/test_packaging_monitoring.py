"""Alert rules (promtool check + unit tests for every alert) and the Grafana dashboard's metric names."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from capstan_pkg import CHART, ROOT, run, tool

ALERTS = CHART / "files" / "alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "packaging" / "alerts_test.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
METRIC = re.compile(r"\b(capstan_[a-z0-9_]+)\b")
needs_promtool = pytest.mark.skipif(
    tool("promtool") is None, reason="promtool missing: run scripts/install-tools.sh"
)

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _series_names(registry: Any) -> set[str]:
    names = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def exported_metrics() -> set[str]:
    """Every series name the operator and the reference workloads can export."""
    from capstan.metrics import REGISTRY

    names = _series_names(REGISTRY)
    try:
        from capstan_workloads.metrics import TrainMetrics
        from capstan_workloads.serve.metrics import ServingMetrics

        names |= _series_names(TrainMetrics().registry) | _series_names(ServingMetrics().registry)
    except ImportError:  # workloads not importable here: fall back to their source text
        for path in (ROOT / "workloads").rglob("*.py"):
            text = path.read_text()
            prefix = re.search(r'PREFIX\s*=\s*"([a-z_]+)"', text)
            for m in re.finditer(r'(?:Gauge|Counter|Histogram)\(\s*f?"([^"]+)"', text):
                name = m.group(1).replace("{PREFIX}", prefix.group(1) if prefix else "")
                names |= {name, f"{name}_total", f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def test_contract_metrics_exist() -> None:
    names = exported_metrics()
    for required in (
        "capstan_serving_requests_total",
        "capstan_serving_request_latency_seconds_bucket",
        "capstan_serving_time_to_first_token_seconds_bucket",
        "capstan_serving_requests_running",
        "capstan_serving_kv_blocks_used",
        "capstan_train_step",
        "capstan_train_loss",
        "capstan_train_tokens_per_second",
        "capstan_trainingjobs",
        "capstan_gang_restarts_total",
    ):
        assert required in names


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return [p for p in out if p.get("type") != "row"]


def test_dashboard_queries_use_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    names = exported_metrics()
    panels = _panels(dash)
    assert panels
    titles = {p["title"] for p in panels}
    for wanted in ("TrainingJobs by phase", "GPUs allocated by domain", "Queue wait", "Gang restarts",
                   "Rollout weights", "Serving latency"):
        assert wanted in titles
    for panel in panels:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
        used = {m for e in exprs for m in METRIC.findall(e)}
        assert used, f"panel {panel['title']!r} names no capstan metric"
        unknown = used - names
        assert not unknown, f"panel {panel['title']!r} uses metrics nobody exports: {unknown}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_use_exported_metrics() -> None:
    names = exported_metrics()
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            unknown = set(METRIC.findall(rule["expr"])) - names
            assert not unknown, f"{rule['alert']}: {unknown}"


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    for wanted in ("CapstanGangStuckWaiting", "CapstanGangRestartStorm", "CapstanRolloutStuck",
                   "CapstanRolloutRolledBack", "CapstanServingErrorRate", "CapstanOperatorDown"):
        assert wanted in alerts
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing = {
        t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")
    }
    quiet = {
        t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t.get("exp_alerts")
    }
    assert alerts <= firing, f"alerts never shown firing: {alerts - firing}"
    assert alerts <= quiet, f"alerts never shown quiet: {alerts - quiet}"


@needs_promtool
def test_promtool_check_rules() -> None:
    out = run([tool("promtool") or "promtool", "check", "rules", str(ALERTS)])
    assert "SUCCESS" in out


@needs_promtool
def test_promtool_test_rules() -> None:
    out = run([tool("promtool") or "promtool", "test", "rules", str(ALERT_TESTS)])
    assert "SUCCESS" in out


def _runtime_series() -> dict[str, dict[str, str]]:
    """Each inference runtime's own series the alerts and dashboard must read (from its table)."""
    from capstan.serving.runtimes import RUNTIMES

    out = {}
    for name, rt in RUNTIMES.items():
        if name == "capstan":
            continue
        m = rt.metrics
        out[name] = {"latency": f"{m.latency}_bucket", "requests": m.requests,
                     "running": rt.load_signal("concurrency").series,  # type: ignore[union-attr]
                     "waiting": rt.load_signal("queue").series}  # type: ignore[union-attr]
        if m.errors:
            out[name]["errors"] = m.errors
    return out


def test_alerts_read_each_runtimes_own_series() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    latency = next(r["expr"] for r in rules if r["alert"] == "CapstanServingLatencyHigh")
    errors = {r["labels"].get("runtime"): r["expr"] for r in rules
              if r["alert"] == "CapstanServingErrorRate"}
    assert set(errors) == {None, "vllm", "sglang", "tgi"}
    for runtime, series in _runtime_series().items():
        assert series["latency"] in latency, runtime
        assert series["requests"] in errors[runtime], runtime
        if "errors" in series:
            assert series["errors"] in errors[runtime], runtime


def test_dashboard_shows_each_runtimes_own_series() -> None:
    panels = _panels(json.loads(DASHBOARD.read_text()))
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for runtime, series in _runtime_series().items():
        for what in ("latency", "running", "waiting"):
            assert series[what] in exprs, (runtime, what)


def test_chart_ships_prometheus_adapter_rules_for_every_load_signal() -> None:
    from capstan_pkg import docs, helm_template

    from capstan.serving.runtimes import load_signals

    if tool("helm") is None:
        pytest.skip("helm missing: run scripts/install-tools.sh")
    assert not [d for d in docs(helm_template()) if d["kind"] == "ConfigMap"
                and d["metadata"]["name"].endswith("prometheus-adapter-rules")]
    values = {"autoscaling": {"adapterRules": {"enabled": True, "namespace": "monitoring"},
                              "prometheusUrl": "http://prom.monitoring.svc:9090"}}
    rendered = docs(helm_template(values))
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith(
        "prometheus-adapter-rules")]
    assert cm["metadata"]["namespace"] == "monitoring"
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    signals = load_signals()
    assert {r["name"]["as"] for r in rules} == {s.adapter_name for s in signals.values()}
    for rule in rules:
        series = rule["name"]["matches"].strip("^$")
        assert series in signals and f'__name__="{series}"' in rule["seriesQuery"]
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                  "pod": {"resource": "pod"}}
    (operator,) = [d for d in rendered if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CAPSTAN_PROMETHEUS_URL"] == "http://prom.monitoring.svc:9090"
