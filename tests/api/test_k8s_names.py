"""Names and values handed on to Kubernetes follow Kubernetes' own rules: in the validators, in
the models (errors name the field), and in the CRD patterns the API server applies."""

from __future__ import annotations

import re
from typing import Any

import pytest
from tests.api.bodies import ms, tj

from capstan.api import k8s_names as k
from capstan.api.crdgen import build_crds
from capstan.api.loading import InvalidObject, parse_object


@pytest.mark.parametrize("value", ["a", "fast-ssd", "gp3.csi.aws.com", "0abc", "a" * 253])
def test_dns1123_subdomain_accepts(value: str) -> None:
    assert k.dns1123_subdomain_errors(value) == []


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("Fast_SSD", "lowercase RFC 1123 subdomain"),
        ("-a", "start and end with an alphanumeric"),
        ("a-", "start and end with an alphanumeric"),
        ("a..b", "lowercase RFC 1123 subdomain"),
        ("", "lowercase RFC 1123 subdomain"),
        ("a" * 254, "no more than 253 characters"),
        ("my sa", "lowercase RFC 1123 subdomain"),
    ],
)
def test_dns1123_subdomain_rejects(value: str, why: str) -> None:
    assert any(why in e for e in k.dns1123_subdomain_errors(value))


@pytest.mark.parametrize(
    "value",
    ["gpu", "nvidia.com/gpu.product", "kubernetes.io/hostname", "Node_Pool-1", "a" * 63, "x.io/" + "b" * 63],
)
def test_qualified_name_accepts(value: str) -> None:
    assert k.qualified_name_errors(value) == []


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "name part must be non-empty"),
        ("/gpu", "prefix part must be non-empty"),
        ("nvidia.com/", "name part must be non-empty"),
        ("a/b/c", "optional DNS subdomain prefix"),
        ("gpu type", "name part must consist of alphanumeric"),
        ("-gpu", "name part must consist of alphanumeric"),
        ("a" * 64, "name part must be no more than 63"),
        ("Nvidia.com/gpu", "prefix part a lowercase RFC 1123 subdomain"),
    ],
)
def test_qualified_name_rejects(value: str, why: str) -> None:
    assert any(why in e for e in k.qualified_name_errors(value)), k.qualified_name_errors(value)


@pytest.mark.parametrize("value", ["", "a", "H100_80GB", "v1.2-3", "x" * 63])
def test_label_value_accepts(value: str) -> None:
    assert k.label_value_errors(value) == []


@pytest.mark.parametrize(("value", "why"), [("a b", "valid label value"), ("-a", "valid label value"),
                                            ("x" * 64, "no more than 63"), ("a/b", "valid label value")])
def test_label_value_rejects(value: str, why: str) -> None:
    assert any(why in e for e in k.label_value_errors(value))


@pytest.mark.parametrize("value", ["NCCL_DEBUG", "_x", "my.env-name", "a1"])
def test_env_var_name_accepts(value: str) -> None:
    assert k.env_var_name_errors(value) == []


@pytest.mark.parametrize("value", ["1NCCL", "NCCL DEBUG", "A=B", "", "ÄB"])
def test_env_var_name_rejects(value: str) -> None:
    assert k.env_var_name_errors(value) != []


@pytest.mark.parametrize(("value", "ok"), [("registry.example/trainer:1.0", True), ("img", True),
                                           (" img", False), ("img:1 ", False), ("my image", False),
                                           ("   ", False)])
def test_image(value: str, ok: bool) -> None:
    assert (k.image_errors(value) == []) is ok


