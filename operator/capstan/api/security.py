"""Security settings both kinds share: the user the containers run as, and network policies.

Capstan's pods are hardened by default (seccomp RuntimeDefault, no privilege escalation, no
capabilities, runAsNonRoot, no ServiceAccount token unless one is asked for); these fields only say
*which* non-root user runs, and who may reach the pods. Nothing here relaxes a default.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from capstan.api.common import ApiModel, Rule
from capstan.api.k8s_names import LabelValue, QualifiedName
from capstan.labels import LABEL_NAME

# Highest UID/GID Kubernetes accepts (core/v1 validation: int32, non-negative).
MAX_ID = 2_147_483_647
# CIDR of ipBlock: IPv4 or IPv6 with a prefix length (the API server parses it exactly).
CIDR_PATTERN = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/[0-9]{1,3})$"
Cidr = Annotated[str, Field(pattern=CIDR_PATTERN, max_length=64)]


class PodSecurity(ApiModel):
    """Which non-root user the containers run as (the pods always have runAsNonRoot: true)."""

    run_as_user: int | None = Field(
        default=None,
        ge=1,
        le=MAX_ID,
        description="UID every container runs as. Needed when the image's USER is root or a name (the "
        "kubelet cannot verify that a named user is not root and refuses to start the container). "
        "Default: Capstan's reference images run as 10001; other images run as their own numeric USER.",
    )
    run_as_group: int | None = Field(
        default=None, ge=0, le=MAX_ID, description="GID every container runs as; default: the image's."
    )
    fs_group: int | None = Field(
        default=None,
        ge=0,
        le=MAX_ID,
        description="Group that owns the pod's volumes (e.g. the checkpoint PVC), so a non-root user "
        "can write to them; Capstan's reference images get 10001.",
    )


class LabelSelectorRequirement(ApiModel):
    """One matchExpressions term of a label selector."""

    key: QualifiedName = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[LabelValue] = Field(
        default_factory=list, max_length=64, description="Values for In and NotIn; empty otherwise."
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".values",
            "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            "must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            lambda r: (r.operator in ("In", "NotIn")) == bool(r.values),
        ),
    )


class LabelSelector(ApiModel):
    """A Kubernetes label selector; empty selects everything."""

    match_labels: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict, max_length=32, description="Labels the object must carry."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=16, description="Set-based requirements."
    )


class IPBlock(ApiModel):
    """A CIDR range (e.g. an external load balancer's addresses)."""

    cidr: Cidr = Field(description="CIDR, e.g. 10.0.0.0/16.")
    except_: list[Cidr] = Field(
        default_factory=list,
        alias="except",
        max_length=16,
        description="CIDRs inside cidr to leave out.",
    )


class NetworkPolicyPeer(ApiModel):
    """Who may connect, as in a NetworkPolicy's from: pods by labels (own namespace) or an IP range."""

    pod_selector: LabelSelector | None = Field(default=None, description="Pods, by their labels.")
    namespace_selector: LabelSelector | None = Field(
        default=None, description="Namespaces, by their labels ({} = every namespace)."
    )
    ip_block: IPBlock | None = Field(default=None, description="An IP range; not with the selectors.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "",
            "has(self.ipBlock) != (has(self.podSelector) || has(self.namespaceSelector))",
            "set ipBlock, or podSelector and/or namespaceSelector (not both kinds, not neither)",
            lambda p: (p.ip_block is not None)
            != (p.pod_selector is not None or p.namespace_selector is not None),
        ),
    )


#: The metrics scraper by default: Prometheus pods (prometheus-operator and the Prometheus Helm
#: chart label them app.kubernetes.io/name=prometheus) in any namespace.
PROMETHEUS_LABELS = {LABEL_NAME: "prometheus"}


def _prometheus() -> list[NetworkPolicyPeer]:
    return [
        NetworkPolicyPeer(
            pod_selector=LabelSelector(match_labels=dict(PROMETHEUS_LABELS)),
            namespace_selector=LabelSelector(),
        )
    ]


def _own_namespace() -> list[NetworkPolicyPeer]:
    return [NetworkPolicyPeer(pod_selector=LabelSelector())]


_METRICS_FROM = (
    "Who may scrape the metrics port. Default: pods labelled app.kubernetes.io/name=prometheus in any "
    "namespace (prometheus-operator's and the Prometheus chart's Prometheus pods)."
)


class GangNetworkPolicy(ApiModel):
    """Ingress of the gang's pods: any port from their own gang, the metrics port from the scraper."""

    metrics_from: list[NetworkPolicyPeer] = Field(
        default_factory=_prometheus, max_length=16, description=_METRICS_FROM
    )


class ServingNetworkPolicy(ApiModel):
    """Ingress of the servers: the server port, from clients, the operator and the metrics scraper."""

    clients_from: list[NetworkPolicyPeer] = Field(
        default_factory=_own_namespace,
        max_length=16,
        description="Who may send requests: the routing layer (gateway, ingress, mesh) and in-cluster "
        "clients. Default: every pod of the ModelServing's namespace. A gateway elsewhere, e.g. "
        "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: gateways}}}.",
    )
    metrics_from: list[NetworkPolicyPeer] = Field(
        default_factory=_prometheus, max_length=16, description=_METRICS_FROM
    )
