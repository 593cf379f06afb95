"""The chart's RBAC grants exactly what the operator uses.

Observed calls come from ``tests/kube/rbac_calls.py``: the real operator runs the core scenarios
against the kmock API emulator and we collect every (verb, apiGroup, resource, subresource) it
requested. Each must be granted by the ClusterRole ``helm template`` renders (cluster-wide
install), and every grant must be used by some observed call or be listed in ``DOCUMENTED``
below with the reason the scenarios cannot show it.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Iterable
from typing import Any

import pytest
from capstan_pkg import ROOT, docs, helm_template, tool

Call = tuple[str, str, str]  # (verb, apiGroup, resource[/subresource])

# Needs the emulator scenarios do not exercise. Keep every entry commented.
DOCUMENTED: dict[Call, str] = {}


def _doc(reason: str, verbs: Iterable[str], group: str, resources: Iterable[str]) -> None:
    for r in resources:
        for v in verbs:
            DOCUMENTED[(v, group, r)] = reason


# kopf peering (leader election among replicas): the tests run the operator --standalone.
_doc("kopf peering: replicas read and patch the peering object's status", ["get", "list", "watch", "patch"],
     "kopf.dev", ["clusterkopfpeerings", "kopfpeerings"])
# kopf's runtime CRD discovery (the emulator serves discovery without a CRD watch).
_doc("kopf watches CRDs to notice served versions appearing or going", ["list", "watch"],
     "apiextensions.k8s.io", ["customresourcedefinitions"])
# Nodes: placement lists them (observed); the admission webhook's capacity checks list them too;
# get is for single-node lookups of a placed gang; watch for a node informer.
_doc("placement and webhook capacity checks read Nodes", ["get", "list", "watch"], "", ["nodes"])
# Single-object reads used on conflict paths and by the ModelServing executor.
_doc("get after create-if-absent conflicts, reads of single children", ["get"], "",
     ["pods", "services", "persistentvolumeclaims", "events"])
_doc("event aggregation: a repeated Event gets its count patched", ["patch"], "", ["events"])
# the core scenarios run no trainer that answers checkpoint requests (tests/kube/test_checkpoint_kube.py)
_doc("checkpoint requests: rank 0's pod is annotated capstan.dev/checkpoint-request", ["patch"], "", ["pods"])
_doc("watch of children for prompt wake-ups", ["watch"], "", ["pods", "services", "persistentvolumeclaims"])
_doc("ModelServing lists its Services and PVCs by label, applies them (server-side apply = patch)",
     ["list", "patch"], "", ["services", "persistentvolumeclaims"])
_doc("checkpoint PVC creation (the core scenarios have no checkpoint volume); ModelServing model PVCs",
     ["create"], "", ["persistentvolumeclaims"])
_doc("cleanup of children the owner-reference GC does not cover (non-retained PVCs, old revisions)",
     ["delete"], "", ["services", "persistentvolumeclaims"])
_doc("Capstan resources: kopf reads, watches, patches finalizers/annotations; TTL deletes",
     ["get", "list", "watch", "patch", "delete"], "capstan.dev", ["trainingjobs", "modelservings"])
_doc("status subresource reads and patches", ["get", "patch"], "capstan.dev",
     ["trainingjobs/status", "modelservings/status"])
# ModelServing children (exercised by tests/kube/test_modelserving_kube.py, not by core scenarios).
for _group, _res in (("apps", "deployments"), ("autoscaling", "horizontalpodautoscalers"), ("batch", "jobs"),
                     ("gateway.networking.k8s.io", "httproutes"), ("keda.sh", "scaledobjects"),
                     ("leaderworkerset.x-k8s.io", "leaderworkersets"), ("apps", "controllerrevisions")):
    _doc("ModelServing revisions (multi-host: LeaderWorkerSets or group ControllerRevisions), autoscaling "
         "(HPA or KEDA), Gateway API traffic split",
         ["get", "list", "watch", "create", "patch", "delete"], _group, [_res])
# Inference routing's grants (InferencePools, endpoint pickers' ServiceAccounts, Roles and
# RoleBindings) exist only with routing.endpointPickers: true; see the last test.
# spec.networkPolicy is off in the core scenarios (tests/kube/test_network_policy_kube.py covers it).
_doc("NetworkPolicies: created with a gang; a ModelServing's listed, applied (patch) and deleted; get on "
     "conflicts", ["get", "list", "create", "patch", "delete"], "networking.k8s.io", ["networkpolicies"])
# CSI snapshots need a snapshot controller the emulator does not have.
_doc("checkpoint snapshots: taken on schedule, listed for restore, pruned to keep",
     ["get", "list", "watch", "create", "delete"], "snapshot.storage.k8s.io", ["volumesnapshots"])


def granted(rules: list[dict[str, Any]]) -> set[Call]:
    out = set()
    for rule in rules:
        assert "*" not in rule.get("verbs", []) and "*" not in rule.get("resources", []), rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((verb, group, res))
    return out


def allowed(call: Call, grants: set[Call]) -> bool:
    return call in grants


def compare(observed: set[Call], rules: list[dict[str, Any]]) -> tuple[list[Call], list[Call]]:
    """(calls the rules do not allow, grants no call and no documented need uses)."""
    grants = granted(rules)
    missing = sorted(c for c in observed if not allowed(c, grants))
    unused = sorted(g for g in grants if g not in observed and g not in DOCUMENTED)
    return missing, unused


def observed_calls() -> set[Call]:
    """Run the core emulator scenarios with the real operator; the RBAC calls it made."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from tests.kube.rbac_calls import rbac_calls
        from tests.kube.scenarios import CORE_SCENARIOS, Env
        from tests.support.kube import emulated_cluster, running_operator, test_client
    except ImportError as exc:
        pytest.skip(f"tests/kube/rbac_calls.py or the emulator is not available: {exc}")

    async def run_all() -> set[tuple[str, str, str, str]]:
        calls: set[tuple[str, str, str, str]] = set()
        for scenario in CORE_SCENARIOS:
            async with emulated_cluster() as (emulator, url):
                api = test_client(url)
                try:
                    env = Env(api=api, namespace="default", operator=functools.partial(running_operator, url))
                    # A failing scenario is tests/kube's business; its calls up to there still count.
                    await asyncio.wait_for(scenario(env), timeout=60)
                except Exception as exc:
                    print(f"scenario {scenario.__name__} failed: {exc!r}", file=sys.stderr)
                finally:
                    await api.close()
                calls |= rbac_calls(emulator)
        return calls

    raw = asyncio.run(run_all())
    return {(verb, group, f"{res}/{sub}" if sub else res) for verb, group, res, sub in raw}