VOLUME = {"size": "1Gi"}
REFUSED = [
    (tj(serviceAccountName="Trainer SA"), "spec.serviceAccountName", "not a valid ServiceAccount name"),
    (tj(queueName="Team_A"), "spec.queueName", "not a valid Kueue LocalQueue name"),
    (tj(queueName="q" * 64), "spec.queueName", "no more than 63 characters"),
    (tj(checkpoint={"volume": {**VOLUME, "storageClassName": "Fast_SSD"}}),
     "spec.checkpoint.volume.storageClassName", "not a valid StorageClass name"),
    (tj(checkpoint={"volume": {"claimName": "My-Claim"}}),
     "spec.checkpoint.volume.claimName", "not a valid PersistentVolumeClaim name"),
    (tj(checkpoint={"volume": VOLUME, "snapshots": {"volumeSnapshotClassName": "csi snap"}}),
     "spec.checkpoint.snapshots.volumeSnapshotClassName", "not a valid VolumeSnapshotClass name"),
    (tj(checkpoint={"volume": VOLUME, "restoreFrom": "Snap_1"}),
     "spec.checkpoint.restoreFrom", "not a valid VolumeSnapshot name"),
    (tj(network={"nccl": {"NCCL DEBUG": "WARN"}}), "spec.network.nccl.NCCL DEBUG.[key]",
     "not a valid environment variable name"),
    (tj(network={"rdmaResource": "rdma/-bad"}), "spec.network.rdmaResource", "should match pattern"),
    (tj(env=[{"name": "1X", "value": "v"}]), "spec.env[0].name", "not a valid environment variable name"),
    (tj(nodeSelector={"gpu type": "h100"}), "spec.nodeSelector.gpu type.[key]", "not a valid label key"),
    (tj(nodeSelector={"gpu": "H100 80GB"}), "spec.nodeSelector.gpu", "not a valid label value"),
    (tj(image="registry.example/trainer:1.0 "), "spec.image", "leading or trailing whitespace"),
    (tj(tolerations=[{"key": "gpu", "operator": "Sometimes"}]), "spec.tolerations[0].operator",
     "'Exists' or 'Equal'"),
    (tj(tolerations=[{"key": "gpu", "effect": "Never"}]), "spec.tolerations[0].effect", "'NoSchedule'"),
    (tj(tolerations=[{"key": "bad key", "operator": "Exists"}]), "spec.tolerations[0].key",
     "not a valid taint key"),
    (tj(tolerations=[{"key": "gpu", "value": "a b"}]), "spec.tolerations[0].value",
     "not a valid label value"),
    (tj(tolerations=[{"effect": "NoSchedule"}]), "spec.tolerations[0]",
     "operator: must be Exists when key is empty"),
    (tj(tolerations=[{"key": "gpu", "operator": "Exists", "value": "x"}]), "spec.tolerations[0]",
     "value: must be empty when operator is Exists"),
    (tj(tolerations=[{"key": "gpu", "operator": "Exists", "tolerationSeconds": 60}]), "spec.tolerations[0]",
     "effect: must be NoExecute when tolerationSeconds is set"),
    (ms(model={"pvc": {"claimName": "Models"}}), "spec.model.pvc.claimName",
     "not a valid PersistentVolumeClaim"),
    (ms(model={"fromTrainingJob": {"name": "GPT"}}), "spec.model.fromTrainingJob.name",
     "not a valid TrainingJob"),
    (ms(model={"fromTrainingJob": {"name": "gpt", "checkpoint": "latest snap"}}),
     "spec.model.fromTrainingJob.checkpoint", "neither Latest nor a valid VolumeSnapshot name"),
    (ms(image="vllm/vllm-openai :v0.6"), "spec.image", "must not contain whitespace"),
    (ms(nodeSelector={"nvidia.com/gpu.product": "NVIDIA H100"}), "spec.nodeSelector.nvidia.com/gpu.product",
     "not a valid label value"),
    (ms(tolerations=[{"key": "gpu", "operator": "Equal", "effect": "NoSchedule", "tolerationSeconds": 5}]),
     "spec.tolerations[0]", "effect: must be NoExecute"),
]


@pytest.mark.parametrize(("body", "field", "why"), REFUSED, ids=[f"{f}:{w[:24]}" for _, f, w in REFUSED])
def test_model_rejects_naming_the_field(body: dict[str, Any], field: str, why: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(body)
    assert any(e.startswith(f"{field}: ") and why in e for e in err.value.errors), err.value.errors


def test_valid_kubernetes_values_are_accepted() -> None:
    parse_object(
        tj(
            serviceAccountName="trainer",
            queueName="team-a",
            nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": ""},
            tolerations=[
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                {"operator": "Exists"},
            ],
            network={"nccl": {"NCCL_DEBUG": "WARN", "NCCL_IB_HCA": "mlx5"}, "rdmaResource": "rdma/hca_a"},
            env=[{"name": "HF_HOME", "value": "/cache"}],
            checkpoint={
                "volume": {"size": "1Gi", "storageClassName": "gp3.csi.aws.com"},
                "snapshots": {"volumeSnapshotClassName": "csi-snap"},
                "restoreFrom": "gpt-ckpt-1200",
            },
        )
    )
    parse_object(ms(model={"fromTrainingJob": {"name": "gpt", "checkpoint": "gpt-ckpt-final"}}))
    parse_object(ms(model={"fromTrainingJob": {"name": "gpt"}}, image="vllm/vllm-openai:v0.6.3"))


def _prop(crd: str, *path: str) -> dict[str, Any]:
    node = build_crds()[crd]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for part in path:
        node = node["items"] if part == "[]" else node["additionalProperties"] if part == "{}" else (
            node["properties"][part]
        )
    return dict(node)


CRD_PATTERNS = [
    (("serviceAccountName",), ["trainer", "a.b"], ["Trainer", "a_b"]),
    (("queueName",), ["team-a"], ["Team"]),
    (("checkpoint", "volume", "storageClassName"), ["gp3.csi.aws.com"], ["Fast_SSD"]),
    (("nodeSelector", "{}"), ["", "H100_80GB"], ["H100 80GB", "-x"]),
    (("tolerations", "[]", "key"), ["", "nvidia.com/gpu", "dedicated"], ["bad key", "a/b/c"]),
    (("tolerations", "[]", "value"), ["", "ml"], ["a b"]),
    (("env", "[]", "name"), ["HF_HOME"], ["1X"]),
    (("image",), ["registry.example/trainer:1.0"], ["img ", "a b", ""]),
]


@pytest.mark.parametrize(("path", "good", "bad"), CRD_PATTERNS, ids=[".".join(p[0]) for p in CRD_PATTERNS])
def test_crd_patterns_agree_with_the_models(path: tuple[str, ...], good: list[str], bad: list[str]) -> None:
    node = _prop("capstan.dev_trainingjobs.yaml", *path)
    pattern = re.compile(node["pattern"])
    for value in good:
        assert pattern.search(value) and len(value) <= node.get("maxLength", 10**9), value
    for value in bad:
        assert not pattern.search(value), value


def test_maps_with_checked_keys_stay_structural() -> None:
    node = _prop("capstan.dev_trainingjobs.yaml", "nodeSelector")
    assert "patternProperties" not in node and "propertyNames" not in node
    assert node["additionalProperties"]["maxLength"] == 63
