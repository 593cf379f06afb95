"""The real operator (against the emulated API server) loading and unloading LoRA adapters on a real
reference server: adding and removing adapters never changes the Deployment (no restart).

The test plays the Deployment controller and the kubelet: it marks the revision ready and creates a
ready pod with ``podIP: 127.0.0.1``, the reference server's port as its ``http`` port and the volumes
of the Deployment's pod template. The server runs in this process; the pod's volume mounts are
played by mapping the pod path ``/adapters`` to a temporary directory when the server loads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from tests.support.kube import emulated_cluster, running_operator, wait_for
from tests.support.kube import test_client as api_client

from capstan.kube.client import ApiClient
from capstan.kube.resources import DEPLOYMENTS, MODELSERVINGS, PODS
from capstan.labels import LABEL_REVISION, LABEL_SERVING
from capstan_workloads.lora import adapter_config, adapter_tensors, apply_lora, fingerprint, write_adapter
from capstan_workloads.model import GPT, GPTConfig
from capstan_workloads.serve.app import STATE, create_app
from capstan_workloads.serve.testing import make_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
NS = "default"


def write_peft_adapter(out: Path, base: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_file(base / "config.json"))
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    apply_lora(model, ["qkv"], 4, 8)
    config = adapter_config(4, 8, ["qkv"], str(base), fingerprint(base / "model.safetensors"),
                            json.loads(model.cfg.to_json()))
    write_adapter(adapter_tensors(model.state_dict()), config, out)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[int, Path, Any]]:
    """The reference server with LoRA on, and the directory standing in for the adapters volume."""
    base = make_model_dir(tmp_path / "base", block_size=32, train_steps=0)
    volume = tmp_path / "volume"  # what the PVC "adapters" holds
    for i, name in enumerate(("sql", "math")):
        write_peft_adapter(volume / name, base, i)
    app = create_app(base, threads=1, enable_lora=True, model_name="gpt", device="cpu")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state = app[STATE]
    assert state.load_task is not None
    await state.load_task
    registry = state.adapters
    assert registry is not None
    mounts: dict[str, Path] = {}  # pod mount path -> local directory, filled once the pod exists
    real_load = registry.load

    def load(name: str, path: str) -> Any:
        local = path
        for mount, where in mounts.items():
            if path.startswith(mount + "/"):
                local = str(where / path.removeprefix(mount + "/"))
        adapter = real_load(name, local)
        adapter.path = path  # as a pod sees it: /v1/models reports the path it was asked to load
        return adapter

    registry.load = load  # type: ignore[method-assign]
    try:
        yield port, volume, mounts
    finally:
        await runner.cleanup()


async def served(port: int) -> dict[str, str | None]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/v1/models") as r:
        return {m["id"]: m["parent"] for m in (await r.json())["data"]}


async def play_kubelet(api: ApiClient, revision: str, port: int) -> None:
    dep = await api.get(DEPLOYMENTS, NS, revision)
    assert dep is not None
    tpl = dep["spec"]["template"]
    container = {**tpl["spec"]["containers"][0], "ports": [{"name": "http", "containerPort": port}]}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{revision}-pod", "namespace": NS, "labels": tpl["metadata"]["labels"]},
           "spec": {**tpl["spec"], "containers": [container]}}
    await api.create(pod)
    await api.patch_status(PODS, NS, pod["metadata"]["name"], {
        "phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]})
    # The Deployment controller notices the ready pod (this wakes the operator, as in a cluster).
    ready = {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}
    await api.patch_status(DEPLOYMENTS, NS, revision, ready)


async def test_operator_loads_and_unloads_adapters_on_the_running_server_without_a_restart(
    server: tuple[int, Path, Any],
) -> None:
    port, volume, mounts = server
    adapters = [{"name": "sql", "uri": "pvc://adapters/sql", "rank": 4}]
    body = {"apiVersion": "capstan.dev/v1alpha1", "kind": "ModelServing",
            "metadata": {"name": "gpt", "namespace": NS},
            "spec": {"model": {"pvc": {"claimName": "models"}}, "gpu": False, "port": port,
                     "adapters": adapters}}
    async with emulated_cluster() as (_, url), running_operator(url), api_client(url) as api:
        await api.create(body)

        async def revision() -> list[str]:
            deps = await api.list_objects(DEPLOYMENTS, NS, {LABEL_SERVING: "gpt"})
            return [d["metadata"]["name"] for d in deps]

        (rev,) = await wait_for(revision, what="the revision's Deployment")
        dep = await api.get(DEPLOYMENTS, NS, rev)
        assert dep is not None
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert "--enable-lora" in c["args"] and "--lora-modules" not in c["args"]
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"].startswith("/adapters/")]
        mounts[mount["mountPath"]] = volume  # the kubelet mounts the claim there
        await play_kubelet(api, rev, port)

        async def status_adapters(want: dict[str, int]) -> list[dict[str, Any]] | None:
            obj = await api.get(MODELSERVINGS, NS, "gpt")
            got = ((obj or {}).get("status") or {}).get("adapters") or []
            return got if {a["name"]: a.get("loaded", 0) for a in got} == want else None

        st = await wait_for(lambda: status_adapters({"sql": 1}), timeout=30, what="sql loaded")
        assert st[0]["path"] == f"{mount['mountPath']}/sql" and st[0]["source"] == "pvc:adapters/sql"
        assert await served(port) == {"gpt": None, "sql": "gpt"}

        # Add an adapter on the same claim, then remove the first: loaded and unloaded in place.
        await api.patch(MODELSERVINGS, NS, "gpt", {"spec": {"adapters": [
            *adapters, {"name": "math", "uri": "pvc://adapters/math"}]}})
        await wait_for(lambda: status_adapters({"sql": 1, "math": 1}), timeout=30, what="math loaded")
        assert await served(port) == {"gpt": None, "sql": "gpt", "math": "gpt"}
        await api.patch(MODELSERVINGS, NS, "gpt", {"spec": {"adapters": [
            {"name": "math", "uri": "pvc://adapters/math"}]}})

        async def only_math() -> bool:
            return await served(port) == {"gpt": None, "math": "gpt"}

        await wait_for(only_math, timeout=30, what="sql unloaded")
        await wait_for(lambda: status_adapters({"math": 1}), timeout=30, what="status without sql")
        assert await revision() == [rev], "an adapter change restarted the base"

        # A bad adapter: the load fails, the status says why, the others keep serving.
        shutil.rmtree(volume / "math")
        (volume / "math").mkdir()
        await api.patch(MODELSERVINGS, NS, "gpt", {"spec": {"adapters": [
            {"name": "math", "uri": "pvc://adapters/math"}, {"name": "bad", "uri": "pvc://adapters/bad"}]}})

        async def failed() -> dict[str, Any] | None:
            obj = await api.get(MODELSERVINGS, NS, "gpt")
            got = {a["name"]: a for a in ((obj or {}).get("status") or {}).get("adapters") or []}
            return got if "load failed" in got.get("bad", {}).get("message", "") else None

        got = await wait_for(failed, timeout=30, what="the failed load in status")
        assert "HTTP 404" in got["bad"]["message"] and "is not a directory" in got["bad"]["message"]
        assert got["math"]["loaded"] == 1
        assert await revision() == [rev]
        assert [p["metadata"]["name"] for p in await api.list_objects(PODS, NS, {LABEL_REVISION: rev})] == [
            f"{rev}-pod"]
