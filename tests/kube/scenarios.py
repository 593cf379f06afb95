"""TrainingJob scenarios against any API server: the emulator (tests/kube) or a cluster (tests/e2e).

Each scenario takes an :class:`Env`: an API client for the test's own reads and writes, the
namespace, and ``operator()`` — an async context manager running the real operator. The test
plays the kubelet by patching pod status (on a real cluster the pods carry a node selector no
node matches, so no kubelet ever touches them).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tests.api.bodies import make_modelserving, make_trainingjob
from tests.support.kube import set_pod_status, wait_for

from capstan.kube.client import ApiClient, ApiError
from capstan.kube.resources import EVENTS, MODELSERVINGS, PODS, SERVICES, TRAININGJOBS, VOLUME_SNAPSHOTS
from capstan.labels import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK
from capstan.naming import dns_label

TIMEOUT = 30.0  # generous: CI machines are small and may be busy


@dataclass
class Env:
    """Where a scenario runs."""

    api: ApiClient
    namespace: str
    operator: Callable[[], contextlib.AbstractAsyncContextManager[Any]]
    #: Extra pod-spec fields for every job (e2e: a node selector that keeps pods unscheduled).
    pod_overrides: dict[str, Any] = field(default_factory=dict)


def svc_name(name: str) -> str:
    """The headless Service of job ``name`` (what ``capstan.training.pods.service_name`` gives)."""
    return dns_label(name, suffix="-workers")


def job_body(env: Env, name: str, workers: int = 2, **spec: Any) -> dict[str, Any]:
    """A TrainingJob dict with fast-restart defaults (no backoff)."""
    return (
        make_trainingjob(name).namespace(env.namespace)
        .image("registry.example/trainer:1.0", "python", "-m", "capstan_workloads.train").workers(workers)
        .spec(failurePolicy={"maxRestarts": 3, "backoffSeconds": 0}, **env.pod_overrides).spec(**spec).obj()
    )


async def get_job(env: Env, name: str) -> dict[str, Any] | None:
    """The TrainingJob, or None."""
    return await env.api.get(TRAININGJOBS, env.namespace, name)


async def pods_of(env: Env, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
    """Worker pods of job ``name`` (optionally of one attempt), rank order."""
    labels: dict[str, str | None] = {LABEL_JOB: name}
    if attempt is not None:
        labels[LABEL_ATTEMPT] = str(attempt)
    pods = await env.api.list_pods(env.namespace, labels)
    pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return sorted(pods, key=lambda p: int(p["metadata"]["labels"][LABEL_RANK]))


async def wait_pods(env: Env, name: str, count: int, attempt: int | None = None) -> list[dict[str, Any]]:
    """Wait until exactly ``count`` live worker pods exist (of ``attempt`` when given)."""

    async def probe() -> tuple[list[dict[str, Any]]] | None:
        pods = await pods_of(env, name)
        if attempt is not None and any(p["metadata"]["labels"][LABEL_ATTEMPT] != str(attempt) for p in pods):
            return None
        return (pods,) if len(pods) == count else None  # a tuple: truthy even for no pods

    (pods,) = await wait_for(probe, TIMEOUT, what=f"{count} pods of {name} (attempt {attempt})")
    return pods


async def wait_job(env: Env, name: str, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Wait until the job satisfies ``check``."""

    async def probe() -> dict[str, Any] | None:
        job = await get_job(env, name)
        return job if job is not None and check(job) else None

    return await wait_for(probe, TIMEOUT, what=f"{name}: {what}")


def status(job: dict[str, Any]) -> dict[str, Any]:
    """The job's status (empty dict when none)."""
    return job.get("status") or {}


def condition(job: dict[str, Any], type_: str) -> dict[str, Any]:
    """The job's condition of ``type_`` (empty dict when absent)."""
    return next((c for c in status(job).get("conditions") or [] if c["type"] == type_), {})


def phase_is(phase: str) -> Callable[[dict[str, Any]], bool]:
    """Check: status.phase equals ``phase``."""
    return lambda job: status(job).get("phase") == phase


