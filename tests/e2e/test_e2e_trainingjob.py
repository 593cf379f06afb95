"""TrainingJobs on the real control plane: kube-scheduler binds the gang under Capstan's node
affinity, kwok plays the kubelets of the fake GPU nodes (manifests/dev/topology.yaml: eight 8-GPU
HGX nodes, each its own NVLink domain, and one 72-GPU NVL72 rack of 4-GPU nodes).

A worker fails through kwok's chaos stage (a label and an exit-code annotation on the running pod:
kwok terminates its container with that code); a worker succeeds by a status patch once it runs,
as a kubelet would report it (docs/dev-cluster.md).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.conftest import Cluster, Install
from tests.kube import scenarios as sc
from tests.support.kube import wait_for

from capstan.kube.client import ApiClient
from capstan.kube.resources import NODES, PODS, PVCS, SERVICES, TRAININGJOBS
from capstan.labels import LABEL_JOB

pytestmark = pytest.mark.e2e

CHAOS = "pod-container-running-failed.stage.kwok.x-k8s.io"
CLIQUE = "nvidia.com/gpu.clique"
ROOT = Path(__file__).resolve().parents[2]


async def running_gang(env: sc.Env, name: str, count: int, attempt: int) -> list[dict[str, Any]]:
    """The ``count`` workers of ``attempt``, once every one is bound and Running."""

    async def probe() -> tuple[list[dict[str, Any]]] | None:
        pods = await sc.pods_of(env, name, attempt)
        up = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        return (pods,) if len(pods) == count and len(up) == count else None

    (pods,) = await wait_for(probe, sc.TIMEOUT, what=f"{count} running workers of {name} (attempt {attempt})")
    return pods


async def cliques(api: ApiClient) -> dict[str, str]:
    """Node name → NVLink domain label."""
    return {n["metadata"]["name"]: n["metadata"]["labels"][CLIQUE] for n in await api.list_objects(NODES)}


def pinned_to(pod: dict[str, Any]) -> list[str]:
    """The nodes Capstan's required node affinity allows."""
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [v for t in terms["nodeSelectorTerms"] for f in t.get("matchFields", []) for v in f["values"]]


async def scheduled_by(api: ApiClient, namespace: str, pod: str) -> set[str]:
    """Components that reported the pod's Scheduled event."""
    events = await api.list_objects(sc.EVENTS, namespace, field_selector=f"involvedObject.name={pod}")
    return {e.get("reportingComponent") or (e.get("source") or {}).get("component", "")
            for e in events if e.get("reason") == "Scheduled"}


async def kwok_fail(api: ApiClient, namespace: str, pod: str, exit_code: int) -> None:
    """kwok's chaos stage: the running container exits with ``exit_code`` about 100 ms later."""
    await api.patch(PODS, namespace, pod, {"metadata": {
        "labels": {CHAOS: "true"},
        "annotations": {f"{CHAOS}/exit-code": str(exit_code), f"{CHAOS}/delay": "100"},
    }})


def assert_one_domain(
    pods: list[dict[str, Any]], domains: dict[str, str], expected: str | None = None
) -> str:
    """Every worker bound by the scheduler to the node Capstan pinned it to, all in one NVLink domain."""
    nodes = [p["spec"].get("nodeName") for p in pods]
    assert all(nodes), nodes
    assert [[n] for n in nodes] == [pinned_to(p) for p in pods]
    (domain,) = {domains[n] for n in nodes}
    if expected is not None:
        assert domain == expected
    return domain


