"""The Kubernetes API resources Capstan reads and writes: :class:`ApiResource` descriptors (group,
version, plural, kind: where a kind's objects live on the server) and one constant per kind.

"Resource" here is the REST endpoint of a kind, as in API discovery; Capstan's own objects
(TrainingJob, ModelServing as pydantic models) are :data:`capstan.api.loading.CapstanObject`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


@dataclass(frozen=True)
class ApiResource:
    """One API resource (a kind's REST endpoint, as in API discovery): where its objects live."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        """``group/version``, or ``v1`` for the core group."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """URL path of the collection (no ``name``) or of one object (optionally a subresource)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
            if subresource:
                base += f"/{subresource}"
        return base


NAMESPACES = ApiResource("", "v1", "namespaces", "Namespace", namespaced=False)
PODS = ApiResource("", "v1", "pods", "Pod")
SERVICES = ApiResource("", "v1", "services", "Service")
PVCS = ApiResource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
CONFIGMAPS = ApiResource("", "v1", "configmaps", "ConfigMap")
EVENTS = ApiResource("", "v1", "events", "Event")
NODES = ApiResource("", "v1", "nodes", "Node", namespaced=False)
DEPLOYMENTS = ApiResource("apps", "v1", "deployments", "Deployment")
HPAS = ApiResource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
JOBS = ApiResource("batch", "v1", "jobs", "Job")
PDBS = ApiResource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
NETWORK_POLICIES = ApiResource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
VOLUME_SNAPSHOTS = ApiResource("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot")
TRAININGJOBS = ApiResource("capstan.dev", "v1alpha1", "trainingjobs", "TrainingJob")
MODELSERVINGS = ApiResource("capstan.dev", "v1alpha1", "modelservings", "ModelServing")

_KINDS: dict[tuple[str, str], ApiResource] = {
    (r.api_version, r.kind): r
    for r in (
        NAMESPACES,
        PODS,
        SERVICES,
        PVCS,
        CONFIGMAPS,
        EVENTS,
        NODES,
        DEPLOYMENTS,
        HPAS,
        JOBS,
        PDBS,
        NETWORK_POLICIES,
        VOLUME_SNAPSHOTS,
        TRAININGJOBS,
        MODELSERVINGS,
    )
}


def register_kind(resource: ApiResource) -> None:
    """Teach :func:`api_resource_of` another kind (e.g. a third-party CRD)."""
    _KINDS[(resource.api_version, resource.kind)] = resource


def api_resource_of(obj: Mapping[str, Any]) -> ApiResource:
    """The :class:`ApiResource` of an object dict, from its apiVersion and kind."""
    key = (str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    try:
        return _KINDS[key]
    except KeyError:
        raise ValueError(f"unknown kind {key[1]!r} of {key[0]!r}; call register_kind() first") from None