def admitted_is(value: str) -> Callable[[dict[str, Any]], bool]:
    """Check: the Admitted condition has status ``value``."""
    return lambda job: condition(job, "Admitted").get("status") == value


async def event_reasons(env: Env, name: str) -> set[str]:
    """Reasons of the Events recorded on object ``name``."""
    events = await env.api.list_objects(EVENTS, env.namespace)
    return {e.get("reason", "") for e in events if (e.get("involvedObject") or {}).get("name") == name}


async def kubelet(env: Env, pod: dict[str, Any], phase: str, exit_code: int | None = None) -> None:
    """Play the kubelet for one pod."""
    await set_pod_status(env.api, env.namespace, pod["metadata"]["name"], phase, exit_code)


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    """The worker container's environment as a dict."""
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0].get("env") or []}


# -- scenarios ---------------------------------------------------------------------------------------


async def scenario_create(env: Env, name: str = "tj-create") -> None:
    """Create → headless Service + 2 pods with torchrun env and ownerReferences; Running."""
    async with env.operator():
        await env.api.create(job_body(env, name))
        pods = await wait_pods(env, name, 2)
        job = await wait_job(env, name, phase_is("Starting"), "phase Starting")
        uid, ns = job["metadata"]["uid"], env.namespace
        assert status(job)["observedGeneration"] == job["metadata"].get("generation", 1)
        assert condition(job, "Admitted")["status"] == "True"

        svc = await env.api.get(SERVICES, ns, svc_name(name))
        assert svc is not None and svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["publishNotReadyAddresses"] is True
        for obj in [svc, *pods]:
            refs = obj["metadata"]["ownerReferences"]
            assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
                ("TrainingJob", name, uid, True)
            ]
        for rank, pod in enumerate(pods):
            env_ = env_of(pod)
            assert pod["metadata"]["name"] == f"{name}-{rank}"
            assert pod["spec"]["hostname"] == f"{name}-{rank}"
            assert pod["spec"]["subdomain"] == svc_name(name)
            assert pod["spec"]["restartPolicy"] == "Never"
            assert env_["MASTER_ADDR"] == env_["PET_MASTER_ADDR"] == f"{name}-0.{svc_name(name)}.{ns}.svc"
            assert env_["NODE_RANK"] == env_["PET_NODE_RANK"] == str(rank)
            assert env_["NNODES"] == env_["PET_NNODES"] == "2"
            assert env_["MASTER_PORT"] == env_["PET_MASTER_PORT"] == "29500"
            assert env_["PET_RDZV_ID"] == f"{uid}-0"

        for pod in pods:
            await kubelet(env, pod, "Running")
        job = await wait_job(env, name, phase_is("Running"), "phase Running")
        assert condition(job, "Running")["status"] == "True"
        assert status(job)["workers"]["running"] == 2 and status(job).get("startTime")
        reasons = await wait_for(
            lambda: _has(event_reasons(env, name), {"GangCreated", "Running"}), TIMEOUT, what="events"
        )
        assert {"GangCreated", "Running"} <= reasons


async def _has(coro: Any, wanted: set[str]) -> set[str] | None:
    """The Event reasons when they include ``wanted`` (kopf posts Events from a queue, after the
    status write a test waits for: poll, never assert once)."""
    got: set[str] = await coro
    return got if wanted <= got else None


async def wait_event(env: Env, name: str, reason: str) -> set[str]:
    """Wait until the object ``name`` has an Event with ``reason``; its Event reasons."""
    return await wait_for(lambda: _has(event_reasons(env, name), {reason}), TIMEOUT, what=f"a {reason} Event")


