"""The Helm chart and the kustomize manifests: lint, render, validate against Kubernetes schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from capstan_pkg import (
    BASE,
    BASE_VALUES,
    CHART,
    CRDS,
    OVERLAY,
    OVERLAY_VALUES,
    ROOT,
    docs,
    helm_template,
    key,
    kustomize,
    rendered,
    run,
    stale,
    tool,
)

K8S_VERSION = "1.34.0"
#: Kinds kubernetes-validate has no schema for (CRDs of other projects); anything else must validate.
NO_SCHEMA = {
    ("kopf.dev/v1", "ClusterKopfPeering"),
    ("kopf.dev/v1", "KopfPeering"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

MISSING = "{} missing: run scripts/install-tools.sh"
needs_helm = pytest.mark.skipif(tool("helm") is None, reason=MISSING.format("helm"))
needs_kubectl = pytest.mark.skipif(tool("kubectl") is None, reason=MISSING.format("kubectl"))

ALL_ON: dict[str, Any] = {
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True, "namespaces": ["team-a"]},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
    }
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    "cert-manager": {"webhook": {"certManager": {"enabled": True}}},
    "cert-manager-issuer": {
        "webhook": {"certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}
    },
    "monitoring": ALL_ON,
    "everything": {
        **ALL_ON,
        "operator": {"watchNamespaces": ["team-a"], "topologyLevels": "nvlink=nvidia.com/gpu.clique,zone=z",
                     "queue": {"reserveAfterSeconds": 3600, "localitySlowdown": "rack=1.2",
                               "localityWaitFraction": 0.25, "migration": False,
                               "migrationMinRunSeconds": 1200, "guardByWait": False,
                               "migrationRestartSeconds": 90, "migrationForLocality": False,
                               "migrationDefragment": True}},
        "webhook": {"certManager": {"enabled": True}, "failurePolicy": "Ignore"},
        "image": {"digest": "sha256:" + "a" * 64},
        "podAnnotations": {"a": "b"},
    },
    "minimal": {"webhook": {"enabled": False}, "replicaCount": 1, "operator": {"peering": ""}},
    "external-webhook": {"webhook": {"url": "https://127.0.0.1:9443/", "caBundle": "Q0E="}},
}


def validate_all(objs: list[dict[str, Any]]) -> list[str]:
    """kubernetes-validate (strict) every object; kinds without a schema must be in NO_SCHEMA."""
    problems = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if (obj["apiVersion"], obj["kind"]) not in NO_SCHEMA:
                problems.append(f"{key(obj)}: no schema and not listed in NO_SCHEMA")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{key(obj)}: {path}: {exc.message}")
    return problems


@needs_helm
def test_helm_lint_strict() -> None:
    for name, values in VARIANTS.items():
        vf = ROOT / ".tools" / f"lint-{name}.yaml"
        vf.write_text(yaml.safe_dump(values))
        try:
            run([tool("helm") or "helm", "lint", "--strict", str(CHART), "--values", str(vf)])
        finally:
            vf.unlink()


@needs_helm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_helm_template_validates(variant: str) -> None:
    objs = docs(helm_template(VARIANTS[variant]))
    assert objs
    assert validate_all(objs) == []
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "CustomResourceDefinition"} <= kinds


@needs_helm
def test_schema_rejects_bad_values() -> None:
    for bad in (
        {"webhook": {"failurePolicy": "Sometimes"}},
        {"operator": {"watchNamespaces": "team-a"}},
        {"replicaCount": 0},
        {"unknownKey": 1},
        {"image": {"digest": "latest"}},
        {"operator": {"queue": {"reserveAfterSeconds": -1}}},
        {"operator": {"queue": {"localityWaitFraction": 2}}},
        {"operator": {"queue": {"migration": "sometimes"}}},
        {"operator": {"queue": {"guardByWait": "sometimes"}}},
        {"operator": {"queue": {"migrationRestartSeconds": -1}}},
        {"webhook": {"url": "https://127.0.0.1:9443"}},  # no caBundle
        {"webhook": {"url": "http://127.0.0.1:9443", "caBundle": "Q0E="}},  # not https
        {"webhook": {"url": "https://127.0.0.1:9443", "caBundle": "not base64!"}},
    ):
        with pytest.raises(RuntimeError, match="schema"):
            helm_template(bad)


@needs_helm
def test_deployment_is_hardened() -> None:
    [dep] = [o for o in docs(helm_template({})) if o["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    [c] = spec["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert {"name": "liveness", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    assert c["resources"]["limits"] and c["resources"]["requests"]
    assert c["args"][:2] == ["operator", "--all-namespaces"] and "--peering=capstan" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CAPSTAN_WEBHOOK_CERT_DIR"] == "/etc/capstan/webhook-tls"
    assert "CAPSTAN_WEBHOOK_MANAGED" not in env  # Helm owns the webhook configurations
    defaults_only = ("CAPSTAN_QUEUE", "CAPSTAN_LOCALITY", "CAPSTAN_MIGRATION")
    assert not any(name.startswith(defaults_only) for name in env)


@needs_helm
def test_queue_settings_reach_the_operator_environment() -> None:
    [dep] = [o for o in docs(helm_template(VARIANTS["everything"])) if o["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS"] == "3600"
    assert env["CAPSTAN_LOCALITY_SLOWDOWN"] == "rack=1.2"
    assert env["CAPSTAN_LOCALITY_WAIT_FRACTION"] == "0.25"
    assert env["CAPSTAN_MIGRATION"] == "off" and env["CAPSTAN_MIGRATION_MIN_RUN_SECONDS"] == "1200"
    from capstan.config import OperatorConfig

    policy = OperatorConfig.from_env({k: v for k, v in env.items() if v is not None}).queue
    assert (policy.reserve_after_s, policy.locality_wait_fraction) == (3600, 0.25)
    assert not policy.migration and policy.moves.min_run_s == 1200
    assert env["CAPSTAN_QUEUE_GUARD_BY_WAIT"] == "off" and env["CAPSTAN_MIGRATION_RESTART_SECONDS"] == "90"
    assert not policy.guard_by_wait and policy.moves.restart_s == 90


@needs_helm
def test_namespaced_install_uses_roles() -> None:
    objs = docs(helm_template(VARIANTS["namespaced"]))
    roles = [o for o in objs if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    [cr] = [o for o in objs if o["kind"] == "ClusterRole"]
    cluster_resources = {r for rule in cr["rules"] for r in rule["resources"]}
    # cluster-wide reads only: nodes, CRD discovery, and listing pods for placement's GPU count
    assert cluster_resources == {"nodes", "customresourcedefinitions", "pods"}
    [pods_rule] = [rule for rule in cr["rules"] if rule["resources"] == ["pods"]]
    assert pods_rule["verbs"] == ["list"]
    no_read = docs(helm_template({**VARIANTS["namespaced"], "rbac": {"namespacedPodRead": False}}))
    [cr] = [o for o in no_read if o["kind"] == "ClusterRole"]
    assert {r for rule in cr["rules"] for r in rule["resources"]} == {"nodes", "customresourcedefinitions"}
    peerings = [o for o in objs if o["kind"] == "KopfPeering"]
    assert len(peerings) == 2 and not [o for o in objs if o["kind"] == "ClusterKopfPeering"]
    [dep] = [o for o in objs if o["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--all-namespaces" not in args
    [vwc] = [o for o in objs if o["kind"] == "ValidatingWebhookConfiguration"]
    for hook in vwc["webhooks"]:
        assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]


@needs_helm
def test_webhook_tls_variants() -> None:
    gen = docs(helm_template({}))
    [secret] = [o for o in gen if o["kind"] == "Secret"]
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    [vwc] = [o for o in gen if o["kind"] == "ValidatingWebhookConfiguration"]
    assert all(h["clientConfig"]["caBundle"] == secret["data"]["ca.crt"] for h in vwc["webhooks"])
    assert not [o for o in gen if o["kind"] == "MutatingWebhookConfiguration"]  # no mutation, no drift
    # The service paths are the kopf handler ids the operator registers.
    from capstan.admission import WEBHOOK_IDS

    paths = {h["clientConfig"]["service"]["path"] for h in vwc["webhooks"]}
    assert paths == {f"/{i}" for i in WEBHOOK_IDS.values()}
    assert all(h["clientConfig"]["service"]["port"] == 443 for h in vwc["webhooks"])

    cm = docs(helm_template(VARIANTS["cert-manager"]))
    assert not [o for o in cm if o["kind"] == "Secret"]
    [cert] = [o for o in cm if o["kind"] == "Certificate"]
    [vwc] = [o for o in cm if o["kind"] == "ValidatingWebhookConfiguration"]
    inject = vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert inject == "capstan-system/capstan-webhook"
    assert cert["spec"]["secretName"] == "capstan-webhook-tls"
    assert "capstan-webhook.capstan-system.svc" in cert["spec"]["dnsNames"]
    assert all("caBundle" not in h["clientConfig"] for h in vwc["webhooks"])

    # webhook.url: the API server calls an operator outside the cluster, trusting the given CA.
    for extra in ({}, {"certManager": {"enabled": True}}):
        values = {"webhook": {"url": "https://127.0.0.1:9443/", "caBundle": "Q0E=", **extra}}
        [vwc] = [o for o in docs(helm_template(values)) if o["kind"] == "ValidatingWebhookConfiguration"]
        assert [h["clientConfig"] for h in vwc["webhooks"]] == [
            {"url": f"https://127.0.0.1:9443/{i}", "caBundle": "Q0E="} for i in WEBHOOK_IDS.values()
        ]
        assert "cert-manager.io/inject-ca-from" not in (vwc["metadata"].get("annotations") or {})


def test_chart_crds_match_generated() -> None:
    generated = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert generated, "crds/ is empty"
    chart = CHART / "crds"
    for name in generated:
        assert (chart / name).read_text() == (CRDS / name).read_text(), (
            f"charts/capstan/crds/{name} differs from crds/{name}: run `make crds` "
            "or `python tests/packaging/capstan_pkg.py sync`"
        )
    extra = {p.name for p in chart.glob("capstan.dev_*.yaml")} - set(generated)
    assert not extra, f"stale CRDs in the chart: {extra}"


@needs_helm
def test_manifests_are_in_sync_with_chart() -> None:
    assert stale() == [], "run `python tests/packaging/capstan_pkg.py sync`"


@needs_kubectl
@needs_helm
@pytest.mark.parametrize(
    ("path", "values"), [(BASE, BASE_VALUES), (OVERLAY, OVERLAY_VALUES)], ids=["base", "overlay"]
)
def test_kustomize_builds_validate_and_match_chart(path: Path, values: dict[str, Any]) -> None:
    built = kustomize(path)
    assert validate_all(built) == []
    want = {key(o): o for o in rendered(values)}
    got = {key(o): o for o in built if o["kind"] != "Namespace"}
    assert sorted(got) == sorted(want)
    for k, obj in want.items():
        assert got[k] == obj, f"{k} differs between kustomize {path.name} and helm template"


def test_samples_parse_and_validate() -> None:
    from capstan.admission import validate
    from capstan.api.loading import load_documents

    samples = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
    assert len(samples) >= 8
    nodes = [
        {"metadata": {"name": f"n{i}", "labels": {"nvidia.com/gpu.clique": "c1"}},
         "status": {"allocatable": {"nvidia.com/gpu": "8"}}}
        for i in range(8)
    ]
    for path in samples:
        for doc in load_documents(path):
            if doc.get("apiVersion", "").startswith("capstan.dev/"):
                assert validate(doc, nodes) == [], f"{path.name}: {doc['metadata']['name']}"
            else:
                assert validate_all([doc]) == [], path.name
