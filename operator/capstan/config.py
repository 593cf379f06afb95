"""The operator's configuration: one typed, frozen object, read from the environment once.

:meth:`OperatorConfig.from_env` is the only place the operator reads its environment. ``capstan
operator`` builds the object once at start-up, before kopf starts, and passes it down: kopf's
handlers find it in ``memo.config``; the planners get the values they need as arguments (they stay
pure). A value that cannot be used stops the operator at start-up with a :class:`ConfigError` that
names the variable. The Helm chart and the kustomize base set these variables on the operator's
Deployment (``charts/capstan/values.yaml`` says which value sets which).

=======================================  ==============================================
variable                                 attribute
=======================================  ==============================================
``CAPSTAN_TOPOLOGY_LEVELS``              :attr:`OperatorConfig.topology_levels`
``CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS``  :attr:`OperatorConfig.queue` (``reserve_after_s``)
``CAPSTAN_QUEUE_GUARD_BY_WAIT``          :attr:`OperatorConfig.queue` (``guard_by_wait``)
``CAPSTAN_LOCALITY_SLOWDOWN``            :attr:`OperatorConfig.queue` (``locality_slowdown``)
``CAPSTAN_LOCALITY_WAIT_FRACTION``       :attr:`OperatorConfig.queue` (``locality_wait_fraction``)
``CAPSTAN_MIGRATION``                    :attr:`OperatorConfig.queue` (``migration``)
``CAPSTAN_MIGRATION_MIN_RUN_SECONDS``    :attr:`OperatorConfig.queue` (``moves.min_run_s``)
``CAPSTAN_MIGRATION_RESTART_SECONDS``    :attr:`OperatorConfig.queue` (``moves.restart_s``)
``CAPSTAN_MIGRATION_FOR_LOCALITY``       :attr:`OperatorConfig.queue` (``locality_moves``)
``CAPSTAN_MIGRATION_DEFRAGMENT``         :attr:`OperatorConfig.queue` (``defragment``)
``CAPSTAN_PEERING_PRIORITY``             :attr:`OperatorConfig.peering_priority`
``POD_NAMESPACE``                        :attr:`OperatorConfig.operator_namespace`
``CAPSTAN_WEBHOOK_CERT_DIR``             :attr:`OperatorConfig.webhook_cert_dir`
``CAPSTAN_WEBHOOK_PORT``                 :attr:`OperatorConfig.webhook_port`
``CAPSTAN_WEBHOOK_ADDR``                 :attr:`OperatorConfig.webhook_addr`
``CAPSTAN_WEBHOOK_MANAGED``              :attr:`OperatorConfig.webhook_managed`
``CAPSTAN_LOG_FORMAT``                   :attr:`OperatorConfig.log_format`
``CAPSTAN_LOG_LEVEL``                    :attr:`OperatorConfig.debug`
``CAPSTAN_PROMETHEUS_URL``               :attr:`OperatorConfig.prometheus_url`
``CAPSTAN_EPP_IMAGE``                    :attr:`OperatorConfig.epp_image`
``CAPSTAN_ENDPOINT_PICKERS``             :attr:`OperatorConfig.endpoint_pickers`
``CAPSTAN_DISCOVERY_TTL_SECONDS``        :attr:`OperatorConfig.discovery_ttl_s`
=======================================  ==============================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from capstan.api.k8s_names import image_errors
from capstan.security import DEFAULT_OPERATOR_NAMESPACE, OPERATOR_NAMESPACE_ENV
from capstan.serving.inference import DEFAULT_EPP_IMAGE
from capstan.topology.levels import DEFAULT_LEVELS, LEVELS_ENV, TopologyLevels, levels_from_env
from capstan.topology.policy import QueuePolicy, env_switch, queue_policy_from_env

PEERING_PRIORITY_ENV = "CAPSTAN_PEERING_PRIORITY"
#: Directory holding ``tls.crt`` and ``tls.key`` (a kubernetes.io/tls Secret mounted by the chart).
CERT_DIR_ENV = "CAPSTAN_WEBHOOK_CERT_DIR"
#: Listening port of the webhook server (the chart's webhook Service targets it).
PORT_ENV = "CAPSTAN_WEBHOOK_PORT"
DEFAULT_WEBHOOK_PORT = 9443
#: Listening address of the webhook server.
ADDR_ENV = "CAPSTAN_WEBHOOK_ADDR"
DEFAULT_WEBHOOK_ADDR = "0.0.0.0"
#: Name of the webhook configurations kopf should manage itself.
MANAGED_ENV = "CAPSTAN_WEBHOOK_MANAGED"
LOG_FORMAT_ENV = "CAPSTAN_LOG_FORMAT"
LOG_LEVEL_ENV = "CAPSTAN_LOG_LEVEL"
PROMETHEUS_ENV = "CAPSTAN_PROMETHEUS_URL"
PLACEMENT_CACHE_ENV = "CAPSTAN_PLACEMENT_CACHE"
EPP_IMAGE_ENV = "CAPSTAN_EPP_IMAGE"
ENDPOINT_PICKERS_ENV = "CAPSTAN_ENDPOINT_PICKERS"
DISCOVERY_TTL_ENV = "CAPSTAN_DISCOVERY_TTL_SECONDS"
DEFAULT_DISCOVERY_TTL_S = 60
#: The Prometheus Operator's default Service for a Prometheus named "k8s" in "monitoring".
DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"

LogFormat = Literal["json", "plain", "full"]
_LOG_FORMATS: tuple[LogFormat, ...] = ("json", "plain", "full")


class ConfigError(ValueError):
    """A variable of the operator's environment has a value it cannot use (the message names it)."""


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    """Everything the operator takes from its environment, parsed and checked.

    ``OperatorConfig()`` is the configuration of an operator whose environment sets nothing.
    """

    topology_levels: TopologyLevels = DEFAULT_LEVELS
    """Node labels that describe the network hierarchy, narrowest (the NVLink domain) first:
    placement groups nodes by them, and a Kueue-queued job's ``spec.topology.maxDomain`` becomes
    the label Kueue's topology-aware scheduling reads. ``$CAPSTAN_TOPOLOGY_LEVELS``, as
    ``name=label.key`` pairs separated by commas; default ``nvlink=nvidia.com/gpu.clique,
    rack=capstan.dev/rack,block=capstan.dev/block,zone=topology.kubernetes.io/zone``."""

    queue: QueuePolicy = field(default_factory=QueuePolicy)
    """The placement queue's tunables (:mod:`capstan.topology.policy` explains each):
    ``$CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS`` (default 86400), ``$CAPSTAN_QUEUE_GUARD_BY_WAIT``
    (``on``/``off``, default on), ``$CAPSTAN_LOCALITY_SLOWDOWN`` (``level=multiplier`` pairs, or
    ``off``), ``$CAPSTAN_LOCALITY_WAIT_FRACTION`` (default 0.5), ``$CAPSTAN_MIGRATION``
    (``on``/``off``, default on), ``$CAPSTAN_MIGRATION_MIN_RUN_SECONDS`` (default 600) and
    ``$CAPSTAN_MIGRATION_RESTART_SECONDS`` (default 300)."""

    peering_priority: int | None = None
    """This replica's kopf peering priority (``$CAPSTAN_PEERING_PRIORITY``, an integer). None: a
    random one, so that HA replicas differ (kopf freezes every replica when the highest priority is
    shared); the highest one is active, the others stand by."""

    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE
    """The namespace the operator runs in (``$POD_NAMESPACE``, set by the chart from the downward
    API; default ``capstan-system``). Serving pods' NetworkPolicies admit the operator's pods from
    there (canary analysis scrapes the servers' ``/metrics``)."""

    webhook_cert_dir: str | None = None
    """Directory holding ``tls.crt`` and ``tls.key`` for the validating webhooks
    (``$CAPSTAN_WEBHOOK_CERT_DIR``, a kubernetes.io/tls Secret mounted by the chart). None: no
    webhook server and no admission handlers."""

    webhook_port: int = DEFAULT_WEBHOOK_PORT
    """Listening port of the webhook server (``$CAPSTAN_WEBHOOK_PORT``, default 9443; the chart's
    webhook Service targets it)."""

    webhook_addr: str = DEFAULT_WEBHOOK_ADDR
    """Listening address of the webhook server (``$CAPSTAN_WEBHOOK_ADDR``): all interfaces in a pod
    (the default); 127.0.0.1 for an operator run outside the cluster next to a local API server
    (the chart's ``webhook.url``)."""

    webhook_managed: str | None = None
    """Name of the Validating/MutatingWebhookConfigurations kopf manages itself
    (``$CAPSTAN_WEBHOOK_MANAGED``). None (the chart's default): Helm or kustomize own them and kopf
    must not touch them."""

    log_format: LogFormat = "json"
    """Log line format (``$CAPSTAN_LOG_FORMAT``): ``json`` (the default, also for an unknown value),
    ``plain`` or ``full``."""

    debug: bool = False
    """Debug logs (``$CAPSTAN_LOG_LEVEL`` = ``debug``; any other value keeps the default level)."""

    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    """Prometheus that KEDA's triggers query for the servers' load gauges
    (``$CAPSTAN_PROMETHEUS_URL``; default ``http://prometheus-operated.monitoring.svc:9090``)."""

    placement_cache: bool = True
    """Placement passes read watch-fed caches of Nodes, GPU pods and TrainingJobs, and TrainingJob
    passes their job, pods, Service and PVC (:mod:`capstan.kube.cache`); ``$CAPSTAN_PLACEMENT_CACHE=off``
    reads them from the API server for every pass instead (the baseline ``bench/scale.py`` compares
    against)."""
    epp_image: str = DEFAULT_EPP_IMAGE
    """Image of the endpoint picker each InferencePool gets (``$CAPSTAN_EPP_IMAGE``; default the
    Gateway API Inference Extension's reference picker, pinned)."""

    endpoint_pickers: bool = False
    """Whether the operator creates InferencePools and their endpoint pickers
    (``$CAPSTAN_ENDPOINT_PICKERS``, ``on``/``off``, default off). A picker needs a Role and RoleBinding
    in the ModelServing's namespace, so the operator must hold ``roles`` and ``rolebindings``: the
    chart grants them, and sets this, only with ``routing.endpointPickers: true``."""

    discovery_ttl_s: int = DEFAULT_DISCOVERY_TTL_S
    """How long the operator trusts an API discovery answer about an optional API (Gateway API's
    HTTPRoute, KEDA's ScaledObject, LeaderWorkerSet, InferencePool): CRDs installed or removed
    later are seen within this time (``$CAPSTAN_DISCOVERY_TTL_SECONDS``, 1 to 3600, default 60)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """The configuration from ``env`` (default: this process's environment); an unset or empty
        variable keeps its default.

        Raises :class:`ConfigError` naming the first variable whose value cannot be used.
        """
        source = os.environ if env is None else env
        try:
            levels = levels_from_env(source)
        except ValueError as exc:
            raise ConfigError(f"{LEVELS_ENV}: {exc}") from exc
        try:
            queue = queue_policy_from_env(source)  # its messages name the variable
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        log_format = source.get(LOG_FORMAT_ENV, "").strip().lower()
        return cls(
            topology_levels=levels,
            queue=queue,
            peering_priority=_integer(source, PEERING_PRIORITY_ENV),
            operator_namespace=source.get(OPERATOR_NAMESPACE_ENV) or DEFAULT_OPERATOR_NAMESPACE,
            webhook_cert_dir=source.get(CERT_DIR_ENV) or None,
            webhook_port=_or(_integer(source, PORT_ENV, low=0, high=65535), DEFAULT_WEBHOOK_PORT),
            webhook_addr=source.get(ADDR_ENV) or DEFAULT_WEBHOOK_ADDR,
            webhook_managed=source.get(MANAGED_ENV) or None,
            log_format=next((f for f in _LOG_FORMATS if f == log_format), "json"),
            debug=source.get(LOG_LEVEL_ENV, "").strip().lower() == "debug",
            prometheus_url=source.get(PROMETHEUS_ENV) or DEFAULT_PROMETHEUS_URL,
            placement_cache=_switch(source, PLACEMENT_CACHE_ENV, default=True),
            epp_image=_image(source, EPP_IMAGE_ENV) or DEFAULT_EPP_IMAGE,
            endpoint_pickers=_switch(source, ENDPOINT_PICKERS_ENV, default=False),
            discovery_ttl_s=_or(
                _integer(source, DISCOVERY_TTL_ENV, low=1, high=3600), DEFAULT_DISCOVERY_TTL_S
            ),
        )


def _image(source: Mapping[str, str], name: str) -> str | None:
    """The image reference in ``source[name]``; None when unset or empty; :class:`ConfigError`
    naming ``name`` when it is not one."""
    text = source.get(name, "").strip()
    if not text:
        return None
    errors = image_errors(text)
    if errors:
        raise ConfigError(f"{name}: {text!r} is not an image reference: {'; '.join(errors)}")
    return text


def _switch(source: Mapping[str, str], name: str, *, default: bool) -> bool:
    """``on``/``off`` (or true/false) in ``source[name]``; ``default`` when unset or empty."""
    try:
        value = env_switch(source, name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return default if value is None else value


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _integer(
    source: Mapping[str, str], name: str, low: int | None = None, high: int | None = None
) -> int | None:
    """The integer in ``source[name]``; None when unset or empty; :class:`ConfigError` naming
    ``name`` when it is no integer or outside ``[low, high]``."""
    text = source.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not an integer") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{name}: {text!r} is not an integer in [{low}, {high}]")
    return value


__all__ = [
    "ADDR_ENV",
    "CERT_DIR_ENV",
    "DISCOVERY_TTL_ENV",
    "ENDPOINT_PICKERS_ENV",
    "EPP_IMAGE_ENV",
    "LOG_FORMAT_ENV",
    "LOG_LEVEL_ENV",
    "MANAGED_ENV",
    "PEERING_PRIORITY_ENV",
    "PLACEMENT_CACHE_ENV",
    "PORT_ENV",
    "ConfigError",
    "OperatorConfig",
]