async def scenario_failure_restarts_gang(env: Env, name: str = "tj-fail") -> None:
    """A worker exits 1 → the whole gang is deleted and recreated as attempt 1; restarts == 1."""
    async with env.operator():
        await env.api.create(job_body(env, name))
        old = await wait_pods(env, name, 2, attempt=0)
        for pod in old:
            await kubelet(env, pod, "Running")
        await wait_job(env, name, phase_is("Running"), "Running")
        await kubelet(env, old[1], "Failed", exit_code=1)
        job = await wait_job(env, name, lambda j: status(j).get("attempt") == 1, "attempt 1")
        assert status(job)["restarts"] == 1 and status(job)["preemptions"] == 0
        new = await wait_pods(env, name, 2, attempt=1)
        assert {p["metadata"]["uid"] for p in new}.isdisjoint({p["metadata"]["uid"] for p in old})
        assert env_of(new[0])["PET_RDZV_ID"].endswith("-1")
        await wait_event(env, name, "GangRestart")
        job = await wait_job(env, name, phase_is("Starting"), "Starting again")
        running = condition(job, "Running")
        # the restart's reason, until the scheduler says why a new worker waits (a real cluster)
        assert running["reason"] in ("WorkerFailed", "WorkersPending"), running
        assert running["reason"] == "WorkerFailed" or "not scheduled: 0/" in running["message"], running


async def scenario_preemption_not_counted(env: Env, name: str = "tj-preempt") -> None:
    """Exit code 75 (checkpointed on SIGTERM) → gang restart that does not count."""
    async with env.operator():
        await env.api.create(job_body(env, name))
        pods = await wait_pods(env, name, 2, attempt=0)
        await kubelet(env, pods[0], "Failed", exit_code=75)
        job = await wait_job(env, name, lambda j: status(j).get("attempt") == 1, "attempt 1")
        assert status(job)["restarts"] == 0 and status(job)["preemptions"] == 1
        await wait_pods(env, name, 2, attempt=1)


async def scenario_non_retryable_fails(env: Env, name: str = "tj-nonretry") -> None:
    """An exit code in nonRetryableExitCodes fails the job at once; running workers are removed."""
    policy = {"maxRestarts": 3, "backoffSeconds": 0, "nonRetryableExitCodes": [2]}
    async with env.operator():
        await env.api.create(job_body(env, name, failurePolicy=policy))
        pods = await wait_pods(env, name, 2)
        await kubelet(env, pods[0], "Running")
        await kubelet(env, pods[1], "Failed", exit_code=2)
        job = await wait_job(env, name, phase_is("Failed"), "Failed")
        assert condition(job, "Failed")["status"] == "True"
        assert condition(job, "Failed")["reason"] == "NonRetryableExitCode"
        assert status(job)["restarts"] == 0 and status(job).get("completionTime")
        left = await wait_pods(env, name, 1)  # the failed pod stays for its logs
        assert left[0]["metadata"]["name"] == f"{name}-1"


async def scenario_success(env: Env, name: str = "tj-ok") -> None:
    """All workers exit 0 → Succeeded with conditions; the pods stay for their logs."""
    async with env.operator():
        await env.api.create(job_body(env, name))
        pods = await wait_pods(env, name, 2)
        for pod in pods:
            await kubelet(env, pod, "Succeeded", exit_code=0)
        job = await wait_job(env, name, phase_is("Succeeded"), "Succeeded")
        assert condition(job, "Succeeded")["status"] == "True"
        assert condition(job, "Running")["status"] == "False"
        assert status(job).get("completionTime") and status(job)["workers"]["succeeded"] == 2
        assert len(await pods_of(env, name)) == 2
        await wait_event(env, name, "Succeeded")


async def scenario_ttl_deletes_job(env: Env, name: str = "tj-ttl") -> None:
    """ttlSecondsAfterFinished: 0 → the finished job and its children are deleted."""
    async with env.operator():
        await env.api.create(job_body(env, name, workers=1, ttlSecondsAfterFinished=0))
        pods = await wait_pods(env, name, 1)
        await kubelet(env, pods[0], "Succeeded", exit_code=0)
        await wait_for(lambda: _gone(get_job(env, name)), TIMEOUT, what="job deleted by TTL")
        await wait_for(lambda: _gone(_none_if_empty(pods_of(env, name))), TIMEOUT, what="pods deleted")


async def _gone(coro: Any) -> bool:
    return (await coro) is None


async def _none_if_empty(coro: Any) -> Any:
    got = await coro
    return got or None