@pytest.fixture(scope="module")
def cluster_rules() -> list[dict[str, Any]]:
    if tool("helm") is None:
        pytest.skip("helm missing: run scripts/install-tools.sh")
    [role] = [o for o in docs(helm_template({})) if o["kind"] == "ClusterRole"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_compare_logic() -> None:
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "escalate"]}]
    missing, unused = compare({("create", "", "pods"), ("delete", "", "pods")}, rules)
    assert missing == [("delete", "", "pods")]
    assert unused == [("escalate", "", "pods")]


def test_documented_needs_are_granted(cluster_rules: list[dict[str, Any]]) -> None:
    grants = granted(cluster_rules)
    # Namespaced peering lives in the namespaced Roles, not the cluster-wide ClusterRole.
    stale = sorted(c for c in DOCUMENTED if c not in grants and c[2] != "kopfpeerings")
    assert not stale, f"allowlisted but not granted (remove from DOCUMENTED?): {stale}"


def test_no_admission_or_secret_access(cluster_rules: list[dict[str, Any]]) -> None:
    resources = {r for rule in cluster_rules for r in rule["resources"]}
    assert not resources & {"secrets", "validatingwebhookconfigurations", "mutatingwebhookconfigurations",
                            "roles", "rolebindings", "clusterroles", "clusterrolebindings", "namespaces"}


def test_clusterrole_matches_operator_calls(cluster_rules: list[dict[str, Any]]) -> None:
    observed = observed_calls()
    assert observed, "the scenarios made no API calls"
    missing, unused = compare(observed, cluster_rules)
    assert not missing, f"the operator made calls the ClusterRole does not allow: {missing}"
    assert not unused, f"granted but neither used nor documented in DOCUMENTED: {unused}"


def test_endpoint_pickers_are_opt_in_and_the_operator_holds_what_their_role_grants() -> None:
    """routing.endpointPickers: true grants roles and rolebindings (never held otherwise: see the
    test above) and every permission a picker's Role gives: RBAC lets the operator grant only what
    it holds. The operator is told through CAPSTAN_ENDPOINT_PICKERS."""
    from capstan.serving.inference import EPP_RULES

    if tool("helm") is None:
        pytest.skip("helm missing: run scripts/install-tools.sh")
    objs = docs(helm_template({"routing": {"endpointPickers": True}}))
    [role] = [o for o in objs if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("operator")]
    grants = granted(role["rules"])
    for rule in EPP_RULES:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                assert {(v, group, res) for v in rule["verbs"]} <= grants, (group, res)
    made = {("", "serviceaccounts"), ("rbac.authorization.k8s.io", "roles"),
            ("rbac.authorization.k8s.io", "rolebindings"), ("inference.networking.k8s.io", "inferencepools")}
    for group, res in made:
        assert {(v, group, res) for v in ("get", "list", "watch", "create", "patch", "delete")} <= grants
    [dep] = [o for o in objs if o["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CAPSTAN_ENDPOINT_PICKERS"] == "on"
    default = docs(helm_template({}))
    [dep] = [o for o in default if o["kind"] == "Deployment"]
    names = {e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "CAPSTAN_ENDPOINT_PICKERS" not in names
