"""Desired objects of a TrainingJob: env, resources, volumes, labels — valid for Kubernetes."""

from __future__ import annotations

from typing import Any

from tests.api.bodies import make_trainingjob

from capstan.api.trainingjob import TrainingJob
from capstan.training.pods import checkpoint_pvc, headless_service, worker_pod


def job(**spec: Any) -> TrainingJob:
    return (
        make_trainingjob("gpt-small").namespace("ml").uid("1234").image("trainer:1", "torchrun").workers(4)
        .spec(**spec).model()
    )


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


def test_torchrun_env_points_every_rank_at_rank0(k8s_valid: Any) -> None:
    j = job(gpusPerWorker=8)
    pods = [worker_pod(j, r, attempt=0) for r in range(4)]
    for rank, pod in enumerate(pods):
        k8s_valid(pod)
        env = env_of(pod)
        assert env["MASTER_ADDR"] == "gpt-small-0.gpt-small-workers.ml.svc"
        assert env["PET_MASTER_ADDR"] == env["MASTER_ADDR"]
        assert (env["NNODES"], env["NODE_RANK"], env["NPROC_PER_NODE"]) == ("4", str(rank), "8")
        assert env["PET_NODE_RANK"] == str(rank) and env["MASTER_PORT"] == "29500"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert pod["spec"]["hostname"] == f"gpt-small-{rank}"
        assert pod["spec"]["subdomain"] == "gpt-small-workers"
        assert pod["spec"]["restartPolicy"] == "Never"
    # A new attempt gets a new rendezvous id.
    assert env_of(worker_pod(j, 0, 1))["PET_RDZV_ID"] != env_of(pods[0])["PET_RDZV_ID"]


def test_a_one_worker_gang_meets_on_loopback_without_a_service_name(k8s_valid: Any) -> None:
    """No headless Service for one worker: rank 0 is this pod, on 127.0.0.1, with no subdomain to
    resolve; DeepSpeed's hostfile names localhost."""
    for launcher, made in (("torchrun", job(gpusPerWorker=8)), ("deepspeed", _ds_job(gpusPerWorker=8))):
        j = made.model_copy(update={"spec": made.spec.model_copy(update={"workers": 1})})
        pod = worker_pod(j, 0, attempt=0)
        k8s_valid(pod)
        env = env_of(pod)
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["NNODES"] == "1"
        assert "subdomain" not in pod["spec"] and pod["spec"]["hostname"] == "gpt-small-0"
        hostfile = pod["metadata"]["annotations"].get("capstan.dev/deepspeed-hostfile")
        assert hostfile == ("localhost slots=8\n" if launcher == "deepspeed" else None)


def test_user_nccl_and_env_override_defaults() -> None:
    j = job(gpusPerWorker=8, network={"nccl": {"NCCL_DEBUG": "INFO"}}, env=[{"name": "FOO", "value": "1"}])
    env = env_of(worker_pod(j, 0, 0))
    assert env["NCCL_DEBUG"] == "INFO" and env["FOO"] == "1"


def test_cpu_job_has_no_gpu_or_nccl() -> None:
    pod = worker_pod(job(), 0, 0)
    c = pod["spec"]["containers"][0]
    assert "resources" not in c
    assert "NCCL_DEBUG" not in env_of(pod) and env_of(pod)["NPROC_PER_NODE"] == "1"


def test_gpu_resources_shm_and_checkpoint_mount(k8s_valid: Any) -> None:
    j = job(
        gpusPerWorker=8,
        resources={"cpu": "32", "memory": "256Gi", "sharedMemory": "64Gi"},
        checkpoint={"volume": {"size": "500Gi", "storageClassName": "fast"}},
    )
    pod = worker_pod(j, 1, 0)
    k8s_valid(pod)
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "gpt-small-ckpt"
    assert {"name": "checkpoints", "mountPath": "/checkpoints"} in c["volumeMounts"]
    pvc = checkpoint_pvc(j)
    assert pvc is not None
    k8s_valid(pvc)
    assert pvc["spec"]["storageClassName"] == "fast"
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "1234"


