"""PromQL canary analysis, the real operator against an emulated API server and a stub Prometheus.

The stub answers ``/api/v1/query`` as Prometheus does; the canary pod's ``/metrics`` is served as in
test_modelserving_kube.py. A query with no data holds the step (the rollout pauses, saying why); a
number over its bound rolls the canary back.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from tests.kube.test_modelserving_kube import (
    NS,
    MetricsStub,
    _two,
    canary_pod,
    deployments,
    make_ready,
    serving,
    wait_status,
)
from tests.support.kube import emulated_cluster, running_operator, wait_for
from tests.support.kube import test_client as api_client

from capstan.config import PROMETHEUS_ENV
from capstan.kube.resources import MODELSERVINGS

pytestmark = pytest.mark.timeout(120)


class PrometheusStub:
    """``/api/v1/query``: an empty vector until ``value`` is set; remembers the queries asked."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.asked: list[str] = []

    async def query(self, request: web.Request) -> web.Response:
        self.asked.append(request.query["query"])
        result = [] if self.value is None else [{"metric": {}, "value": [0, str(self.value)]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def stubs() -> AsyncIterator[tuple[PrometheusStub, MetricsStub, int, int]]:
    prom, metrics = PrometheusStub(), MetricsStub()
    prom_app, metrics_app = web.Application(), web.Application()
    prom_app.router.add_get("/api/v1/query", prom.query)
    metrics_app.router.add_get("/metrics", metrics.handle)
    prom_runner, prom_port = await _serve(prom_app)
    metrics_runner, metrics_port = await _serve(metrics_app)
    try:
        yield prom, metrics, prom_port, metrics_port
    finally:
        await prom_runner.cleanup()
        await metrics_runner.cleanup()


async def test_a_query_without_data_holds_the_step_and_one_over_its_bound_rolls_back(
    stubs: tuple[PrometheusStub, MetricsStub, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    prom, _, prom_port, port = stubs
    monkeypatch.setenv(PROMETHEUS_ENV, f"http://127.0.0.1:{prom_port}")
    rollout = {
        "steps": [{"weight": 50, "pause": "1s"}],
        "analysis": {"minRequests": 50, "queries": [
            {"name": "ttft", "max": 0.5,
             "query": 'max(canary_ttft{namespace="{{ namespace }}", revision="{{ revision }}"})'}]},
    }
    async with emulated_cluster() as (_, url), running_operator(url), api_client(url) as api:
        await api.create(serving(replicas=2, port=port, rollout=rollout))
        (stable,) = await wait_for(lambda: deployments(api), what="stable Deployment")
        await make_ready(api, stable)
        await wait_status(api, lambda s: s.get("phase") == "Ready", "stable Ready")

        obj = await api.get(MODELSERVINGS, NS, "gpt")
        assert obj is not None
        new = copy.deepcopy(obj["spec"])
        new["env"] = [{"name": "VERSION", "value": "2"}]
        await api.patch(MODELSERVINGS, NS, "gpt", {"spec": new})
        deps = await wait_for(lambda: _two(api), what="canary Deployment")
        (canary,) = set(deps) - {stable}
        await make_ready(api, canary)
        await canary_pod(api, canary, port)

        # The canary's own metrics pass; the query has no data: the rollout holds and says why.
        st = await wait_status(api, lambda s: "query ttft: no data" in s.get("message", ""), "holding")
        assert st["canaryRevision"] == canary and st["phase"] == "Progressing"
        assert f'max(canary_ttft{{namespace="{NS}", revision="{canary}"}})' in prom.asked

        prom.value = 0.9
        st = await wait_status(api, lambda s: s.get("canaryRevision") is None, "rollback", timeout=40)
        rolled = next(c for c in st["conditions"] if c["type"] == "RolledBack")
        assert rolled["status"] == "True" and "query ttft = 0.9 > 0.5" in rolled["message"]
        assert canary in st["failedRevisions"] and st["stableRevision"] == stable
