"""Checkpoint snapshots by the real operator against the emulated API server."""

from __future__ import annotations

from typing import Any

import kmock
from tests.api.bodies import make_modelserving
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import declare_resource, wait_for

from capstan.kube.resources import DEPLOYMENTS, PVCS

CKPT = sc.SNAPSHOT_CHECKPOINT


def with_snapshot_api(cluster: Cluster) -> None:
    """Install the CSI snapshot CRD in the emulated cluster."""
    gvp = "snapshot.storage.k8s.io/v1/volumesnapshots"
    declare_resource(cluster.emulator, gvp, "VolumeSnapshot", True, {"status"})
    cluster.emulator.status_resources.add(kmock.resource(gvp))


snapshots = sc.snapshots
wait_snapshot = sc.wait_snapshot
make_ready = sc.csi_ready


async def test_snapshots_before_restart_and_at_completion_with_retention(
    cluster: Cluster, env: sc.Env
) -> None:
    with_snapshot_api(cluster)
    await sc.scenario_snapshots_with_retention(env)


async def test_without_snapshot_api_the_job_says_so_and_runs(env: sc.Env, operator: None) -> None:
    await env.api.create(sc.job_body(env, "nosnap", checkpoint=CKPT))
    pods = await sc.wait_pods(env, "nosnap", 2)
    for pod in pods:
        await sc.kubelet(env, pod, "Running")
    job = await sc.wait_job(env, "nosnap", sc.phase_is("Running"), "Running")
    cond = sc.condition(job, "CheckpointReady")
    assert cond["status"] == "False" and cond["reason"] == "SnapshotAPIUnavailable"


async def test_restore_from_snapshot_seeds_the_checkpoint_volume(env: sc.Env, operator: None) -> None:
    ckpt = {"volume": {"size": "10Gi"}, "restoreFrom": "gpt-ckpt-final"}
    await env.api.create(sc.job_body(env, "fork", checkpoint=ckpt))
    await sc.wait_pods(env, "fork", 2)
    pvc = await env.api.get(PVCS, env.namespace, "fork-ckpt")
    assert pvc is not None
    assert pvc["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "gpt-ckpt-final",
    }


async def test_scheduled_snapshot_once_the_interval_has_passed(cluster: Cluster, env: sc.Env) -> None:
    with_snapshot_api(cluster)
    async with env.operator():
        await env.api.create(sc.job_body(env, "sched", checkpoint=CKPT))
        for pod in await sc.wait_pods(env, "sched", 2):
            await sc.kubelet(env, pod, "Running")
        await sc.wait_job(env, "sched", sc.phase_is("Running"), "Running")
        assert await snapshots(env) == {}  # not due: the job just started
        long_ago = "2020-01-01T00:00:00Z"

        async def scheduled() -> list[str]:
            # The job has been running for longer than everyMinutes (60). Re-applied until seen:
            # a reconcile already in flight may write back the start time it read.
            job = await sc.get_job(env, "sched")
            if sc.status(job or {}).get("startTime") != long_ago:
                await env.api.patch_status(sc.TRAININGJOBS, env.namespace, "sched", {"startTime": long_ago})
            return [
                n
                for n, s in (await snapshots(env)).items()
                if s["metadata"]["labels"]["capstan.dev/snapshot-reason"] == "Scheduled"
            ]

        (name,) = await wait_for(scheduled, sc.TIMEOUT, what="a scheduled snapshot")
        assert name.startswith("sched-ckpt-")


def _model_claims(deployment: dict[str, Any]) -> list[str]:
    vols = deployment["spec"]["template"]["spec"]["volumes"]
    return [v["persistentVolumeClaim"]["claimName"] for v in vols if "persistentVolumeClaim" in v]


async def test_modelserving_follows_latest_ready_snapshot(cluster: Cluster, env: sc.Env) -> None:
    with_snapshot_api(cluster)
    ckpt = {"volume": {"size": "20Gi"}, "snapshots": {"everyMinutes": 60, "keep": 3}}
    async with env.operator():
        await env.api.create(sc.job_body(env, "gpt", checkpoint=ckpt))
        pods = await sc.wait_pods(env, "gpt", 2, attempt=0)
        await sc.kubelet(env, pods[0], "Failed", exit_code=1)
        await wait_snapshot(env, "gpt-ckpt-restart-1")
        await make_ready(env, "gpt-ckpt-restart-1")
        await env.api.create(
            make_modelserving("gpt-llm")
            .namespace(env.namespace)
            .from_training_job("gpt")
            .spec(gpu=False, rollout={"steps": [{"weight": 50, "pause": "1m"}]})
            .obj()
        )

        async def revisions() -> dict[str, dict[str, Any]]:
            labels = {"capstan.dev/modelserving": "gpt-llm"}
            return {
                d["metadata"]["name"]: d
                for d in await env.api.list_objects(DEPLOYMENTS, env.namespace, labels)
            }

        (first,) = (await wait_for(revisions, sc.TIMEOUT, what="first revision")).values()
        claim = await env.api.get(PVCS, env.namespace, _model_claims(first)[0])
        assert claim is not None and claim["spec"]["dataSource"]["name"] == "gpt-ckpt-restart-1"
        # The job finishes; its completion snapshot becomes ready: Latest rolls it out as a canary.
        for pod in await sc.wait_pods(env, "gpt", 2, attempt=1):
            await sc.kubelet(env, pod, "Succeeded", exit_code=0)
        await wait_snapshot(env, "gpt-ckpt-final")
        await make_ready(env, "gpt-ckpt-final")

        async def two() -> dict[str, dict[str, Any]] | None:
            revs = await revisions()
            return revs if len(revs) == 2 else None

        revs = await wait_for(two, sc.TIMEOUT, what="a canary revision for the new snapshot")
        (canary,) = [d for n, d in revs.items() if n != first["metadata"]["name"]]
        claim = await env.api.get(PVCS, env.namespace, _model_claims(canary)[0])
        assert claim is not None and claim["spec"]["dataSource"]["name"] == "gpt-ckpt-final"