def test_rdma_only_when_asked(k8s_valid: Any) -> None:
    plain = worker_pod(job(gpusPerWorker=8), 0, 0)
    assert "add" not in plain["spec"]["containers"][0]["securityContext"]["capabilities"]
    rdma = worker_pod(
        job(
            gpusPerWorker=8,
            network={"rdma": "required", "rdmaResource": "rdma/rdma_shared_device_a", "networks": "rdma-net"},
        ),
        0,
        0,
    )
    k8s_valid(rdma)
    c = rdma["spec"]["containers"][0]
    # IPC_LOCK alone is added back; everything else stays dropped.
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert rdma["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "rdma-net"
    assert env_of(rdma)["NCCL_IB_DISABLE"] == "0"


def test_placement_pins_pod_to_its_node() -> None:
    pod = worker_pod(job(gpusPerWorker=8), 2, 0, node="gpu-node-7")
    term = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["gpu-node-7"]


def test_labels_and_owner(k8s_valid: Any) -> None:
    j = job()
    svc = headless_service(j)
    k8s_valid(svc)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    pod = worker_pod(j, 3, 2)
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "capstan"
    assert labels["capstan.dev/rank"] == "3" and labels["capstan.dev/attempt"] == "2"
    assert set(svc["spec"]["selector"].items()) <= set(labels.items())
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TrainingJob" and owner["controller"] is True


def test_kueue_queue_labels_pods_for_kueue() -> None:
    pod = worker_pod(
        job(gpusPerWorker=8, queueName="team-a", topology={"policy": "Required", "maxDomain": "rack"}), 0, 0
    )
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    ann = pod["metadata"]["annotations"]
    assert ann["kueue.x-k8s.io/pod-group-total-count"] == "4"
    assert ann["kueue.x-k8s.io/podset-required-topology"] == "capstan.dev/rack"


def _ds_job(**spec: Any) -> TrainingJob:
    return (
        make_trainingjob("gpt-small").namespace("ml").uid("1234").image("trainer:1").workers(3)
        .spec(launcher="deepspeed", args=["--module", "pkg.train", "--steps", "10"], **spec).model()
    )


def test_deepspeed_worker_runs_launcher_without_ssh_on_its_own_rank(k8s_valid: Any) -> None:
    j = _ds_job(gpusPerWorker=8)
    for rank in range(3):
        pod = worker_pod(j, rank, attempt=0)
        k8s_valid(pod)
        c = pod["spec"]["containers"][0]
        env = env_of(pod)
        assert c["command"] == ["deepspeed"]
        assert c["args"] == [
            "--no_ssh", "--hostfile=$(CAPSTAN_HOSTFILE)", "--node_rank=$(NODE_RANK)",
            "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)",
            "--module", "pkg.train", "--steps", "10",
        ]
        # what the kubelet expands $(VAR) to: this pod's rank and rank 0's stable address
        assert (env["NODE_RANK"], env["CAPSTAN_HOSTFILE"]) == (str(rank), "/etc/capstan/hostfile")
        assert env["MASTER_ADDR"] == "gpt-small-0.gpt-small-workers.ml.svc"
        assert env["CAPSTAN_LAUNCHER"] == "deepspeed"
        assert not [k for k in env if k.startswith("PET_")]  # no torchrun rendezvous
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        # the hostfile: every worker's stable DNS name with its GPUs as slots, rank 0 first
        hostfile = pod["metadata"]["annotations"]["capstan.dev/deepspeed-hostfile"]
        assert hostfile.splitlines() == [
            f"gpt-small-{r}.gpt-small-workers slots=8" for r in range(3)
        ]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "hostfile")
        where = (mount["mountPath"], mount["subPath"], mount["readOnly"])
        assert where == ("/etc/capstan/hostfile", "hostfile", True)
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "hostfile")
        assert volume["downwardAPI"]["items"] == [{"path": "hostfile", "fieldRef": {
            "fieldPath": "metadata.annotations['capstan.dev/deepspeed-hostfile']"}}]


def test_deepspeed_cpu_slots_follow_procs_and_command_picks_the_launcher() -> None:
    j = _ds_job(procsPerWorker=2, command=["python", "-m", "deepspeed.launcher.runner"])
    pod = worker_pod(j, 1, attempt=0)
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "deepspeed.launcher.runner"]
    assert c["args"][0] == "--no_ssh" and c["args"][-4:] == ["--module", "pkg.train", "--steps", "10"]
    assert pod["metadata"]["annotations"]["capstan.dev/deepspeed-hostfile"].count("slots=2\n") == 3
    assert "nvidia.com/gpu" not in str(c.get("resources"))


def test_torchrun_default_has_no_hostfile() -> None:
    pod = worker_pod(job(), 0, attempt=0)
    assert "capstan.dev/deepspeed-hostfile" not in pod["metadata"]["annotations"]
    assert all(v["name"] != "hostfile" for v in pod["spec"]["volumes"])
    assert env_of(pod)["CAPSTAN_LAUNCHER"] == "torchrun" and "PET_RDZV_ID" in env_of(pod)


def test_launcher_change_is_a_new_gang() -> None:
    from capstan.training.pods import spec_digest

    torchrun = make_trainingjob("g").image("trainer:1").spec(args=["train.py"]).model()
    deepspeed = make_trainingjob("g").image("trainer:1").spec(args=["train.py"], launcher="deepspeed").model()
    assert spec_digest(torchrun) != spec_digest(deepspeed)