async def test_gpu_gang_lands_in_one_nvlink_domain_restarts_and_succeeds(
    cluster: Cluster, env: sc.Env, api: ApiClient
) -> None:
    # 4 workers x 4 GPUs, Required inside one NVLink domain: no HGX node (8 GPUs) holds 16 GPUs,
    # so only the NVL72 rack's domain fits.
    name, ns = "gang", env.namespace
    domains = await cliques(api)
    await api.create(sc.job_body(env, name, workers=4, gpusPerWorker=4,
                                 topology={"policy": "Required", "maxDomain": "nvlink"}))
    pods = await running_gang(env, name, 4, attempt=0)
    domain = assert_one_domain(pods, domains, expected="gb200-nvl72")
    assert all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4" for p in pods)
    assert await scheduled_by(api, ns, pods[0]["metadata"]["name"]) == {"default-scheduler"}
    job = await sc.wait_job(env, name, sc.phase_is("Running"), "Running")
    assert sc.status(job)["placement"]["domain"].endswith(domain)
    assert sc.status(job)["restarts"] == 0

    # A worker exits 1 (kwok): the whole gang is replaced, counted as one restart.
    await kwok_fail(api, ns, pods[2]["metadata"]["name"], 1)
    job = await sc.wait_job(env, name, lambda j: sc.status(j).get("attempt") == 1, "attempt 1")
    assert sc.status(job)["restarts"] == 1 and sc.status(job)["preemptions"] == 0
    again = await running_gang(env, name, 4, attempt=1)
    assert_one_domain(again, domains, expected=domain)
    assert {p["metadata"]["uid"] for p in again}.isdisjoint(p["metadata"]["uid"] for p in pods)
    await sc.wait_job(env, name, sc.phase_is("Running"), "Running again")

    # Every worker exits 0: `kubectl wait --for=condition=Succeeded` returns.
    waiting = asyncio.create_task(asyncio.to_thread(
        cluster.kubectl, "wait", "--for=condition=Succeeded", f"tj/{name}", "-n", ns, "--timeout=60s"))
    for pod in again:
        await sc.kubelet(env, pod, "Succeeded", exit_code=0)
    done = await waiting
    assert f"trainingjob.capstan.dev/{name} condition met" in done.stdout
    job = await sc.wait_job(env, name, sc.phase_is("Succeeded"), "Succeeded")
    assert sc.status(job)["restarts"] == 1 and sc.status(job)["workers"]["succeeded"] == 4
    assert "GangRestart" in await sc.event_reasons(env, name)


async def test_readme_dev_sample_runs_in_the_nvl72_domain(
    cluster: Cluster, env: sc.Env, api: ApiClient
) -> None:
    """The README's first steps on `make cluster`: `kubectl apply` the dev sample, watch it run."""
    sample = ROOT / "manifests" / "dev" / "trainingjob-nvl72.yaml"
    cluster.kubectl("apply", "-n", env.namespace, "-f", str(sample))
    pods = await running_gang(env, "nvl72-demo", 4, attempt=0)
    assert_one_domain(pods, await cliques(api), expected="gb200-nvl72")
    await sc.wait_job(env, "nvl72-demo", sc.phase_is("Running"), "Running")
    table = cluster.kubectl("get", "tj", "-n", env.namespace).stdout
    assert "nvl72-demo" in table and "Running" in table


