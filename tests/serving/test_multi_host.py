"""Multi-host ModelServing replicas: a leader and workers per replica, as a LeaderWorkerSet or as
Capstan-managed groups placed by the topology placer and restarted as a unit."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

from sim import T0, at, make_ms

from capstan.labels import LABEL_GROUP, LABEL_GROUP_RANK, LABEL_REVISION, LABEL_SERVING
from capstan.serving.groups import PROGRESS_DEADLINE_S, plan_groups
from capstan.serving.plan import Observed, plan_modelserving
from capstan.topology.inventory import build_inventory

VLLM = {"runtime": "vllm", "gpu": True, "tensorParallel": 8, "pipelineParallel": 2, "replicas": 2}
NVL = {"runtime": "sglang", "gpu": True, "tensorParallel": 16, "gpusPerPod": 4, "replicas": 2}


def node(name: str, gpus: int, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def clique_nodes(cliques: dict[str, int], gpus: int = 4) -> list[dict[str, Any]]:
    """NVL72-style nodes: ``cliques`` maps a clique to its node count."""
    return [
        node(f"{c}-n{i}", gpus, **{"nvidia.com/gpu.clique": c}) for c, n in cliques.items() for i in range(n)
    ]


def server(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "server")


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def with_uid(obj: dict[str, Any], created: Any = T0) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"]["uid"] = "cr-uid"
    out["metadata"]["creationTimestamp"] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out


def running(pods: list[dict[str, Any]], ready_at: Any = T0, restarts: int = 0) -> list[dict[str, Any]]:
    """The pods as the kubelet would report them once started and Ready."""
    out = []
    for p in pods:
        p = copy.deepcopy(p)
        p["status"] = {
            "phase": "Running",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastTransitionTime": ready_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            ],
            "containerStatuses": [{"name": "server", "restartCount": restarts}],
        }
        out.append(p)
    return out


def test_vllm_pipeline_stages_render_a_group_revision_without_leaderworkerset() -> None:
    ms = make_ms(**VLLM)
    plan = plan_modelserving(ms, Observed(), at(0))
    kinds = sorted(o["kind"] for o in plan.objects)
    assert kinds == ["ControllerRevision", "Service", "Service", "Service"]  # no Deployment
    (cr,) = by_kind(plan.objects, "ControllerRevision")
    rev = plan.status.stable_revision
    assert cr["metadata"]["name"] == rev and cr["metadata"]["annotations"]["capstan.dev/replicas"] == "2"
    data = cr["data"]
    assert (data["size"], data["gpusPerPod"], data["policy"], data["maxDomain"]) == (
        2,
        8,
        "Preferred",
        "nvlink",
    )
    leader, worker = server(data["leader"]), server(data["worker"])
    assert leader["command"] == ["/bin/bash", "-c"] and worker["command"] == ["/bin/bash", "-c"]
    (lead,) = leader["args"]
    assert (
        "multi-node-serving.sh leader --ray_cluster_size=$(LWS_GROUP_SIZE) && exec python3 -m "
        "vllm.entrypoints.openai.api_server" in lead
    )
    assert (
        "--tensor-parallel-size 8 --port 8000 --pipeline-parallel-size 2 --distributed-executor-backend ray"
        in lead
    )
    assert worker["args"] == [
        "bash /vllm-workspace/examples/online_serving/multi-node-serving.sh worker "
        "--ray_address=$(LWS_LEADER_ADDRESS)"
    ]
    assert (
        leader["resources"]["limits"]["nvidia.com/gpu"]
        == "8"
        == worker["resources"]["limits"]["nvidia.com/gpu"]
    )
    # the leader serves (Services select it, probes and scrapes read it); a worker only joins
    assert data["leader"]["metadata"]["labels"][LABEL_REVISION] == rev
    assert LABEL_SERVING not in data["worker"]["metadata"]["labels"]
    assert "readinessProbe" in leader and not {"readinessProbe", "ports"} & set(worker)
    assert "prometheus.io/scrape" not in data["worker"]["metadata"]["annotations"]
    headless = next(
        o for o in plan.objects if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"
    )
    assert (
        headless["spec"]["publishNotReadyAddresses"] is True
        and headless["metadata"]["name"] == data["subdomain"]
    )


def test_leaderworkerset_when_the_cluster_serves_it() -> None:
    ms = make_ms(**NVL)
    plan = plan_modelserving(ms, Observed(), at(0), lws=True)
    assert not by_kind(plan.objects, "Deployment") and not by_kind(plan.objects, "ControllerRevision")
    (lws,) = by_kind(plan.objects, "LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and lws["spec"]["replicas"] == 2
    tpl = lws["spec"]["leaderWorkerTemplate"]
    assert tpl["size"] == 4 and tpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    for pod in (tpl["leaderTemplate"], tpl["workerTemplate"]):
        # TP spans the pods: every pod of a group in the group's NVLink clique
        (term,) = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "nvidia.com/gpu.clique"
        assert term["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"]
        args = server(pod)["args"]
        assert args[args.index("--tp-size") + 1] == "16" and args[args.index("--nnodes") + 1] == "4"
        assert "$(LWS_WORKER_INDEX)" in args and "$(LWS_LEADER_ADDRESS):20000" in args
        assert server(pod)["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_autoscaled_groups_scale_a_leaderworkerset_or_are_refused_without_one() -> None:
    ms = make_ms(
        **{**VLLM, "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "queue", "target": 5}}
    )
    plan = plan_modelserving(ms, Observed(), at(0), lws=True)
    (hpa,) = by_kind(plan.objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    refused = plan_modelserving(ms, Observed(), at(0), lws=False)
    assert not by_kind(refused.objects, "ControllerRevision")
    assert "autoscaled through LeaderWorkerSet's scale subresource" in refused.status.message


def _group_revision(spec: dict[str, Any], replicas: int | None = None) -> dict[str, Any]:
    ms = make_ms(**spec)
    plan = plan_modelserving(ms, Observed(), at(0))
    (cr,) = by_kind(plan.objects, "ControllerRevision")
    cr = with_uid(cr)
    if replicas is not None:
        cr["metadata"]["annotations"]["capstan.dev/replicas"] = str(replicas)
    return cr


def test_groups_are_placed_whole_inside_one_nvlink_clique() -> None:
    cr = _group_revision(NVL)
    # c1 has 16 GPUs, 4 of them taken; c2 and c3 have 16 free each: BestFit fills c2 then c3
    nodes = clique_nodes({"c1": 4, "c2": 4, "c3": 4})
    busy = {
        "metadata": {"name": "x"},
        "spec": {
            "nodeName": "c1-n0",
            "containers": [{"name": "x", "resources": {"requests": {"nvidia.com/gpu": "4"}}}],
        },
        "status": {"phase": "Running"},
    }
    actions = plan_groups(cr, [], build_inventory(nodes, [busy]))
    assert not actions.waiting and len(actions.create) == 8
    cliques: dict[str, set[str]] = {}
    for pod in actions.create:
        labels = pod["metadata"]["labels"]
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        # the pin is ANDed into every (ORed) term, beside the GPU-count expressions
        pins = {f["values"][0] for t in terms for f in t["matchFields"] if f["key"] == "metadata.name"}
        assert len(pins) == 1 and all(t["matchFields"] and t["matchExpressions"] for t in terms)
        cliques.setdefault(labels[LABEL_GROUP], set()).add(pins.pop().split("-")[0])
        env = {e["name"]: e["value"] for e in server(pod)["env"] if e["name"].startswith("LWS_")}
        rev = cr["metadata"]["name"]
        assert env == {
            "LWS_LEADER_ADDRESS": f"{rev}-{labels[LABEL_GROUP]}-0.{rev}-g.ml",
            "LWS_GROUP_SIZE": "4",
            "LWS_WORKER_INDEX": labels[LABEL_GROUP_RANK],
        }
        assert pod["spec"]["hostname"] == pod["metadata"]["name"] and pod["spec"]["subdomain"] == f"{rev}-g"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "ControllerRevision"
    # c1 has 12 free GPUs: neither 16-GPU group fits there, and none is split across cliques
    assert sorted(map(sorted, cliques.values())) == [["c2"], ["c3"]]


def test_a_group_waits_whole_when_no_clique_has_room() -> None:
    cr = _group_revision(NVL)
    actions = plan_groups(cr, [], build_inventory(clique_nodes({"c1": 4, "c2": 2})))
    # one 16-GPU clique: group 0 goes there; c2 has 8 GPUs and group 1 never splits across cliques
    assert {p["metadata"]["labels"][LABEL_GROUP] for p in actions.create} == {"0"}
    assert actions.waiting.startswith("group 1:")
    assert plan_groups(cr, [], None).waiting == "the Nodes could not be read to place the groups"


def test_a_group_restarts_as_a_unit_when_one_pod_restarts() -> None:
    cr = _group_revision(NVL)
    inv = build_inventory(clique_nodes({"c1": 4, "c2": 4}))
    pods = running(plan_groups(cr, [], inv).create)
    assert plan_groups(cr, pods, inv).create == [] and plan_groups(cr, pods, inv).delete == []
    crashed = [copy.deepcopy(p) for p in pods]
    worker = next(
        p
        for p in crashed
        if p["metadata"]["labels"][LABEL_GROUP] == "1" and p["metadata"]["labels"][LABEL_GROUP_RANK] == "2"
    )
    worker["status"]["containerStatuses"][0]["restartCount"] = 1
    actions = plan_groups(cr, crashed, inv)
    group1 = sorted(p["metadata"]["name"] for p in pods if p["metadata"]["labels"][LABEL_GROUP] == "1")
    assert sorted(actions.delete) == group1 and actions.create == []
    assert actions.restarted == [(1, f"a container of pod {worker['metadata']['name']} restarted")]
    # once its pods are gone the group is made again, whole; group 0 is left alone throughout
    left = [p for p in pods if p["metadata"]["labels"][LABEL_GROUP] == "0"]
    again = plan_groups(cr, left, build_inventory(clique_nodes({"c1": 4, "c2": 4}), left))
    assert sorted(p["metadata"]["name"] for p in again.create) == group1 and again.delete == []
    # a vanished pod breaks its group too
    missing = [p for p in pods if p["metadata"]["name"] != group1[0]]
    assert sorted(plan_groups(cr, missing, inv).delete) == group1[1:]


def test_scaling_down_deletes_whole_groups_from_the_top() -> None:
    inv = build_inventory(clique_nodes({"c1": 4, "c2": 4}))
    pods = running(plan_groups(_group_revision(NVL), [], inv).create)
    actions = plan_groups(_group_revision(NVL, replicas=1), pods, inv)
    assert sorted(actions.delete) == sorted(
        p["metadata"]["name"] for p in pods if p["metadata"]["labels"][LABEL_GROUP] == "1"
    )
    assert actions.restarted == [] and actions.create == []


def test_ready_groups_drive_the_rollout_and_a_stuck_group_revision_rolls_back() -> None:
    ms = make_ms(**NVL)
    inv = build_inventory(clique_nodes({"c1": 4, "c2": 4}))
    plan = plan_modelserving(ms, Observed(), at(0))
    cr = with_uid(by_kind(plan.objects, "ControllerRevision")[0])
    ms = ms.model_copy(update={"status": plan.status})
    pods = plan_groups(cr, [], inv).create
    half = running(pods[:4]) + pods[4:]  # group 0 ready, group 1 still starting
    plan = plan_modelserving(ms, Observed(deployments=[cr], group_pods=half), at(30))
    assert plan.status.phase == "Progressing" and plan.status.revisions[0].ready == 1
    plan = plan_modelserving(ms, Observed(deployments=[cr], group_pods=running(pods)), at(60))
    assert plan.status.phase == "Ready" and plan.status.replicas == 2
    ms = ms.model_copy(update={"status": plan.status})
    # a new revision (more pipeline stages) whose groups never become ready is rolled back
    new = make_ms(generation=2, **{**NVL, "pipelineParallel": 2, "rollout": {"steps": [{"weight": 50}]}})
    new = new.model_copy(update={"status": ms.status})
    later = T0 + timedelta(seconds=100)
    plan = plan_modelserving(new, Observed(deployments=[cr], group_pods=running(pods)), later)
    canary = plan.status.canary_revision
    assert canary and canary != cr["metadata"]["name"]
    cr2 = with_uid(
        next(o for o in by_kind(plan.objects, "ControllerRevision") if o["metadata"]["name"] == canary), later
    )
    new = new.model_copy(update={"status": plan.status})
    stuck = later + timedelta(seconds=PROGRESS_DEADLINE_S + 1)
    plan = plan_modelserving(new, Observed(deployments=[cr, cr2], group_pods=running(pods)), stuck)
    assert plan.status.canary_revision is None and canary in plan.status.failed_revisions
    assert plan.status.stable_revision == cr["metadata"]["name"]


def test_single_pod_replicas_keep_their_revision() -> None:
    # the new fields are unset by default, so no existing ModelServing rolls out on upgrade
    wire = make_ms(runtime="vllm", gpu=True, tensorParallel=8).spec.wire()
    assert not {"pipelineParallel", "gpusPerPod", "topology"} & set(wire)
    plan = plan_modelserving(make_ms(runtime="vllm", gpu=True, tensorParallel=8), Observed(), at(0))
    assert by_kind(plan.objects, "Deployment") and not by_kind(plan.objects, "ControllerRevision")


def test_why_groups_wait_shows_in_the_status() -> None:
    ms = make_ms(**NVL)
    plan = plan_modelserving(ms, Observed(), at(0))
    cr = with_uid(by_kind(plan.objects, "ControllerRevision")[0])
    ms = ms.model_copy(update={"status": plan.status})
    inv = build_inventory(clique_nodes({"c1": 4, "c2": 2}))
    actions = plan_groups(cr, [], inv)
    seen = Observed(
        deployments=[cr],
        group_pods=running(actions.create),
        group_waiting={actions.revision: actions.waiting},
    )
    plan = plan_modelserving(ms, seen, at(30))
    assert plan.status.phase == "Progressing"
    assert (
        plan.status.message
        == f"{cr['metadata']['name']}: 1/2 replicas ready (groups wait: {actions.waiting})"
    )


def test_group_pods_reach_one_another_under_a_network_policy() -> None:
    plan = plan_modelserving(make_ms(**NVL, networkPolicy={}), Observed(), at(0))
    policies = {o["metadata"]["name"]: o for o in by_kind(plan.objects, "NetworkPolicy")}
    assert set(policies) == {"gpt", "gpt-groups"}
    group = policies["gpt-groups"]["spec"]
    assert group["podSelector"] == {"matchLabels": {"capstan.dev/serving-group-of": "gpt"}}
    assert group["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"capstan.dev/serving-group-of": "gpt"}}}]}
    ]
    # single-pod replicas need none, and one left from multi-host revisions goes with them
    single = make_ms(networkPolicy={})
    left = Observed(children=[policies["gpt-groups"]])
    plan = plan_modelserving(single, left, at(0))
    assert [r.name for r in plan.deletes if r.kind == "NetworkPolicy"] == ["gpt-groups"]
    assert "gpt-groups" not in {o["metadata"]["name"] for o in by_kind(plan.objects, "NetworkPolicy")}


def test_groups_place_around_gangs_placed_but_not_created_yet() -> None:
    import asyncio
    import logging

    from tests.api.bodies import make_trainingjob

    from capstan.kube.servinggroups import cluster_inventory

    gang = make_trainingjob("t").namespace("ml").uid("u").workers(4).gpus(4).obj()
    gang["status"] = {
        "phase": "Starting",
        "attempt": 0,
        "placement": {"nodes": [f"c1-n{i}" for i in range(4)]},
    }

    class Lister:
        async def list_objects(self, res: Any, namespace: str | None = None, *_: Any) -> list[dict[str, Any]]:
            return {"Node": clique_nodes({"c1": 4, "c2": 4}), "Pod": [], "TrainingJob": [gang]}[res.kind]

    memo: Any = {}
    inv = asyncio.run(cluster_inventory(Lister(), memo, "ml", logging.getLogger("t")))  # type: ignore[arg-type]
    assert inv is not None
    actions = plan_groups(_group_revision(NVL, replicas=1), [], inv)
    # c1 is held by the gang whose pods the queue decided but has not created: the group goes to c2
    assert {
        p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]["matchFields"][0]["values"][0].split("-")[0]
        for p in actions.create
    } == {"c2"}
