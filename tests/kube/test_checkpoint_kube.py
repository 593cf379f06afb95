"""Checkpoint progress and save-before-stop: the real operator against the emulated API server.

The test plays the kubelet and rank 0: the worker pod runs at 127.0.0.1 with its metrics port
pointing at a local server that answers like the reference trainer's metrics endpoint, and that
"trainer" answers a checkpoint request once it sees the annotation the operator put on its pod.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import set_pod_status, wait_for

from capstan.kube.resources import PODS, TRAININGJOBS
from capstan.labels import REQUEST_ANNOTATION
from capstan.training.progress import parse_request
from capstan_workloads.metrics import TrainMetrics


class Rank0:
    """The reference trainer's metrics, served on 127.0.0.1."""

    def __init__(self) -> None:
        self.metrics = TrainMetrics()

    async def handle(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")


@pytest.fixture
async def rank0() -> AsyncIterator[tuple[Rank0, int]]:
    trainer = Rank0()
    app = web.Application()
    app.router.add_get("/metrics", trainer.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield trainer, port
    finally:
        await runner.cleanup()


async def run_at(cluster: Cluster, pod: dict[str, Any], port: int) -> None:
    """Play the kubelet: the pod runs at 127.0.0.1 and serves its metrics on ``port``."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    containers = pod["spec"]["containers"]
    for p in containers[0]["ports"]:
        if p["name"] == "metrics":
            p["containerPort"] = port
    await cluster.api.patch(PODS, ns, name, {"spec": {"containers": containers}})
    await set_pod_status(cluster.api, ns, name, "Running")
    await cluster.api.patch_status(PODS, ns, name, {"podIP": "127.0.0.1"})


async def test_progress_reported_and_suspend_saves_first(
    cluster: Cluster, env: sc.Env, operator: None, rank0: tuple[Rank0, int]
) -> None:
    trainer, port = rank0
    trainer.metrics.committed(100, 0.5)
    trainer.metrics.resumed_from_step.set(80)
    checkpoint = {"volume": {"size": "1Gi"}, "saveBeforeStopSeconds": 60}
    body = sc.job_body(env, "ck", workers=1, checkpoint=checkpoint)
    await cluster.api.create(body)
    (pod,) = await sc.wait_pods(env, "ck", 1)
    assert pod["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    await run_at(cluster, pod, port)
    job = await sc.wait_job(env, "ck", lambda j: sc.status(j).get("lastCheckpoint"), "lastCheckpoint")
    st = sc.status(job)
    assert st["lastCheckpoint"]["step"] == 100 and st["resumedFromStep"] == 80

    # suspend: the operator asks rank 0 to save and keeps the pod until it says so
    await cluster.api.patch(TRAININGJOBS, env.namespace, "ck", {"spec": {"suspend": True}})

    async def asked() -> tuple[int, str] | None:
        pods = await sc.pods_of(env, "ck")
        value = (pods[0]["metadata"].get("annotations") or {}).get(REQUEST_ANNOTATION, "") if pods else ""
        return parse_request(value)

    request_id, mode = await wait_for(asked, sc.TIMEOUT, what="a checkpoint request on rank 0's pod")
    assert mode == "stop"
    job = await sc.wait_job(env, "ck", lambda j: sc.status(j).get("checkpointRequest"), "checkpointRequest")
    assert sc.status(job)["checkpointRequest"]["outcome"] == "Pending"
    assert len(await sc.pods_of(env, "ck")) == 1 and sc.status(job)["phase"] == "Running"

    # rank 0 commits step 117 and answers: now the gang stops
    trainer.metrics.committed(117, 0.5)
    trainer.metrics.checkpoint_request.set(request_id)
    job = await sc.wait_job(env, "ck", sc.phase_is("Suspended"), "Suspended")
    st = sc.status(job)
    assert st["checkpointRequest"]["outcome"] == "Saved" and st["checkpointRequest"]["step"] == 117
    assert st["lastCheckpoint"]["step"] == 117
    await sc.wait_pods(env, "ck", 0)

    async def events() -> bool:
        return {"CheckpointRequested", "CheckpointSaved"} <= await sc.event_reasons(env, "ck")

    await wait_for(events, sc.TIMEOUT, what="CheckpointRequested and CheckpointSaved Events")


async def test_checkpoint_now_annotation_asks_rank_0_without_stopping(
    cluster: Cluster, env: sc.Env, operator: None, rank0: tuple[Rank0, int]
) -> None:
    trainer, port = rank0
    body = sc.job_body(env, "now", workers=1, checkpoint={"volume": {"size": "1Gi"}})
    await cluster.api.create(body)
    (pod,) = await sc.wait_pods(env, "now", 1)
    await run_at(cluster, pod, port)
    await sc.wait_job(env, "now", sc.phase_is("Running"), "Running")
    patch = {"metadata": {"annotations": {"capstan.dev/checkpoint-now": "before-eval"}}}
    await cluster.api.patch(TRAININGJOBS, env.namespace, "now", patch)

    async def asked() -> tuple[int, str] | None:
        pods = await sc.pods_of(env, "now")
        return parse_request((pods[0]["metadata"].get("annotations") or {}).get(REQUEST_ANNOTATION, ""))

    request_id, mode = await wait_for(asked, sc.TIMEOUT, what="a checkpoint request on rank 0's pod")
    assert mode == "save"
    trainer.metrics.committed(42, 0.5)
    trainer.metrics.checkpoint_request.set(request_id)

    def saved(j: dict[str, Any]) -> bool:
        return (sc.status(j).get("checkpointRequest") or {}).get("outcome") == "Saved"

    job = await sc.wait_job(env, "now", saved, "request answered")
    st = sc.status(job)
    assert st["checkpointRequest"]["step"] == 42 and st["checkpointRequest"]["annotation"] == "before-eval"
    assert st["phase"] == "Running" and len(await sc.pods_of(env, "now")) == 1