async def test_non_retryable_exit_code_fails_the_job(env: sc.Env, api: ApiClient) -> None:
    name, ns = "nonretry", env.namespace
    policy = {"maxRestarts": 3, "backoffSeconds": 0, "nonRetryableExitCodes": [2]}
    await api.create(sc.job_body(env, name, workers=2, gpusPerWorker=8, failurePolicy=policy))
    pods = await running_gang(env, name, 2, attempt=0)
    assert all(p["spec"]["nodeName"].startswith("hgx-") for p in pods)  # 8 GPUs: a whole HGX node
    await kwok_fail(api, ns, pods[0]["metadata"]["name"], 2)
    job = await sc.wait_job(env, name, sc.phase_is("Failed"), "Failed")
    failed = sc.condition(job, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "NonRetryableExitCode"
    assert "2" in failed["message"]
    assert sc.status(job)["restarts"] == 0
    (left,) = await sc.wait_pods(env, name, 1)  # the failed worker stays for its logs
    assert left["metadata"]["name"] == pods[0]["metadata"]["name"]
    assert left["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 2


async def test_a_worker_that_never_binds_is_placed_again_then_fails(env: sc.Env) -> None:
    # Capstan places the gang on an HGX node; the pod's node selector matches no node, so
    # kube-scheduler never binds it and says why (PodScheduled=False).
    await sc.scenario_startup_timeout_replaces_then_fails(
        env, play_scheduler=False, nodeSelector={"capstan.dev/e2e": "none"})


async def test_deleting_the_job_leaves_no_child(cluster: Cluster, env: sc.Env, api: ApiClient) -> None:
    """Pods, the headless Service and the checkpoint PVC are owned by the job: after the delete
    (the operator's finalizer, then kube-controller-manager's garbage collector) none is left."""
    name, ns = "doomed", env.namespace
    checkpoint = {"volume": {"size": "1Gi"}}
    await api.create(sc.job_body(env, name, workers=2, gpusPerWorker=1, checkpoint=checkpoint))
    await sc.wait_pods(env, name, 2)
    job = await sc.get_job(env, name)
    assert job is not None
    uid = job["metadata"]["uid"]
    labels = {LABEL_JOB: name}
    children = [*await api.list_objects(PODS, ns, labels), *await api.list_objects(SERVICES, ns, labels),
                *await api.list_objects(PVCS, ns, labels)]
    assert {c["kind"] for c in children} == {"Pod", "Service", "PersistentVolumeClaim"}
    for child in children:
        assert [(r["kind"], r["uid"]) for r in child["metadata"]["ownerReferences"]] == [("TrainingJob", uid)]

    await asyncio.to_thread(cluster.kubectl, "delete", f"tj/{name}", "-n", ns, "--wait=true", "--timeout=60s")

    async def none_left() -> bool:
        found = [c for res in (PODS, SERVICES, PVCS) for c in await api.list_objects(res, ns, labels)]
        return not found

    await wait_for(none_left, sc.TIMEOUT, what="no child of the deleted job")
    assert await api.get(TRAININGJOBS, ns, name) is None


async def test_template_mounts_a_dataset_pvc_and_reads_a_secret(cluster: Cluster, env: sc.Env,
                                                                 api: ApiClient) -> None:
    """spec.template on the real API server: the worker pods it creates carry the dataset PVC, env
    from a Secret, envFrom, a pull secret, an init container and a native sidecar, next to Capstan's
    own fields (the API server accepted the merged pods, and dropped none of those fields)."""
    name, ns = "templated", env.namespace
    cluster.kubectl("create", "secret", "generic", "hf", "-n", ns, "--from-literal=token=not-a-token")
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: datasets}\n"
        "spec: {accessModes: [ReadOnlyMany], resources: {requests: {storage: 1Gi}}}\n"))
    secret_env = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    template = {
        "metadata": {"labels": {"team": "nlp"}},
        "spec": {
            "volumes": [{"name": "data",
                         "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
            "imagePullSecrets": [{"name": "regcred"}],
            # a native sidecar: an init container that keeps running beside the worker
            "initContainers": [{"name": "proxy", "image": "registry.example/proxy:1",
                                "restartPolicy": "Always"}],
            "containers": [{
                "name": "worker",
                "env": [secret_env],
                "envFrom": [{"secretRef": {"name": "hf", "optional": True}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
            }],
        },
    }
    await api.create(sc.job_body(env, name, workers=2, gpusPerWorker=1, template=template))
    pods = await sc.wait_pods(env, name, 2)
    for pod in pods:
        spec = pod["spec"]
        assert pod["metadata"]["labels"]["team"] == "nlp"
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}} in \
            spec["volumes"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert [(c["name"], c.get("restartPolicy")) for c in spec["initContainers"]] == [("proxy", "Always")]
        worker = spec["containers"][0]
        assert worker["name"] == "worker" and secret_env in worker["env"]
        assert worker["envFrom"] == [{"secretRef": {"name": "hf", "optional": True}}]
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in worker["volumeMounts"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["hostname"] == pod["metadata"]["name"] and spec["restartPolicy"] == "Never"
    job = await sc.get_job(env, name)
    assert job is not None and sc.status(job).get("phase") in ("Starting", "Running", "Queued", "Pending")


def test_kubectl_explain_shows_the_upstream_podspec(cluster: Cluster, capstan: Install) -> None:
    out = cluster.kubectl("explain", "trainingjob.spec.template.spec.volumes").stdout
    assert "persistentVolumeClaim" in out and "List of volumes" in out
    out = cluster.kubectl("explain", "tj.spec.template.spec.containers.env.valueFrom.secretKeyRef").stdout
    assert "key" in out and "name" in out


async def test_raising_workers_resizes_a_running_gang(env: sc.Env, api: ApiClient) -> None:
    """spec.workers 2 → 3 on a running job: the gang stops and restarts with 3 workers (reason
    Resized, not counted), placed again by the scheduler."""
    name, ns = "resized", env.namespace
    await api.create(sc.job_body(env, name, workers=2, gpusPerWorker=1))
    await running_gang(env, name, 2, attempt=0)
    await sc.wait_job(env, name, sc.phase_is("Running"), "Running")
    await api.patch(TRAININGJOBS, ns, name, {"spec": {"workers": 3}})
    job = await sc.wait_job(env, name, lambda j: sc.status(j).get("attempt") == 1, "attempt 1")
    assert sc.condition(job, "Running")["reason"] == "Resized"
    pods = await running_gang(env, name, 3, attempt=1)
    assert {p["metadata"]["labels"]["capstan.dev/workers"] for p in pods} == {"3"}
    job = await sc.wait_job(env, name, sc.phase_is("Running"), "Running at 3")
    assert sc.status(job)["restarts"] == 0 and sc.status(job)["preemptions"] == 0
    assert "Resized" in await sc.event_reasons(env, name)


async def test_a_one_worker_gang_has_no_service_until_it_grows(env: sc.Env, api: ApiClient) -> None:
    """A one-worker job runs with no headless Service (its rendezvous is on loopback, so Endpoints
    and EndpointSlices are not written for it); raised to 2 workers, the new gang gets its Service
    and DNS subdomain before its pods rendezvous across the cluster."""
    name, ns = "solo", env.namespace
    await api.create(sc.job_body(env, name, workers=1, gpusPerWorker=1))
    (pod,) = await running_gang(env, name, 1, attempt=0)
    await sc.wait_job(env, name, sc.phase_is("Running"), "Running")
    env_vars = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env_vars["MASTER_ADDR"] == "127.0.0.1" and "subdomain" not in pod["spec"]
    assert await api.get(SERVICES, ns, f"{name}-workers") is None
    await api.patch(TRAININGJOBS, ns, name, {"spec": {"workers": 2}})
    pods = await running_gang(env, name, 2, attempt=1)
    service = await api.get(SERVICES, ns, f"{name}-workers")
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert all(p["spec"]["subdomain"] == f"{name}-workers" for p in pods)


async def test_gpu_error_quarantines_the_node_and_the_next_gang_avoids_it(
    env: sc.Env, api: ApiClient
) -> None:
    """A worker whose termination message carries a GPU Xid error: the gang restarts as a hardware
    failure (not counted against maxRestarts), the node goes into status.excludedNodes with an
    Event, and kube-scheduler binds the next gang elsewhere although the node is Ready."""
    name, ns = "xid", env.namespace
    await api.create(sc.job_body(env, name, workers=2, gpusPerWorker=8))
    pods = await running_gang(env, name, 2, attempt=0)
    broken = pods[1]["spec"]["nodeName"]
    xid = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus."
    await api.patch_status(PODS, ns, pods[1]["metadata"]["name"], {
        "phase": "Failed",
        "containerStatuses": [{
            "name": "worker", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": xid}},
        }],
    })
    job = await sc.wait_job(env, name, lambda j: sc.status(j).get("attempt") == 1, "gang restarted")
    st = sc.status(job)
    assert (st["restarts"], st["hardwareRestarts"]) == (0, 1)
    assert [(e["node"], e["reason"]) for e in st["excludedNodes"]] == [(broken, "GPUError")]
    again = await running_gang(env, name, 2, attempt=1)
    assert broken not in [p["spec"]["nodeName"] for p in again]
    assert "NodeQuarantined" in await sc.event_reasons(env, name)


async def test_deepspeed_workers_get_the_hostfile_through_the_downward_api(env: sc.Env,
                                                                           api: ApiClient) -> None:
    """launcher: deepspeed on the real API server: the worker pods (with the hostfile annotation
    projected at /etc/capstan/hostfile by a downward-API volume) are admitted, bound and run."""
    name = "ds"
    await api.create(sc.job_body(env, name, workers=2, gpusPerWorker=1, launcher="deepspeed",
                                 command=["deepspeed"], args=["--module", "capstan_workloads.train"]))
    pods = await running_gang(env, name, 2, 0)
    for rank, pod in enumerate(pods):
        worker = pod["spec"]["containers"][0]
        assert worker["command"] == ["deepspeed"]
        assert worker["args"][:5] == ["--no_ssh", "--hostfile=$(CAPSTAN_HOSTFILE)",
                                      "--node_rank=$(NODE_RANK)", "--master_addr=$(MASTER_ADDR)",
                                      "--master_port=$(MASTER_PORT)"]
        env_vars = {e["name"]: e.get("value") for e in worker["env"]}
        assert env_vars["NODE_RANK"] == str(rank) and "PET_NODE_RANK" not in env_vars
        assert pod["metadata"]["annotations"]["capstan.dev/deepspeed-hostfile"] == (
            "ds-0.ds-workers slots=1\nds-1.ds-workers slots=1\n")
        assert {"name": "hostfile", "mountPath": "/etc/capstan/hostfile", "subPath": "hostfile",
                "readOnly": True} in worker["volumeMounts"]
