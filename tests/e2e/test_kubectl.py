"""What users and GitOps tools see through kubectl: printer columns, short names, ``kubectl explain``,
and a server-side re-apply after the operator reconciled that changes nothing."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from tests.api.bodies import make_modelserving, make_trainingjob
from tests.e2e.conftest import ROOT, Cluster, wait_until

pytestmark = pytest.mark.e2e

CRDS = ROOT / "crds"
SAMPLES = ROOT / "manifests" / "samples"
UNSCHEDULABLE = {"capstan.dev/e2e-unschedulable": "true"}


def crd(plural: str) -> dict[str, Any]:
    return dict(yaml.safe_load((CRDS / f"capstan.dev_{plural}.yaml").read_text()))


def table(text: str) -> list[list[str]]:
    """kubectl's table output as rows of cells (cells are separated by 2+ spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


def get_json(cluster: Cluster, namespace: str, what: str) -> dict[str, Any]:
    out = cluster.kubectl("get", what, "-n", namespace, "-o", "json", "--show-managed-fields").stdout
    return dict(json.loads(out))


def test_printer_columns_short_names_and_explain(cluster: Cluster, namespace: str) -> None:
    job = (
        make_trainingjob("cols")
        .image("registry.example/trainer:1")
        .workers(2)
        .gpus(0)
        .spec(nodeSelector=UNSCHEDULABLE)
        .obj()
    )
    serving = (
        make_modelserving("cols")
        .uri("hf://org/model")
        .spec(
            gpu=False,
            nodeSelector=UNSCHEDULABLE,
            # an HPA per revision: the chart's autoscaling rules are exercised too
            autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "cpu", "target": 80},
        )
        .obj()
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all([job, serving]))
    # Settled: Starting, its workers unschedulable, the scheduler's reason in the message (it stays
    # until a pod changes; the gang's first status says only that the workers do not run yet).
    tj = wait_until(lambda: get_json(cluster, namespace, "tj/cols"),
                    lambda o: (o.get("status") or {}).get("phase") == "Starting"
                    and "not scheduled" in o["status"].get("message", ""), what="tj Starting")
    ms = wait_until(lambda: get_json(cluster, namespace, "ms/cols"),
                    lambda o: bool((o.get("status") or {}).get("stableRevision")), what="ms revision")

    columns = crd("trainingjobs")["spec"]["versions"][0]["additionalPrinterColumns"]
    rows = table(cluster.kubectl("get", "tj", "-n", namespace).stdout)
    assert rows[0] == ["NAME", *[c["name"].upper() for c in columns if not c.get("priority")]]
    assert rows[1][:5] == ["cols", "Starting", "2", "0", "0"]
    wide = table(cluster.kubectl("get", "trainingjobs", "-n", namespace, "-o", "wide").stdout)
    assert wide[0] == ["NAME", *[c["name"].upper() for c in columns]]
    assert tj["status"]["message"] in wide[1]

    columns = crd("modelservings")["spec"]["versions"][0]["additionalPrinterColumns"]
    rows = table(cluster.kubectl("get", "ms", "-n", namespace).stdout)
    assert rows[0] == ["NAME", *[c["name"].upper() for c in columns if not c.get("priority")]]
    phase, stable = ms["status"]["phase"], ms["status"]["stableRevision"]
    hpa = get_json(cluster, namespace, f"hpa/{stable}")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 2)
    assert rows[1][:5] == ["cols", phase, "capstan", str(ms["status"]["replicas"]), stable]

    # The `capstan` category lists both kinds.
    names = cluster.kubectl("get", "capstan", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(names) == ["modelserving.capstan.dev/cols", "trainingjob.capstan.dev/cols"]

    # `kubectl explain` shows the descriptions written in the pydantic models.
    explained = " ".join(cluster.kubectl("explain", "trainingjob.spec.topology").stdout.split())
    topology = crd("trainingjobs")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["topology"]
    assert "The smallest domain" in explained or topology["description"] in explained
    for field, schema in topology["properties"].items():
        assert f"{field} <{schema['type']}>" in explained
        assert " ".join(schema["description"].split()) in explained, field
    explained = " ".join(cluster.kubectl("explain", "modelservings.spec.rollout.steps").stdout.split())
    assert "Percent of traffic to the new revision." in explained


GITOPS = ("trainingjob-local.yaml", "modelserving-custom.yaml")
MANAGER = "gitops-e2e"


def test_gitops_reapply_after_reconcile_changes_nothing(cluster: Cluster, namespace: str) -> None:
    """Argo CD / Flux apply server-side under their own field manager. After the operator has
    reconciled (finalizer, status, children), the same manifests diff clean and re-apply as a no-op:
    the operator owns no field of the spec."""
    files = [a for f in GITOPS for a in ("-f", str(SAMPLES / f))]
    cluster.kubectl("apply", "--server-side", f"--field-manager={MANAGER}", "-n", namespace, *files)

    def reconciled(obj: dict[str, Any]) -> bool:
        meta, status = obj["metadata"], obj.get("status") or {}
        return "capstan.dev/finalizer" in (meta.get("finalizers") or []) and \
            status.get("observedGeneration") == meta["generation"]

    # Settled: the job's workers wait for their checkpoint volume (no provisioner here), the
    # server runs on a fake GPU node. The status no longer changes, so a diff is only drift.
    tj = wait_until(lambda: get_json(cluster, namespace, "tj/gpt-tiny"),
                    lambda o: reconciled(o) and "not running" in o["status"].get("message", ""),
                    what="tj reconciled")
    ms = wait_until(lambda: get_json(cluster, namespace, "ms/sglang-qwen"),
                    lambda o: reconciled(o) and o["status"].get("phase") == "Ready", what="ms Ready")

    def diff() -> Any:
        return cluster.kubectl("diff", "--server-side", f"--field-manager={MANAGER}", "-n", namespace,
                               *files, check=False)

    # A status write landing between kubectl's read and its dry run shows as a diff once: retried.
    clean = wait_until(diff, lambda d: d.returncode == 0, timeout=10, what="an empty kubectl diff")
    assert clean.stdout == ""
    again = cluster.kubectl("apply", "--server-side", f"--field-manager={MANAGER}", "-n", namespace, *files)
    assert again.stdout.count("serverside-applied") == 2

    for before, what in ((tj, "tj/gpt-tiny"), (ms, "ms/sglang-qwen")):
        after = get_json(cluster, namespace, what)
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"] == before["spec"]
        managed = after["metadata"]["managedFields"]
        assert {m["manager"] for m in managed if "f:spec" in m.get("fieldsV1", {})} == {MANAGER}, managed