async def scenario_suspend_resume(env: Env, name: str = "tj-suspend") -> None:
    """suspend: true removes the workers and keeps the status; false recreates them."""
    async with env.operator():
        await env.api.create(job_body(env, name))
        await wait_pods(env, name, 2)
        await env.api.patch(TRAININGJOBS, env.namespace, name, {"spec": {"suspend": True}})
        job = await wait_job(env, name, phase_is("Suspended"), "Suspended")
        assert condition(job, "Suspended")["status"] == "True"
        await wait_pods(env, name, 0)
        await env.api.patch(TRAININGJOBS, env.namespace, name, {"spec": {"suspend": False}})
        await wait_pods(env, name, 2, attempt=0)
        job = await wait_job(env, name, phase_is("Starting"), "Starting after resume")
        assert condition(job, "Suspended")["status"] == "False"
        assert status(job)["restarts"] == 0


async def scenario_delete_cleans_up(env: Env, name: str = "tj-delete") -> None:
    """Deleting the job removes its pods and Service (finalizer), then the job itself."""
    async with env.operator():
        await env.api.create(job_body(env, name))
        await wait_pods(env, name, 2)
        # kopf adds the finalizer through the validating webhook, which a just-started operator may
        # not serve yet (its PATCH then retries): wait for it rather than look once
        await wait_job(env, name, lambda j: "capstan.dev/finalizer" in j["metadata"].get("finalizers", []),
                       "finalizer added")
        await env.api.delete(TRAININGJOBS, env.namespace, name)
        await wait_for(lambda: _gone(get_job(env, name)), TIMEOUT, what="job gone")
        await wait_pods(env, name, 0)
        svc = svc_name(name)
        await wait_for(lambda: _gone(env.api.get(SERVICES, env.namespace, svc)), TIMEOUT, what="svc gone")


async def scenario_operator_restart(env: Env, name: str = "tj-restart") -> None:
    """An operator restart mid-creation finishes the gang without duplicates or a gang restart."""
    async with env.operator():
        await env.api.create(job_body(env, name, workers=3))
        first = await wait_pods(env, name, 3)
        await wait_job(env, name, phase_is("Starting"), "Starting")
    # As if the operator had died after creating ranks 0 and 1 only.
    await env.api.delete_pod(env.namespace, first[2]["metadata"]["name"])
    await wait_pods(env, name, 2)
    async with env.operator():
        again = await wait_pods(env, name, 3, attempt=0)
        assert [p["metadata"]["uid"] for p in again[:2]] == [p["metadata"]["uid"] for p in first[:2]]
        job = await get_job(env, name)
        assert job is not None
        assert status(job)["attempt"] == 0 and status(job)["restarts"] == 0
    async with env.operator():  # and a restart with everything in place changes nothing
        job_before = await get_job(env, name)
        for pod in again:
            await kubelet(env, pod, "Running")
        await wait_job(env, name, phase_is("Running"), "Running")
        final = await pods_of(env, name)
        assert [p["metadata"]["uid"] for p in final] == [p["metadata"]["uid"] for p in again]
        assert job_before is not None


async def scenario_invalid_spec(env: Env, name: str = "tj-invalid") -> None:
    """An invalid spec → Admitted=False/InvalidSpec naming the field; no pods.

    A real API server with the CRD's schema rejects it at admission, which is also a pass.
    """
    body = job_body(env, name, workers=2)
    body["spec"]["failurePolicy"] = {"maxRestarts": -1}
    async with env.operator():
        try:
            await env.api.create(body)
        except ApiError as exc:
            assert exc.status == 422 and "maxRestarts" in exc.message
            return
        job = await wait_job(
            env, name, lambda j: condition(j, "Admitted").get("status") == "False", "Admitted"
        )
        admitted = condition(job, "Admitted")
        assert admitted["reason"] == "InvalidSpec"
        assert "spec.failurePolicy.maxRestarts" in admitted["message"]
        assert status(job)["phase"] == "Pending"
        assert status(job)["observedGeneration"] == job["metadata"].get("generation", 1)
        assert "InvalidSpec" in await wait_for(
            lambda: _has(event_reasons(env, name), {"InvalidSpec"}), TIMEOUT
        )
        assert await pods_of(env, name) == []
        # fixing the spec admits the job
        await env.api.patch(
            TRAININGJOBS, env.namespace, name, {"spec": {"failurePolicy": {"maxRestarts": 1}}}
        )
        await wait_pods(env, name, 2)
        job = await wait_job(
            env, name, lambda j: condition(j, "Admitted").get("status") == "True", "admitted"
        )


