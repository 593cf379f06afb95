"""The real API server's Pod Security admission accepts the pods Capstan creates.

``capstan render`` of the samples is sent with ``kubectl apply --dry-run=server`` (admission runs in
full, nothing is stored) into namespaces labelled ``pod-security.kubernetes.io/enforce``:

* ``restricted`` for every sample but RDMA: its Pods, the pods of its Deployments (enforce applies
  to Pods, so each Deployment's template is also sent as a Pod), its Services and NetworkPolicy;
  the Deployments themselves must draw no PodSecurity warning (``warn: restricted``);
* the RDMA sample adds IPC_LOCK, which is outside even ``baseline``'s capability list: ``baseline``
  refuses it naming IPC_LOCK, ``privileged`` accepts it (the README says why);
* a pod without Capstan's defaults is refused under ``restricted``: the enforcement is real.

Uses ``$KUBECONFIG``, else ``.capstan/cluster/kubeconfig`` (``make cluster``). Skipped when no cluster
answers, unless ``CI`` or ``CAPSTAN_E2E`` (not ``0``) is set: then a missing cluster fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from capstan.cli import main as capstan_main
from capstan.render import to_yaml
from capstan.serving.groups import group_pod

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "manifests" / "samples"
RDMA = SAMPLES / "trainingjob-rdma.yaml"
PSA = "pod-security.kubernetes.io"


def _kubeconfig() -> str:
    return os.environ.get("KUBECONFIG") or str(ROOT / ".capstan" / "cluster" / "kubeconfig")


def _required() -> bool:
    """A missing cluster is a failure in CI and when CAPSTAN_E2E asks for the e2e tests."""
    return bool(os.environ.get("CI")) or os.environ.get("CAPSTAN_E2E", "0") not in ("", "0")


def _kubectl_path() -> str | None:
    local = ROOT / ".tools" / "bin" / "kubectl"
    return str(local) if local.is_file() else shutil.which("kubectl")


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = _kubectl_path()
    assert exe is not None
    return subprocess.run([exe, "--kubeconfig", _kubeconfig(), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cluster() -> None:
    """Skip (or fail when required) unless kubectl reaches a cluster."""
    reason = ""
    if _kubectl_path() is None:
        reason = "kubectl missing: run scripts/install-tools.sh"
    else:
        proc = kubectl("version", "--request-timeout=5s", "-o", "json")
        if proc.returncode != 0 or '"serverVersion"' not in proc.stdout:
            reason = f"no cluster answers with kubeconfig {_kubeconfig()} ({proc.stderr.strip()[:300]})"
    if reason:
        reason += "; start one with `make cluster`"
        if _required():
            pytest.fail(f"{reason} (required: CI or CAPSTAN_E2E is set)", pytrace=False)
        pytest.skip(reason)


@contextlib.contextmanager
def psa_namespace(level: str) -> Iterator[str]:
    """A fresh namespace enforcing (and warning at) Pod Security level ``level``; deleted afterwards."""
    name = f"capstan-psa-{level}-{uuid.uuid4().hex[:6]}"
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {
        f"{PSA}/enforce": level, f"{PSA}/enforce-version": "latest",
        f"{PSA}/warn": level, f"{PSA}/warn-version": "latest"}}}
    proc = kubectl("create", "-f", "-", stdin=yaml.safe_dump(ns))
    assert proc.returncode == 0, proc.stderr
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false")


def render_sample(path: Path, namespace: str) -> list[dict[str, Any]]:
    """``capstan render -n namespace -f path``, as objects."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert capstan_main(["render", "-n", namespace, "-f", str(path)]) == 0
    return [d for d in yaml.safe_load_all(out.getvalue()) if d]


def admissible(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What to send: Pods, every Deployment and its template as a Pod, Services, NetworkPolicies,
    and the ControllerRevision of multi-host groups with one group's pods as the operator makes them.

    ownerReferences go: they name a preview uid of a TrainingJob/ModelServing that does not exist.
    PVCs stay out (snapshot data sources need the snapshot CRDs, and PVCs are not pods).
    """
    out = []
    for obj in objs:
        obj = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}}
        if obj["kind"] in ("Pod", "Service", "NetworkPolicy", "Deployment", "ControllerRevision"):
            out.append(obj)
        if obj["kind"] == "ControllerRevision":
            pods = [group_pod(obj, 0, rank, None) for rank in range(obj["data"]["size"])]
            out += [{**p, "metadata": {k: v for k, v in p["metadata"].items() if k != "ownerReferences"}}
                    for p in pods]
        if obj["kind"] == "Deployment":
            template = obj["spec"]["template"]
            out.append({"apiVersion": "v1", "kind": "Pod", "spec": template["spec"], "metadata": {
                **template["metadata"], "name": f"{obj['metadata']['name']}-pod",
                "namespace": obj["metadata"]["namespace"]}})
    return out


def dry_run(objs: list[dict[str, Any]], namespace: str) -> subprocess.CompletedProcess[str]:
    # to_yaml: kubectl reads YAML 1.2, where an unquoted 1e-5 (an argument) is a number.
    return kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=to_yaml(objs))


RESTRICTED = sorted(p for p in SAMPLES.glob("*.yaml") if p != RDMA)


@pytest.mark.parametrize("sample", RESTRICTED, ids=lambda p: p.stem)
def test_restricted_namespace_admits_every_pod_of_the_sample(cluster: None, sample: Path) -> None:
    with psa_namespace("restricted") as ns:
        objs = admissible(render_sample(sample, ns))
        assert any(o["kind"] == "Pod" for o in objs)
        proc = dry_run(objs, ns)
        assert proc.returncode == 0, f"{sample.name} refused under restricted:\n{proc.stderr}"
        # warn: restricted makes the API server name every violation of a Deployment's template.
        assert "PodSecurity" not in proc.stderr, proc.stderr
        created = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
        assert len(created) == len(objs), proc.stdout


def test_rdma_needs_the_privileged_level_because_of_ipc_lock(cluster: None, tmp_path: Path) -> None:
    with psa_namespace("baseline") as ns:
        proc = dry_run(admissible(render_sample(RDMA, ns)), ns)
        assert proc.returncode != 0
        assert "violates PodSecurity" in proc.stderr and "IPC_LOCK" in proc.stderr, proc.stderr
    with psa_namespace("privileged") as ns:
        proc = dry_run(admissible(render_sample(RDMA, ns)), ns)
        assert proc.returncode == 0, proc.stderr
    # Without RDMA the same job is restricted-clean: only the capability needs the higher level.
    doc = yaml.safe_load(RDMA.read_text())
    doc["spec"]["network"]["rdma"] = "disabled"
    plain = tmp_path / "rdma-disabled.yaml"
    plain.write_text(yaml.safe_dump(doc))
    with psa_namespace("restricted") as ns:
        proc = dry_run(admissible(render_sample(plain, ns)), ns)
        assert proc.returncode == 0, proc.stderr


def test_a_pod_without_the_defaults_is_refused(cluster: None) -> None:
    """The control: enforcement is on, so the acceptances above mean something."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
           "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]}}
    with psa_namespace("restricted") as ns:
        proc = dry_run([pod], ns)
        assert proc.returncode != 0
        for rule in ("allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile", "capabilities"):
            assert rule in proc.stderr, proc.stderr
