"""The core TrainingJob scenarios against a real cluster (``KUBECONFIG``, CRDs installed).

The operator runs in-process, scoped to a fresh namespace; workers carry a node selector no node
matches, so they stay Pending and the test plays the kubelet by patching pod status (the test
identity needs create/delete on namespaces and patch on pods/status, e.g. cluster-admin on kind).
Skipped when no cluster is reachable or the CRDs are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


def _cluster_reason() -> str | None:
    """Why the e2e suite cannot run here (None: it can)."""
    if not os.environ.get("KUBECONFIG") and not os.path.exists(os.path.expanduser("~/.kube/config")):
        return "no KUBECONFIG: e2e tests need a real cluster"
    try:
        import kubernetes

        kubernetes.config.load_kube_config()
        api = kubernetes.client.ApiextensionsV1Api()
        api.read_custom_resource_definition("trainingjobs.capstan.dev", _request_timeout=5)
    except Exception as exc:  # any failure means "no usable cluster"
        return f"no usable cluster with the Capstan CRDs installed ({type(exc).__name__}: {exc})"[:300]
    return None


_REASON = _cluster_reason()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

from tests.kube import scenarios as sc  # noqa: E402

from capstan.kube.apply import NAMESPACES, TRAININGJOBS, ApiClient, ApiError  # noqa: E402
from capstan.kube.testing import running_operator  # noqa: E402


async def _connection() -> Any:
    import kopf

    settings = kopf.OperatorSettings()
    import logging

    return await asyncio.to_thread(kopf.login_via_client, logger=logging.getLogger("e2e"), settings=settings)


@pytest.fixture
async def env() -> AsyncIterator[sc.Env]:
    """A fresh namespace, a client with the kubeconfig's identity, the operator scoped to it."""
    conn = await _connection()
    api = ApiClient.from_connection(conn)
    api.headers["User-Agent"] = "capstan-tests"
    ns = f"capstan-e2e-{uuid.uuid4().hex[:6]}"
    await api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    def operator() -> contextlib.AbstractAsyncContextManager[Any]:
        return running_operator(namespaces=[ns], connection=conn)

    try:
        yield sc.Env(
            api=api,
            namespace=ns,
            operator=operator,
            pod_overrides={"nodeSelector": {"capstan.dev/e2e-unschedulable": "true"}},
        )
    finally:  # the operator is stopped: release its finalizers so the namespace can go
        for job in await api.list_objects(TRAININGJOBS, ns):
            patch = {"metadata": {"finalizers": None}}
            with contextlib.suppress(ApiError):
                await api.patch(TRAININGJOBS, ns, job["metadata"]["name"], patch)
        await api.delete(NAMESPACES, None, ns)
        await api.close()


@pytest.mark.parametrize("scenario", sc.CORE_SCENARIOS, ids=lambda f: f.__name__.removeprefix("scenario_"))
async def test_core_scenario_on_cluster(env: sc.Env, scenario: Callable[[sc.Env], Awaitable[None]]) -> None:
    await scenario(env)