# -- checkpoint snapshots (the cluster must serve snapshot.storage.k8s.io/v1 VolumeSnapshots) -----

SNAPSHOT_CHECKPOINT = {"volume": {"size": "10Gi"}, "snapshots": {"everyMinutes": 60, "keep": 1}}


async def snapshots(env: Env) -> dict[str, dict[str, Any]]:
    """VolumeSnapshots of the namespace by name."""
    return {s["metadata"]["name"]: s for s in await env.api.list_objects(VOLUME_SNAPSHOTS, env.namespace)}


async def wait_snapshot(env: Env, name: str) -> dict[str, Any]:
    """Wait until VolumeSnapshot ``name`` exists."""

    async def probe() -> dict[str, Any] | None:
        return (await snapshots(env)).get(name)

    return await wait_for(probe, TIMEOUT, what=f"VolumeSnapshot {name}")


async def csi_ready(env: Env, name: str) -> None:
    """Play the CSI snapshot controller: the snapshot is ready to use."""
    await env.api.patch_status(
        VOLUME_SNAPSHOTS, env.namespace, name, {"readyToUse": True, "restoreSize": "10Gi"}
    )


async def scenario_snapshots_with_retention(env: Env, name: str = "snap") -> None:
    """A gang restart and the job's completion take VolumeSnapshots of the checkpoint volume;
    retention (keep: 1) removes the older ready one once no ModelServing pins it, never the newest."""
    async with env.operator():
        await env.api.create(job_body(env, name, checkpoint=SNAPSHOT_CHECKPOINT))
        pods = await wait_pods(env, name, 2, attempt=0)
        await kubelet(env, pods[0], "Running")
        await kubelet(env, pods[1], "Failed", exit_code=1)
        restart = await wait_snapshot(env, f"{name}-ckpt-restart-1")
        assert restart["spec"]["source"]["persistentVolumeClaimName"] == f"{name}-ckpt"
        assert "ownerReferences" not in restart["metadata"]  # snapshots outlive the job
        await csi_ready(env, f"{name}-ckpt-restart-1")
        # A ModelServing pinned to the restart snapshot keeps it from retention.
        pinned = make_modelserving("pinned").namespace(env.namespace)
        pinned.from_training_job(name, f"{name}-ckpt-restart-1")
        if "nodeSelector" in env.pod_overrides:
            pinned.spec(nodeSelector=env.pod_overrides["nodeSelector"])
        await env.api.create(pinned.obj())
        for pod in await wait_pods(env, name, 2, attempt=1):
            await kubelet(env, pod, "Succeeded", exit_code=0)
        await wait_snapshot(env, f"{name}-ckpt-final")
        await csi_ready(env, f"{name}-ckpt-final")

        def final_ready(j: dict[str, Any]) -> bool:
            cond = condition(j, "CheckpointReady")
            return cond.get("status") == "True" and f"{name}-ckpt-final" in cond.get("message", "")

        job = await wait_job(env, name, final_ready, f"CheckpointReady names {name}-ckpt-final")
        records = {c["name"]: c for c in status(job)["checkpoints"]}
        assert records[f"{name}-ckpt-final"]["readyToUse"] is True
        # keep: 1, but the older one is in use: both stay.
        assert set(await snapshots(env)) == {f"{name}-ckpt-restart-1", f"{name}-ckpt-final"}
        # Once nothing uses it, retention removes the older ready snapshot, never the newest.
        await env.api.delete(MODELSERVINGS, env.namespace, "pinned")
        await env.api.patch(TRAININGJOBS, env.namespace, name, {"metadata": {"labels": {"poke": "1"}}})

        async def pruned() -> bool:
            return set(await snapshots(env)) == {f"{name}-ckpt-final"}

        await wait_for(pruned, TIMEOUT, what=f"retention deleted {name}-ckpt-restart-1")
        await wait_event(env, name, "SnapshotCreated")


