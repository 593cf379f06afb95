"""Answers cut short are retried by the API client; exhausted retries are an ApiError. The
operator rides over cut answers to its own and kopf's requests, or exits 1 when kopf cannot.

A small aiohttp server on 127.0.0.1 answers the first ``cuts`` calls with a body shorter than its
Content-Length (then closes the connection), or with whole-length but truncated JSON, and every
later call with the whole object. The operator tests cut answers in the emulator
(:meth:`tests.support.kube.Emulator.cut`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import Match, wait_for

from capstan.kube.client import USER_AGENT, ApiClient, ApiError
from capstan.kube.resources import PODS
from capstan.labels import FINALIZER

pytestmark = pytest.mark.timeout(120)
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "uid": "u"}}


@dataclass
class Cutter:
    """Serves POD (GET, POST); the first ``cuts`` answers are cut in the way ``how`` says."""

    cuts: int = 0
    how: str = "short"  # short: fewer bytes than Content-Length; json: whole length, broken JSON
    calls: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(request.method)
        body = json.dumps(POD).encode()
        if len(self.calls) > self.cuts:
            return web.Response(body=body, content_type="application/json")
        if self.how == "json":
            return web.Response(body=body[: len(body) // 2], content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:10])
        assert request.transport is not None
        request.transport.close()  # the connection drops mid-body
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[Cutter, str]]:
    cutter = Cutter()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", cutter.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield cutter, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("how", ["short", "json"])
async def test_cut_answers_are_retried_until_whole(server: tuple[Cutter, str], how: str) -> None:
    cutter, url = server
    cutter.cuts, cutter.how = 2, how
    async with ApiClient(url, retries=3) as api:
        got = await api.get(PODS, "ns", "p")
    assert got == POD
    assert cutter.calls == ["GET"] * 3


async def test_cut_create_is_retried(server: tuple[Cutter, str]) -> None:
    cutter, url = server
    cutter.cuts = 1
    async with ApiClient(url, retries=3) as api:
        created: dict[str, Any] = await api.create(POD)
    assert created == POD
    assert cutter.calls == ["POST", "POST"]


@pytest.mark.parametrize(("how", "reason"), [("short", "ClientPayloadError"), ("json", "JSONDecodeError")])
async def test_exhausted_retries_raise_api_error(server: tuple[Cutter, str], how: str, reason: str) -> None:
    cutter, url = server
    cutter.cuts, cutter.how = 100, how
    async with ApiClient(url, retries=2) as api:
        with pytest.raises(ApiError) as err:
            await api.get(PODS, "ns", "p")
    assert err.value.status == 0 and err.value.reason == reason
    assert len(cutter.calls) == 3  # the first try and two retries


# -- the operator against the emulator, answers cut by the emulator --------------------------------


def _sent_by(agent: str, method: str, plural: str) -> Match:
    def match(req: Any) -> bool:
        return (
            req.headers.get("User-Agent", "").startswith(agent)
            and str(req.method.value).upper() == method
            and req.resource is not None
            and req.resource.plural == plural
        )

    return match


async def test_operator_retries_its_own_cut_answers(cluster: Cluster, env: sc.Env) -> None:
    """Pod creates and the status write answered with a cut body: each is retried at once (a
    retried create answers 409, taken as "exists"), the reconcile pass does not fail, and the
    gang is created once."""
    creates = _sent_by(USER_AGENT, "POST", "pods")
    status_writes = _sent_by(USER_AGENT, "PATCH", "trainingjobs")
    cluster.emulator.cut(creates, times=2)
    cluster.emulator.cut(status_writes, times=1, broken_json=True)

    async def retried() -> bool:
        sent = list(cluster.emulator)
        return sum(map(creates, sent)) == 4 and sum(map(status_writes, sent)) >= 2

    async with env.operator():
        await env.api.create(sc.job_body(env, "cut"))
        await wait_for(retried, sc.TIMEOUT, what="both cut pod creates and the status write retried")
        job = await sc.wait_job(env, "cut", sc.phase_is("Starting"), "Starting")
        pods = await sc.wait_pods(env, "cut", 2)
    assert sorted(p["metadata"]["name"] for p in pods) == ["cut-0", "cut-1"]
    assert sc.condition(job, "Admitted")["status"] == "True"
    assert not {"ReconcileFailed", "ReconcileError"} & await sc.event_reasons(env, "cut")
    assert sum(map(creates, list(cluster.emulator))) == 4  # no second gang: two cut, each retried once


async def test_kopf_survives_a_cut_answer_to_its_own_patch(cluster: Cluster, env: sc.Env) -> None:
    """kopf's finalizer patch answered with a cut body: kopf retries it after its error delay."""
    cluster.emulator.cut(_sent_by("kopf/", "PATCH", "trainingjobs"), times=1)
    async with env.operator():
        await env.api.create(sc.job_body(env, "kcut"))
        await sc.wait_pods(env, "kcut", 2)
        job = await sc.wait_job(
            env, "kcut", lambda j: FINALIZER in j["metadata"].get("finalizers", []), "finalizer"
        )
    assert job["metadata"]["name"] == "kcut"


async def test_operator_exits_nonzero_when_kopf_cannot_go_on(cluster: Cluster, tmp_path: Path) -> None:
    """kopf does not retry a cut list answer (here: whole-length, broken JSON) and stops: the
    ``capstan operator`` process says so in one line and exits 1, so Kubernetes restarts it."""
    # Every answer of kopf's to a TrainingJob GET is cut, so its initial list fails whichever of
    # its requests comes first (a cut watch stream alone is survived).
    cluster.emulator.cut(_sent_by("kopf/", "GET", "trainingjobs"), times=None, broken_json=True)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": cluster.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "emu", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "capstan", "operator", "--standalone", "--metrics-port", "0",
        "--liveness-port", "0",
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "CAPSTAN_LOG_FORMAT": "plain"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 1, text[-3000:]
    assert "JSONDecodeError" in text
    # Either kopf stopped and the error came up to ``capstan operator``, or kopf's stop got stuck
    # (watch streams waiting for credentials after its cleanup) and the process left on its own.
    assert ("operator stopped by an unexpected error: JSONDecodeError" in text
            or "kopf did not finish stopping" in text), text[-3000:]
    assert "exiting with status 1 so that Kubernetes restarts it" in text
