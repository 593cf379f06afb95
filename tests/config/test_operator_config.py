"""The operator's configuration: read once from the environment, typed, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.api.bodies import ms, tj

from capstan.api.loading import parse_object
from capstan.config import ConfigError, OperatorConfig
from capstan.labels import KUEUE_REQUIRED_TOPOLOGY
from capstan.render import render
from capstan.topology import DEFAULT_LEVELS, QueuePolicy, parse_levels


def test_an_empty_environment_is_the_default_configuration() -> None:
    config = OperatorConfig.from_env({})
    assert config == OperatorConfig()
    assert config.topology_levels == DEFAULT_LEVELS and config.queue == QueuePolicy()
    assert config.operator_namespace == "capstan-system" and config.peering_priority is None
    assert (config.webhook_cert_dir, config.webhook_port, config.webhook_addr) == (None, 9443, "0.0.0.0")
    assert config.webhook_managed is None
    assert (config.log_format, config.debug) == ("json", False)
    assert config.placement_cache  # placement reads the watch-fed caches unless told not to
    assert not config.endpoint_pickers  # the chart's routing.endpointPickers turns them on
    assert config.discovery_ttl_s == 60


def test_every_variable_reaches_its_attribute() -> None:
    config = OperatorConfig.from_env({
        "CAPSTAN_TOPOLOGY_LEVELS": "nvlink=a,zone=b",
        "CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS": "60",
        "CAPSTAN_MIGRATION": "off",
        "CAPSTAN_PEERING_PRIORITY": "7",
        "POD_NAMESPACE": "ops",
        "CAPSTAN_WEBHOOK_CERT_DIR": "/certs",
        "CAPSTAN_WEBHOOK_PORT": "10443",
        "CAPSTAN_WEBHOOK_ADDR": "127.0.0.1",
        "CAPSTAN_WEBHOOK_MANAGED": "capstan.dev",
        "CAPSTAN_LOG_FORMAT": "Plain",
        "CAPSTAN_LOG_LEVEL": "debug",
        "CAPSTAN_PLACEMENT_CACHE": "off",
        "CAPSTAN_EPP_IMAGE": "ghcr.io/llm-d/llm-d-router-endpoint-picker:0.0.3",
        "CAPSTAN_ENDPOINT_PICKERS": "on",
        "CAPSTAN_DISCOVERY_TTL_SECONDS": "5",
    })
    assert config.topology_levels.names == ["nvlink", "zone"]
    assert config.queue.reserve_after_s == 60 and not config.queue.migration
    assert config.peering_priority == 7 and config.operator_namespace == "ops"
    assert (config.webhook_cert_dir, config.webhook_port) == ("/certs", 10443)
    assert config.webhook_addr == "127.0.0.1"
    assert config.webhook_managed == "capstan.dev"
    assert (config.log_format, config.debug) == ("plain", True)
    assert config.placement_cache is False
    assert config.epp_image == "ghcr.io/llm-d/llm-d-router-endpoint-picker:0.0.3"
    assert config.endpoint_pickers
    assert config.discovery_ttl_s == 5


@pytest.mark.parametrize(("name", "value", "says"), [
    ("CAPSTAN_TOPOLOGY_LEVELS", "nvlink", "expected name=label.key"),
    ("CAPSTAN_TOPOLOGY_LEVELS", "a=x,a=y", "duplicate topology level names"),
    ("CAPSTAN_LOCALITY_WAIT_FRACTION", "2", "'2' is not a fraction in (0, 1]"),
    ("CAPSTAN_PEERING_PRIORITY", "high", "'high' is not an integer"),
    ("CAPSTAN_WEBHOOK_PORT", "https", "'https' is not an integer"),
    ("CAPSTAN_WEBHOOK_PORT", "70000", "'70000' is not an integer in [0, 65535]"),
    ("CAPSTAN_PLACEMENT_CACHE", "sometimes", "'sometimes' is not on or off"),
    ("CAPSTAN_EPP_IMAGE", "epp image", "is not an image reference"),
    ("CAPSTAN_ENDPOINT_PICKERS", "yes", "'yes' is not on or off"),
    ("CAPSTAN_DISCOVERY_TTL_SECONDS", "0", "'0' is not an integer in [1, 3600]"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        OperatorConfig.from_env({name: value})
    assert str(err.value).startswith(f"{name}: ") and says in str(err.value)


def test_the_operator_stops_at_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from capstan.kube.operator import EXIT_FAILED, run_operator

    monkeypatch.setenv("CAPSTAN_TOPOLOGY_LEVELS", "nvlink")
    with pytest.raises(SystemExit) as stop:
        run_operator([], True, None, True, 0, 0)
    assert stop.value.code == EXIT_FAILED
    assert "CAPSTAN_TOPOLOGY_LEVELS: bad topology level 'nvlink'" in capsys.readouterr().err


def test_render_previews_with_the_operators_configuration() -> None:
    job = parse_object(tj(queueName="team-a", topology={"policy": "Required", "maxDomain": "rack"}))
    serving = parse_object(ms(networkPolicy={}))
    levels = parse_levels("nvlink=a,rack=example.com/rack")
    config = OperatorConfig(topology_levels=levels, operator_namespace="ops")
    objs = render([job, serving], config)
    pod = next(o for o in objs if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"][KUEUE_REQUIRED_TOPOLOGY] == "example.com/rack"
    [policy] = [o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "m"]
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    namespaces = [p.get("namespaceSelector", {}).get("matchLabels") for p in sources]
    assert {"kubernetes.io/metadata.name": "ops"} in namespaces


def test_render_names_a_bad_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from capstan.cli import EXIT_INVALID, main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tj()))
    monkeypatch.setenv("CAPSTAN_WEBHOOK_PORT", "https")
    assert main(["render", "-f", str(path)]) == EXIT_INVALID
    assert "error: CAPSTAN_WEBHOOK_PORT: 'https' is not an integer" in capsys.readouterr().err
