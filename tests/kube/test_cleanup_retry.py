"""A TrainingJob's deletion rides over an API server that fails for a moment (found by the
API-fault tests of tests/faults/test_faults.py: one 503 too many in the deletion handler held the
job, its finalizer and its Service for kopf's default retry delay of a minute)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import wait_for

from capstan.kube.client import USER_AGENT
from capstan.kube.resources import SERVICES, TRAININGJOBS
from capstan.kube.trainingjob import CLEANUP_RETRY_S

pytestmark = pytest.mark.timeout(120)


def _operator_reads(plural: str) -> Any:
    def match(req: Any) -> bool:
        return (req.headers.get("User-Agent", "").startswith(USER_AGENT) and str(req.method.value) == "GET"
                and req.resource is not None and req.resource.plural == plural)

    return match


async def test_deletion_is_retried_soon_after_a_transient_api_failure(cluster: Cluster, env: sc.Env) -> None:
    async with env.operator():
        await env.api.create(sc.job_body(env, "gone"))
        await sc.wait_pods(env, "gone", 2)
        # every read of the Service fails with 503 for the client's first try and its 3 retries
        cluster.emulator.refuse(_operator_reads("services"), 503, "ServiceUnavailable", "etcd leader change",
                                times=4)
        started = time.monotonic()
        await env.api.delete(TRAININGJOBS, env.namespace, "gone")

        async def gone() -> bool:
            return await env.api.get(TRAININGJOBS, env.namespace, "gone") is None

        await wait_for(gone, 30, what="the job's deletion (kopf's default retry: 60 s)")
        took = time.monotonic() - started
    assert await env.api.get(SERVICES, env.namespace, sc.svc_name("gone")) is None
    assert await sc.pods_of(env, "gone") == []
    assert took < 20, took
    assert CLEANUP_RETRY_S < 10
