"""LoRA adapters of a ModelServing: renderings per runtime, revisions, and the load/unload planner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sim import Cluster, at, make_ms, run

from capstan.serving.adapters import AdapterAction, ObservedServer, plan_adapter_actions, resolve_adapters
from capstan.serving.plan import Observed, plan_modelserving

Validate = Callable[[dict[str, Any]], None]
TJ = {
    "spec": {"checkpoint": {"volume": {"size": "5Gi", "storageClassName": "fast"}}},
    "status": {"checkpoints": [{"name": "snap-1", "readyToUse": True, "step": 10},
                               {"name": "snap-2", "readyToUse": True, "step": 20}]},
}
TWO = [{"name": "sql", "uri": "pvc://adapters/sql", "rank": 8},
       {"name": "chat", "fromTrainingJob": {"name": "ft"}, "rank": 16, "targetModules": ["qkv", "fc"]}]


def plan_for(
    spec: dict[str, Any],
    servers: list[ObservedServer] | None = None,
    jobs: dict[str, Any] | None = None,
    deployments: list[dict[str, Any]] | None = None,
) -> Any:
    ms = make_ms(**spec)
    observed = Observed(deployments=deployments or [], training_jobs={"ft": TJ} if jobs is None else jobs,
                        servers=servers or [])
    return ms, plan_modelserving(ms, observed, at(0))


def deployment_of(plan: Any) -> dict[str, Any]:
    return next(o for o in plan.objects if o["kind"] == "Deployment")  # type: ignore[no-any-return]


def container(plan: Any) -> dict[str, Any]:
    return deployment_of(plan)["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_vllm_enables_run_time_lora_and_mounts_each_adapter_volume(k8s_valid: Validate) -> None:
    _, plan = plan_for({"runtime": "vllm", "adapters": TWO})
    c = container(plan)
    args = c["args"]
    assert "--enable-lora" in args
    assert args[args.index("--max-lora-rank") + 1] == "64"  # ranks 8 and 16 fit the default limit
    assert args[args.index("--max-loras") + 1] == "4"
    assert "--lora-modules" not in args  # the operator loads them once the servers are ready
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    pod = deployment_of(plan)["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    pvc_vol = next(v for v in vols.values()
                   if v.get("persistentVolumeClaim", {}).get("claimName") == "adapters")
    assert mounts[f"/adapters/{pvc_vol['name']}"]["readOnly"] is True
    # The snapshot adapter: a PVC restored from the newest ready snapshot, like the job's volume.
    (claim,) = [o for o in plan.objects if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                           "name": "snap-2"}
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["metadata"]["labels"]["app.kubernetes.io/component"] == "adapter"
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
               for v in vols.values())
    for obj in plan.objects:
        k8s_valid(obj)
    assert [(a.name, a.loaded, a.message) for a in plan.status.adapters] == [("sql", 0, ""), ("chat", 0, "")]


def test_rank_limit_grows_to_a_vllm_size_for_large_adapters_only() -> None:
    big = [{"name": "big", "uri": "pvc://adapters/big", "rank": 100}]
    _, plan = plan_for({"runtime": "vllm", "adapters": big})
    args = container(plan)["args"]
    assert args[args.index("--max-lora-rank") + 1] == "128"


def test_capstan_runtime_renders_its_own_flags() -> None:
    _, plan = plan_for({"adapters": [{"name": "sql", "uri": "pvc://adapters/sql"}]})
    args = container(plan)["args"]
    assert args[-3:] == ["--enable-lora", "--max-lora-rank", "64"]  # no declared rank: a roomy limit
    assert not any(e["name"].startswith("VLLM") for e in container(plan)["env"])


def test_sglang_takes_adapters_on_its_command_line() -> None:
    ms, plan = plan_for({"runtime": "sglang", "adapters": TWO})
    args = container(plan)["args"]
    i = args.index("--lora-paths")
    refs = {r.name: r.path for r in resolve_adapters(ms, {"ft": TJ}, {}).refs}
    assert args[i + 1 :] == [f"chat={refs['chat']}", f"sql={refs['sql']}"]
    assert refs["chat"].endswith("/sft/adapter") and refs["sql"].endswith("/sql")
    assert args[args.index("--max-loras-per-batch") + 1] == "4"
    assert plan.adapter_actions == []  # nothing to load at run time


def test_s3_adapter_is_downloaded_by_an_init_container(k8s_valid: Validate) -> None:
    _, plan = plan_for({"runtime": "vllm", "adapters": [{"name": "a", "uri": "s3://bucket/adapters/a"}]})
    pod = deployment_of(plan)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert "s5cmd" in init["image"]
    assert {"name": "MODEL_URI", "value": "s3://bucket/adapters/a"} in init["env"]
    vol = init["volumeMounts"][0]["name"]
    assert {"name": vol, "emptyDir": {}} in pod["volumes"]
    k8s_valid(deployment_of(plan))


def revision(spec: dict[str, Any]) -> str:
    _, plan = plan_for(spec)
    return str(deployment_of(plan)["metadata"]["name"])


def test_adding_an_adapter_on_a_mounted_volume_keeps_the_revision_for_run_time_runtimes() -> None:
    one = [{"name": "sql", "uri": "pvc://adapters/sql"}]
    two = [*one, {"name": "math", "uri": "pvc://adapters/math"}]
    for runtime in ("capstan", "vllm"):
        base = revision({"runtime": runtime, "adapters": one})
        assert revision({"runtime": runtime, "adapters": two}) == base, runtime  # same claim: no restart
        assert revision({"runtime": runtime, "adapters": []}) != base  # LoRA off: other flags
        # A new volume (another claim) must reach the pod template: a new revision.
        other = [*one, {"name": "x", "uri": "pvc://other/x"}]
        assert revision({"runtime": runtime, "adapters": other}) != base
    # SGLang reads them at start-up only: any change is a new revision.
    sglang = revision({"runtime": "sglang", "adapters": one})
    assert revision({"runtime": "sglang", "adapters": two}) != sglang


def server(pod: str, loaded: dict[str, str] | None, volumes: set[str], ready: bool = True) -> ObservedServer:
    return ObservedServer(pod, f"10.0.0.{pod[-1]}", ready, frozenset(volumes), loaded)


def test_planner_loads_missing_unloads_removed_and_reloads_changed_adapters() -> None:
    ms = make_ms(runtime="vllm", adapters=TWO)
    refs = {r.name: r for r in resolve_adapters(ms, {"ft": TJ}, {}).refs}
    vols = {r.volume for r in refs.values()}
    servers = [
        server("p1", {}, vols),  # fresh: load both
        server("p2", {"sql": refs["sql"].path, "old": "/adapters/x/old"}, vols),  # unload old, load chat
        server("p3", {"sql": refs["sql"].path, "chat": "/adapters/lora-0/sft/adapter"}, vols),  # chat moved
        server("p4", {}, vols, ready=False),  # not ready: left alone
        server("p5", None, vols),  # its /v1/models could not be read: left alone this pass
        server("p6", {}, {refs["sql"].volume}),  # an older revision without chat's volume
    ]
    got = plan_adapter_actions(list(refs.values()), servers)
    chat, sql = refs["chat"].path, refs["sql"].path
    assert got == [
        AdapterAction("p1", "10.0.0.1", "load", "chat", chat),
        AdapterAction("p1", "10.0.0.1", "load", "sql", sql),
        AdapterAction("p2", "10.0.0.2", "unload", "old"),
        AdapterAction("p2", "10.0.0.2", "load", "chat", chat),
        AdapterAction("p3", "10.0.0.3", "unload", "chat"),
        AdapterAction("p3", "10.0.0.3", "load", "chat", chat),
        AdapterAction("p6", "10.0.0.6", "load", "sql", sql),
    ]
    # Once every server holds what the spec says, there is nothing left to do (level-based).
    done = [server(s.pod, {"sql": sql, "chat": chat} if len(s.volumes) == 2 else {"sql": sql}, set(s.volumes))
            for s in servers]
    assert plan_adapter_actions(list(refs.values()), done) == []


def test_plan_status_counts_servers_holding_each_adapter_and_waits_for_missing_snapshots() -> None:
    ms = make_ms(runtime="vllm", adapters=TWO)
    refs = {r.name: r for r in resolve_adapters(ms, {"ft": TJ}, {}).refs}
    vols = {r.volume for r in refs.values()}
    servers = [server("p1", {"sql": refs["sql"].path}, vols), server("p2", {}, vols)]
    _, plan = plan_for({"runtime": "vllm", "adapters": TWO}, servers=servers)
    keys = ("name", "source", "path", "loaded", "message")
    assert [{k: v for k, v in a.model_dump().items() if k in keys} for a in plan.status.adapters] == [
        {"name": "sql", "source": "pvc:adapters/sql", "path": refs["sql"].path, "loaded": 1,
         "message": "loading on the servers that do not hold it yet (or mount it from a new revision)"},
        {"name": "chat", "source": "snapshot:ft/snap-2/sft/adapter", "path": refs["chat"].path, "loaded": 0,
         "message": "loading on the servers that do not hold it yet (or mount it from a new revision)"},
    ]
    assert len(plan.adapter_actions) == 3 and plan.requeue_after is not None
    # The adapter's TrainingJob has no snapshot yet: the base (and sql) are served meanwhile.
    _, plan = plan_for({"runtime": "vllm", "adapters": TWO}, jobs={"ft": {"status": {}}})
    assert plan.status.adapters[1].message == "waiting for a ready snapshot of TrainingJob 'ft'"
    assert [o for o in plan.objects if o["kind"] == "PersistentVolumeClaim"] == []


def test_adapter_claim_is_deleted_once_no_live_revision_mounts_it() -> None:
    cluster = Cluster()
    ms = make_ms(runtime="vllm", adapters=TWO)
    training = {"ft": TJ}

    def step(ms_: Any, t: float) -> Any:
        observed = Observed(**{**cluster.observed().__dict__, "training_jobs": training})
        plan = plan_modelserving(ms_, observed, at(t))
        cluster.apply(plan)
        return ms_.model_copy(update={"status": plan.status}), plan

    ms, _ = step(ms, 0)
    claims = cluster.names("PersistentVolumeClaim")
    assert len(claims) == 1
    ms = make_ms(generation=2, runtime="vllm", adapters=TWO[:1]).model_copy(update={"status": ms.status})
    for t in range(1, 6):
        ms, _ = step(ms, t * 600)
    assert cluster.names("PersistentVolumeClaim") == set(), "the unused adapter snapshot PVC was kept"


@pytest.mark.parametrize("runtime", ["capstan", "vllm"])
def test_no_adapters_no_lora_flags(runtime: str) -> None:
    _, plan = plan_for({"runtime": runtime})
    assert "--enable-lora" not in container(plan)["args"]
    assert plan.status.adapters == [] and plan.adapter_actions == []


def test_revision_survives_a_cluster_roundtrip() -> None:
    cluster = Cluster()
    ms = make_ms(runtime="vllm", adapters=TWO[:1])
    _, plan = run(ms, cluster, at(0))
    assert "--enable-lora" in container(plan)["args"]


def test_new_adapter_version_rolls_out_to_a_growing_share_of_servers_then_everywhere() -> None:
    steps = [{"weight": 25, "pause": "1m"}, {"weight": 50, "pause": "1m"}]
    v1 = [{"name": "sql", "uri": "pvc://adapters/sql-v1", "rollout": {"steps": steps}}]
    v2 = [{"name": "sql", "uri": "pvc://adapters/sql-v2", "rollout": {"steps": steps}}]
    ms = make_ms(runtime="vllm", adapters=v1)
    (ref1,) = resolve_adapters(ms, {}, {}).refs
    (ref2,) = resolve_adapters(make_ms(runtime="vllm", adapters=v2), {}, {}).refs
    assert ref1.volume == ref2.volume  # the same claim: the new version is reachable in place
    held: dict[str, dict[str, str]] = {f"p{i}": {} for i in range(1, 5)}  # what each server holds
    revisions: set[str] = set()

    def reconcile(ms_: Any, t: float) -> Any:
        servers = [server(p, dict(h), {ref1.volume}) for p, h in held.items()]
        plan = plan_modelserving(ms_, Observed(servers=servers), at(t))
        revisions.add(deployment_of(plan)["metadata"]["name"])
        for a in plan.adapter_actions:  # what the servers do when the operator asks
            if a.verb == "load":
                held[a.pod][a.name] = a.path
            else:
                held[a.pod].pop(a.name)
        return ms_.model_copy(update={"status": plan.status}), plan

    def versions() -> list[str]:
        return [held[p]["sql"].rsplit("/", 1)[-1] for p in sorted(held)]

    ms, _ = reconcile(ms, 0)
    ms, _ = reconcile(ms, 1)
    assert versions() == ["sql-v1"] * 4 and ms.status.adapters[0].loaded == 4

    ms = make_ms(generation=2, runtime="vllm", adapters=v2).model_copy(update={"status": ms.status})
    ms, plan = reconcile(ms, 10)
    assert versions() == ["sql-v2", "sql-v1", "sql-v1", "sql-v1"]  # step 1: 25% of 4 servers
    assert plan.requeue_after is not None and plan.requeue_after <= 5  # confirm the loads soon
    ms, plan = reconcile(ms, 11)
    st = ms.status.adapters[0]
    assert (st.path, st.canary_path, st.canary_step, st.loaded, st.canary_loaded) == (
        ref1.path, ref2.path, 0, 3, 1)
    assert st.message == f"canary step 1/2: 25% of the servers serve {ref2.path}"
    assert plan.requeue_after is not None and plan.requeue_after <= 59  # back before the step ends

    ms, _ = reconcile(ms, 75)
    assert versions() == ["sql-v2", "sql-v2", "sql-v1", "sql-v1"]  # step 2: 50%
    assert ms.status.adapters[0].canary_step == 1
    ms, _ = reconcile(ms, 140)
    assert versions() == ["sql-v2"] * 4  # promoted: every server
    ms, _ = reconcile(ms, 141)
    st = ms.status.adapters[0]
    assert (st.path, st.canary_path, st.loaded) == (ref2.path, "", 4)
    assert len(revisions) == 1, "rolling out an adapter version restarted the base"


def test_adapter_version_on_a_new_volume_is_left_to_the_revision_rollout() -> None:
    steps = [{"weight": 50, "pause": "1m"}]
    ms = make_ms(runtime="vllm", adapters=[{"name": "a", "uri": "pvc://one/a", "rollout": {"steps": steps}}])
    _, plan = plan_for({"runtime": "vllm", "adapters": [
        {"name": "a", "uri": "pvc://one/a", "rollout": {"steps": steps}}]})
    first = deployment_of(plan)["metadata"]["name"]
    moved = make_ms(runtime="vllm", adapters=[
        {"name": "a", "uri": "pvc://two/a", "rollout": {"steps": steps}}])
    moved = moved.model_copy(update={"status": plan.status})
    later = plan_modelserving(moved, Observed(), at(10))
    assert deployment_of(later)["metadata"]["name"] != first  # a new volume: a new revision
    assert later.status.adapters[0].canary_path == ""
    assert ms.spec.adapters[0].rollout is not None
