"""Builders of realistic Node and Pod JSON for the topology tests."""

from __future__ import annotations

from typing import Any


def node(name: str, gpus: int = 8, *, clique: str | None = None, rack: str | None = None,
         block: str | None = None, zone: str | None = "zone-a", ready: bool = True,
         cordoned: bool = False, taints: list[dict[str, str]] | None = None, rdma: bool = False,
         product: str = "NVIDIA-H100-80GB-HBM3") -> dict[str, Any]:
    """A Node as the API server returns it (trimmed to the fields the inventory reads, plus noise)."""
    labels = {"kubernetes.io/hostname": name, "nvidia.com/gpu.product": product,
              "nvidia.com/gpu.count": str(gpus)}
    for key, value in (("nvidia.com/gpu.clique", clique), ("capstan.dev/rack", rack),
                       ("capstan.dev/block", block), ("topology.kubernetes.io/zone", zone)):
        if value is not None:
            labels[key] = value
    allocatable = {"cpu": "190", "memory": "2000Gi", "pods": "110", "ephemeral-storage": "3Ti"}
    if gpus:
        allocatable["nvidia.com/gpu"] = str(gpus)
    if rdma:
        allocatable["rdma/rdma_shared_device_a"] = "1k"
    spec: dict[str, Any] = {"podCIDR": "10.0.0.0/24"}
    if cordoned:
        spec["unschedulable"] = True
    if taints:
        spec["taints"] = taints
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "uid": f"uid-{name}"},
        "spec": spec,
        "status": {
            "allocatable": allocatable, "capacity": dict(allocatable),
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady"},
            ],
        },
    }


def pod(name: str, node_name: str | None, gpus: int, *, phase: str = "Running",
        init_gpus: int = 0) -> dict[str, Any]:
    """A Pod bound to ``node_name`` requesting ``gpus`` GPUs (as a limit, like most manifests)."""
    spec: dict[str, Any] = {"containers": [
        {"name": "main", "image": "x", "resources": {"limits": {"nvidia.com/gpu": str(gpus)},
                                                    "requests": {"cpu": "4"}}},
        {"name": "sidecar", "image": "y", "resources": {"requests": {"cpu": "100m"}}},
    ]}
    if init_gpus:
        spec["initContainers"] = [{"name": "init", "image": "z",
                                   "resources": {"requests": {"nvidia.com/gpu": str(init_gpus)},
                                                 "limits": {"nvidia.com/gpu": str(init_gpus)}}}]
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": spec, "status": {"phase": phase}}


def hgx_cluster(blocks: int = 2, racks: int = 2, nodes_per_rack: int = 4, gpus: int = 8,
                **kw: Any) -> list[dict[str, Any]]:
    """8-GPU HGX nodes (each its own NVLink domain) in racks inside blocks."""
    return [node(f"b{b}-r{r}-n{n}", gpus, rack=f"b{b}-r{r}", block=f"b{b}", **kw)
            for b in range(blocks) for r in range(racks) for n in range(nodes_per_rack)]


def nvl72_cluster(racks: int = 2, nodes_per_rack: int = 18, **kw: Any) -> list[dict[str, Any]]:
    """GB200 NVL72-style racks: 18 nodes x 4 GPUs sharing one clique per rack."""
    return [node(f"nvl{r}-n{n:02d}", 4, clique=f"cluster-uuid.{r}", rack=f"nvl{r}", block="nvl", **kw)
            for r in range(racks) for n in range(nodes_per_rack)]
