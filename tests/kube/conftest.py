"""Fixtures for operator integration tests: an emulated API server and the real operator.

Generic on purpose (TrainingJob and ModelServing tests use the same ones):

* ``cluster`` — :class:`Cluster`: kmock-based emulator over real HTTP with the built-in resources
  and every CRD of ``crds/`` loaded; ``cluster.api`` is a test client (its requests are left out of
  :func:`tests.kube.rbac_calls.rbac_calls`); ``cluster.operator()`` runs the real operator;
* ``operator`` — the operator already running for the whole test;
* ``env`` — a :class:`tests.kube.scenarios.Env` for the shared scenarios;
* ``add_gpu_node`` — make a Ready Node with GPUs and topology labels;
* ``set_pod_status`` (re-exported from ``tests.support.kube``) plays the kubelet.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from tests.kube.scenarios import Env
from tests.support.kube import Emulator, emulated_cluster, running_operator, set_pod_status, test_client

from capstan.kube.client import ApiClient
from capstan.kube.resources import NODES

__all__ = ["Cluster", "set_pod_status"]

NAMESPACE = "default"


@dataclass
class Cluster:
    """An emulated cluster for one test."""

    emulator: Emulator
    url: str
    api: ApiClient

    def operator(self, **kwargs: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        """The real operator against this cluster while the context is open."""
        return running_operator(self.url, **kwargs)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """A fresh emulated API server with Capstan's CRDs."""
    async with emulated_cluster() as (emulator, url):
        api = test_client(url)
        try:
            yield Cluster(emulator, url, api)
        finally:
            await api.close()


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[None]:
    """The real operator running (cluster-wide) for the whole test."""
    async with cluster.operator():
        yield


@pytest.fixture
def env(cluster: Cluster) -> Env:
    """The scenario environment over the emulated cluster."""
    return Env(api=cluster.api, namespace=NAMESPACE, operator=cluster.operator)


def gpu_node(
    name: str, gpus: int = 8, clique: str | None = None, rack: str | None = None, ready: bool = True
) -> dict[str, Any]:
    """A Node dict with allocatable GPUs and NVIDIA/Capstan topology labels."""
    labels = {"kubernetes.io/hostname": name, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    if clique:
        labels["nvidia.com/gpu.clique"] = clique
    if rack:
        labels["capstan.dev/rack"] = rack
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "allocatable": {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": str(gpus)},
            "capacity": {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@pytest.fixture
def add_gpu_node(cluster: Cluster) -> Callable[..., Awaitable[dict[str, Any]]]:
    """``await add_gpu_node("n1", gpus=8, clique="c1")`` creates a Ready GPU Node."""

    async def add(name: str, **kwargs: Any) -> dict[str, Any]:
        node = gpu_node(name, **kwargs)
        await cluster.api.create(node)
        # the emulator treats Node status like a subresource; set it the way a kubelet does
        await cluster.api.patch_status(NODES, None, name, node["status"])
        return node

    return add
