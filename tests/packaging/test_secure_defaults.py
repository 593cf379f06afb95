"""``capstan render`` of every sample shows the secure defaults, and the rules behind them.

Every pod Capstan creates (workers, servers, their init containers): runAsNonRoot and seccomp
RuntimeDefault, no privilege escalation, every capability dropped (IPC_LOCK added back for RDMA
only), no ServiceAccount token unless the spec names one, resources on every container; every
sample asks for a NetworkPolicy, and the policy selects exactly the sample's pods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from capstan_pkg import ROOT

from capstan.api.loading import parse_object
from capstan.render import render
from capstan.security import REFERENCE_UID, image_repository, nonroot_refusal, pod_security_context

SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


def rendered(path: Path) -> list[dict[str, Any]]:
    return render([parse_object(d) for d in yaml.safe_load_all(path.read_text()) if d])


def pods(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod metadata, pod spec) of every Pod and Deployment template, and of the leader and worker
    templates of multi-host groups (a ControllerRevision's or a LeaderWorkerSet's)."""
    out = []
    for o in objs:
        if o["kind"] == "Pod":
            out.append((o["metadata"], o["spec"]))
        elif o["kind"] == "Deployment":
            out.append((o["spec"]["template"]["metadata"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "ControllerRevision":
            out += [(o["data"][t]["metadata"], o["data"][t]["spec"]) for t in ("leader", "worker")]
        elif o["kind"] == "LeaderWorkerSet":
            tpl = o["spec"]["leaderWorkerTemplate"]
            out += [(tpl[t]["metadata"], tpl[t]["spec"]) for t in ("leaderTemplate", "workerTemplate")]
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_pod_of_every_sample_has_the_secure_defaults(sample: Path) -> None:
    objs = rendered(sample)
    found = pods(objs)
    assert found, "every sample creates pods"
    rdma = "rdma" in sample.stem
    for _, spec in found:
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert ctx.get("runAsUser", 1) != 0
        assert spec["automountServiceAccountToken"] is False  # no sample names a ServiceAccount
        assert "serviceAccountName" not in spec
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            added = sc["capabilities"].get("add", [])
            assert added == (["IPC_LOCK"] if rdma and c["name"] == "worker" else [])
            assert not sc.get("privileged")
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_sample_has_a_network_policy_over_its_pods(sample: Path) -> None:
    objs = rendered(sample)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    # multi-host groups: a second policy lets the pods of the groups reach one another
    (policy,) = [o for o in policies if not o["metadata"]["name"].endswith("-groups")]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert policy["metadata"]["ownerReferences"][0]["controller"] is True
    groups = [o["spec"] for o in policies if o is not policy]
    for meta, _ in pods(objs):
        assert any(selects(p["podSelector"]["matchLabels"], meta["labels"]) for p in [spec, *groups])
    for group in groups:
        assert group["ingress"] == [{"from": [{"podSelector": group["podSelector"]}]}]
    for rule in spec["ingress"]:
        assert rule["from"], "an empty from would admit every source"
    if sample.stem.startswith("trainingjob"):
        gang, metrics = spec["ingress"]
        assert gang["from"] == [{"podSelector": spec["podSelector"]}] and "ports" not in gang
        assert metrics["ports"] == [{"protocol": "TCP", "port": 9400}]
    else:
        assert all(r["ports"] == [{"protocol": "TCP", "port": "http"}] for r in spec["ingress"])


def _pod_of(sample: str, **spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "manifests" / "samples" / sample).read_text())
    doc["spec"].update(spec)
    (_, pod_spec), *_ = pods(render([parse_object(doc)]))
    return pod_spec


def test_the_uid_is_set_only_for_images_capstan_knows() -> None:
    # Capstan's reference image: its own UID, group and volume group (the checkpoint PVC is writable).
    ref = _pod_of("trainingjob-local.yaml")["securityContext"]
    assert (ref["runAsUser"], ref["runAsGroup"], ref["fsGroup"]) == (REFERENCE_UID,) * 3
    # A user's image runs as its own numeric USER: the kubelet checks runAsNonRoot against it.
    own = _pod_of("trainingjob-local.yaml", image="registry.example/team/trainer:2")["securityContext"]
    assert own == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    # ... or as the UID the spec names, without losing any other default.
    named = _pod_of("trainingjob-local.yaml", image="nvcr.io/nvidia/pytorch:25.01-py3",
                    securityContext={"runAsUser": 4242})["securityContext"]
    assert named == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 4242}


def test_runtime_default_images_run_as_the_reference_user_with_a_writable_home() -> None:
    vllm = _pod_of("modelserving-vllm.yaml")
    assert vllm["securityContext"]["runAsUser"] == REFERENCE_UID
    env = {e["name"]: e["value"] for e in vllm["containers"][0]["env"]}
    assert env["HOME"] == "/tmp" and env["USER"]
    # The hf:// downloader is Capstan's pick too: it runs as the reference user even when the server
    # image is the user's.
    custom = _pod_of("modelserving-custom.yaml")
    (init,) = custom["initContainers"]
    assert init["securityContext"]["runAsUser"] == REFERENCE_UID
    assert custom["securityContext"]["runAsUser"] == 10001  # the sample's spec.securityContext
    user_vllm = _pod_of("modelserving-vllm.yaml", image="registry.example/vllm:custom")
    assert "runAsUser" not in user_vllm["securityContext"]


def test_a_named_service_account_gets_its_token() -> None:
    spec = _pod_of("trainingjob-local.yaml", serviceAccountName="trainer")
    assert spec["serviceAccountName"] == "trainer" and "automountServiceAccountToken" not in spec


def test_spec_values_win_field_by_field() -> None:
    from capstan.api.security import PodSecurity

    ctx = pod_security_context(PodSecurity(fs_group=2000), known_uid=REFERENCE_UID)
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["fsGroup"]) == (REFERENCE_UID, REFERENCE_UID, 2000)


def test_image_repository() -> None:
    trainer = "ghcr.io/capstan-dev/capstan-trainer"
    assert image_repository(f"{trainer}:0.1.0") == trainer
    assert image_repository("registry:5000/a/b@sha256:" + "0" * 64) == "registry:5000/a/b"
    assert image_repository("registry:5000/a/b:1.0@sha256:" + "0" * 64) == "registry:5000/a/b"
    assert image_repository("registry:5000/a/b") == "registry:5000/a/b"


def test_the_kubelets_nonroot_refusals_are_recognised() -> None:
    def pod(message: str, reason: str = "CreateContainerConfigError", key: str = "containerStatuses") -> Any:
        waiting = {"reason": reason, "message": message}
        return {"status": {key: [{"name": "c", "state": {"waiting": waiting}}]}}

    root = "container has runAsNonRoot and image will run as root (pod: \"ns/p\", container: c)"
    named = "container has runAsNonRoot and image has non-numeric user (app), cannot verify user is non-root"
    assert nonroot_refusal(pod(root)) == f"container c: {root}"
    assert nonroot_refusal(pod(named, key="initContainerStatuses")) == f"container c: {named}"
    assert nonroot_refusal(pod('configmap "x" not found')) is None
    assert nonroot_refusal(pod(root, reason="ImagePullBackOff")) is None
    assert nonroot_refusal({}) is None
