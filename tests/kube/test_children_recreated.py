"""A gang's headless Service and checkpoint PVC exist while it lives, whatever happened to their
first create (found by the API-fault tests of tests/faults/test_faults.py).

A create answered 409 means "a namesake exists" to the operator; when that namesake was about to go
(a previous job's claim still terminating, a Service being deleted), nothing of this job was
created. Before, the Service and PVC were only created with a new gang, so such a gang ran without
its rendezvous DNS, or waited for ever on a claim that did not exist.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import set_pod_status, wait_for

from capstan.kube.client import USER_AGENT
from capstan.kube.resources import PVCS, SERVICES

pytestmark = pytest.mark.timeout(120)


def _operator_creates(plural: str) -> Any:
    def match(req: Any) -> bool:
        return (
            req.headers.get("User-Agent", "").startswith(USER_AGENT)
            and str(req.method.value).upper() == "POST"
            and req.resource is not None
            and req.resource.plural == plural
        )

    return match


@pytest.mark.parametrize(("plural", "res", "child"), [("services", SERVICES, "kept-workers"),
                                                     ("persistentvolumeclaims", PVCS, "kept-ckpt")])
async def test_a_child_whose_create_met_a_vanishing_namesake_is_created_again(
    cluster: Cluster, env: sc.Env, plural: str, res: Any, child: str
) -> None:
    # 409 to the first create, nothing created: what a namesake being deleted answers
    cluster.emulator.refuse(_operator_creates(plural), 409, "AlreadyExists", f'"{child}" already exists',
                            times=1)
    async with env.operator():
        await env.api.create(sc.job_body(env, "kept", checkpoint={"volume": {"size": "1Gi"}}))
        pods = await sc.wait_pods(env, "kept", 2)
        for pod in pods:  # the gang lives on: its next pass finds the child missing
            await set_pod_status(env.api, env.namespace, pod["metadata"]["name"], "Running")
        obj = await wait_for(lambda: env.api.get(res, env.namespace, child), sc.TIMEOUT, what=child)
        await sc.wait_job(env, "kept", sc.phase_is("Running"), "Running")
    job = await sc.get_job(env, "kept")
    assert job is not None
    assert obj["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
