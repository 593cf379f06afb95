"""A rollout on a full GPU pool borrows a preemptible TrainingJob's GPUs, on the real control plane.

The fake GB200 rack (manifests/dev/topology.yaml: 18 nodes of 4 GPUs) is filled: a ModelServing's
stable replica takes 4 GPUs, a preemptible TrainingJob of 17 workers the other 68. The ModelServing's
next revision cannot be scheduled (kube-scheduler: Insufficient nvidia.com/gpu), so it borrows the
job's GPUs: the job stops (phase Lent), the canary's pod is bound where the job ran, the canary is
promoted, the GPUs go back and the job is placed and runs again.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.api.bodies import make_modelserving
from tests.kube import scenarios as sc
from tests.support.kube import wait_for, wait_object

from capstan.kube.client import ApiClient
from capstan.kube.resources import MODELSERVINGS, PVCS, TRAININGJOBS, ApiResource, register_kind
from capstan.labels import LABEL_JOB

pytestmark = pytest.mark.e2e

PVS = ApiResource("", "v1", "persistentvolumes", "PersistentVolume", namespaced=False)
register_kind(PVS)
GB200 = {"nvidia.com/gpu.product": "NVIDIA-GB200"}
WAIT = 3 * sc.TIMEOUT  # a 17-pod gang stops and starts again in between


def condition(obj: dict[str, Any] | None, type_: str) -> tuple[str, str]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"]
    return "", ""


async def test_a_rollout_borrows_a_preemptible_jobs_gpus_and_gives_them_back(
    env: sc.Env, api: ApiClient
) -> None:
    ns = env.namespace
    await api.create(
        make_modelserving("llm")
        .namespace(ns)
        .uri("hf://org/model")
        .replicas(1)
        .spec(gpu=True, tensorParallel=4, nodeSelector=GB200, rollout={"borrow": "PreemptibleJobs"})
        .obj()
    )

    def serving(check: Any, what: str) -> Any:
        return wait_object(api, MODELSERVINGS, ns, "llm", check, WAIT, what)

    first = await serving(lambda o: o.get("status", {}).get("phase") == "Ready", "the first revision Ready")
    stable = first["status"]["stableRevision"]

    # The rest of the rack goes to a preemptible job (its checkpoint claim bound to a static volume).
    await api.create(
        sc.job_body(
            env,
            "train",
            workers=17,
            gpusPerWorker=4,
            nodeSelector=GB200,
            preemptible=True,
            checkpoint={"volume": {"size": "1Gi"}},
        )
    )
    (claim,) = await wait_for(
        lambda: api.list_objects(PVCS, ns, {LABEL_JOB: "train"}), WAIT, what="the job's checkpoint claim"
    )
    pv_name = f"{ns}-train-ckpt"
    wanted = claim["spec"]
    volume = {
        "capacity": {"storage": "1Gi"},
        "accessModes": wanted["accessModes"],
        "hostPath": {"path": f"/tmp/{pv_name}"},
        "claimRef": {"namespace": ns, "name": claim["metadata"]["name"]},
    }
    if wanted.get("storageClassName"):
        volume["storageClassName"] = wanted["storageClassName"]
    await api.create({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
                      "spec": volume})
    try:

        def job(check: Any, what: str) -> Any:
            return wait_object(api, TRAININGJOBS, ns, "train", check, WAIT, what)

        await job(lambda o: o.get("status", {}).get("phase") == "Running", "the job Running on 68 GPUs")

        # A new revision: no GB200 GPU is free for its pod, so the rollout borrows the job's.
        await api.patch(MODELSERVINGS, ns, "llm", {"spec": {"env": [{"name": "V", "value": "2"}]}})
        lent = await job(lambda o: o.get("status", {}).get("phase") == "Lent", "the job lending its GPUs")
        assert lent["metadata"]["annotations"]["capstan.dev/lent-to"] == "llm"
        assert condition(lent, "Lent") == ("True", "LentToRollout")
        borrowing = await serving(lambda o: condition(o, "Borrowing")[0] == "True", "Borrowing")
        assert borrowing["status"]["borrowedFrom"] == ["train"]

        # The canary runs on the lent GPUs and is promoted; the loan ends with the rollout.
        done = await serving(
            lambda o: (
                o["status"].get("stableRevision") not in (None, stable)
                and condition(o, "Borrowing") == ("False", "NotNeeded")
            ),
            "promotion, GPUs returned",
        )
        assert done["status"]["borrowedFrom"] == [] and done["status"]["phase"] == "Ready"
        back = await job(lambda o: o.get("status", {}).get("phase") == "Running", "the job Running again")
        assert condition(back, "Lent") == ("False", "Returned")
        assert "capstan.dev/lent-to" not in (back["metadata"].get("annotations") or {})
    finally:
        await api.delete(TRAININGJOBS, ns, "train")
        await api.delete(PVS, None, pv_name)