CORE_SCENARIOS = [
    scenario_create,
    scenario_failure_restarts_gang,
    scenario_preemption_not_counted,
    scenario_non_retryable_fails,
    scenario_success,
    scenario_ttl_deletes_job,
    scenario_suspend_resume,
    scenario_delete_cleans_up,
    scenario_operator_restart,
    scenario_invalid_spec,
]


@contextlib.asynccontextmanager
async def nothing() -> AsyncIterator[None]:
    """A no-op context (an operator already running elsewhere)."""
    yield


__all__ = ["CORE_SCENARIOS", "PODS", "Env"]


# -- startup timeout and node quarantine -------------------------------------------------------------


def pinned(pod: dict[str, Any]) -> str:
    """The node Capstan pinned the pod to (its required node affinity)."""
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return str(terms["nodeSelectorTerms"][0]["matchFields"][0]["values"][0])


UNSCHEDULABLE = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."


async def unschedulable(env: Env, pod: dict[str, Any]) -> None:
    """Play kube-scheduler: the pod cannot be scheduled (PodScheduled=False with its message)."""
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}
    await env.api.patch_status(PODS, env.namespace, pod["metadata"]["name"], {"conditions": [cond]})


async def scenario_startup_timeout_replaces_then_fails(env: Env, play_scheduler: bool,
                                                       name: str = "tj-startup", **extra: Any) -> None:
    """A placed worker that never binds: the gang is placed again off that node after
    startupTimeoutSeconds, the Running condition quoting the scheduler; after maxStartupAttempts
    gangs the job fails saying why.

    ``play_scheduler``: no kube-scheduler runs (the emulator), so the test writes what it would
    (PodScheduled=False); on a real cluster ``extra`` spec fields (a node selector no node matches)
    keep the pinned pods from binding.
    """
    spec = {"gpusPerWorker": 8, "startupTimeoutSeconds": 3,
            "failurePolicy": {"maxRestarts": 0, "backoffSeconds": 0, "maxStartupAttempts": 2}, **extra}
    async with env.operator():
        await env.api.create(job_body(env, name, workers=1, **spec))
        (first,) = await wait_pods(env, name, 1, attempt=0)
        if play_scheduler:
            await unschedulable(env, first)
            pending = lambda j: condition(j, "Running").get("reason") == "WorkersPending"  # noqa: E731
            job = await wait_job(env, name, pending, "the scheduler's reason shown")
            assert "didn't match Pod's node affinity/selector" in condition(job, "Running")["message"]
        job = await wait_job(env, name, lambda j: status(j).get("attempt") == 1, "placed again")
        said = condition(job, "Running")
        assert said["reason"] == "StartupTimeout"
        assert "didn't match Pod's node affinity/selector" in said["message"]
        assert status(job)["startupTimeouts"] == 1 and status(job)["restarts"] == 0
        excluded = [(e["node"], e["reason"]) for e in status(job)["excludedNodes"]]
        assert excluded == [(pinned(first), "StartupTimeout")]
        (second,) = await wait_pods(env, name, 1, attempt=1)
        assert pinned(second) != pinned(first)
        if play_scheduler:
            await unschedulable(env, second)
        job = await wait_job(env, name, phase_is("Failed"), "Failed after 2 startup attempts")
        failed = condition(job, "Failed")
        assert failed["reason"] == "StartupAttemptsExceeded", failed
        assert "maxStartupAttempts: 2" in failed["message"] and "not scheduled" in failed["message"]
        reasons = await wait_for(lambda: _has(event_reasons(env, name), {"NodeQuarantined", "GangRestart"}),
                                 TIMEOUT, what="events")
        assert {"NodeQuarantined", "GangRestart"} <= reasons
